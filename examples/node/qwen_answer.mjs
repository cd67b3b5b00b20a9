// Answer a question about an image with an UNPRUNED (export --method none) Qwen2.5-VL bundle in
// transformers.js (Node), through its own processor and generate(); prints JSON.
//
//   npm install --ignore-scripts
//   node qwen_answer.mjs BUNDLE IMAGE ["What is in the image?"] [max_new_tokens] [REF.json]
//
// The folder loads as it is (local files only): config.json says model_type qwen2_5_vl, the graphs
// are onnx/{vision_encoder,embed_tokens,decoder_model_merged}.onnx with transformers.js's I/O
// names; the vision graph's extra kept_indices output is ignored. Output (stdout, one JSON):
//   prompt, prompt_ids (the processor's ids), image_grid_thw, pixel_shape, pixels (min/max/mean
//   of pixel_values), token_ids (greedy new ids), answer (decoded), ms.
// REF.json (tests/test_transformersjs_qwen.py): another client's inputs for the same image,
//   {"input_ids": [...], "pixel_values": raw float32 file, "image_grid_thw": [t, h, w]}. Adds
//   pixels.max_abs_diff / mean_abs_diff (when the shapes match), the logits of every step of the
//   processor's run (logits), and ref: {token_ids, logits} from generate() on REF's inputs
//   (transformers.js's model path: vision, scatter, M-RoPE, decode, on the other's pixels).
// Its pixels are transformers.js's own (smart_resize with Math.round, sharp's bicubic), not the
// runtime's (Python's round-half-even, PIL's antialiased bicubic): the grid can differ by one
// merge cell when H or W / 28 ends in .5, and the pixels differ by up to ~1 (normalised).
//
// A PRUNED bundle (K < N tokens per image) fails here: the processor writes N = t*h*w/4 image
// pads, the vision graph returns K features -> "Number of tokens and features do not match"; and
// transformers.js's M-RoPE positions (get_rope_index) never see kept_indices.
import fs from 'node:fs';
import path from 'node:path';
import {
    env,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    RawImage,
    Tensor,
} from '@huggingface/transformers';

const [bundleArg, imagePath, question = 'What is in the image?', maxNew = '64', refPath] =
    process.argv.slice(2);
if (!bundleArg || !imagePath) {
    console.error('usage: node qwen_answer.mjs BUNDLE IMAGE ["question"] [max_new_tokens] [REF.json]');
    process.exit(2);
}

const bundle = path.resolve(bundleArg);
// The model id is the bundle's folder name under env.localModelPath; never a hub download.
env.localModelPath = path.dirname(bundle) + path.sep;
env.allowRemoteModels = false;
const id = path.basename(bundle);

const { pruning = {} } = JSON.parse(fs.readFileSync(path.join(bundle, 'svdprune.json'), 'utf8'));
if (pruning.method !== 'none' && pruning.k !== pruning.n) {
    console.error(
        `note: ${id} is pruned (K=${pruning.k} per image); transformers.js cannot run it ` +
            '(expect "Number of tokens and features do not match")',
    );
}

const processor = await AutoProcessor.from_pretrained(id);
const model = await Qwen2_5_VLForConditionalGeneration.from_pretrained(id); // dtype from config.json

// Observe (not change) every decoder step: the last position's logits, when REF is given.
let steps = null;
const forward = model.forward.bind(model);
model.forward = async (inputs) => {
    const out = await forward(inputs);
    if (steps) steps.push(Array.from(out.logits.slice(0, -1, null).data));
    return out;
};

/** Greedy new token ids (and, with REF, every step's logits) of a batch-1 generate call. */
async function greedy(inputs) {
    steps = refPath ? [] : null;
    const out = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
    const token_ids = out.tolist()[0].slice(inputs.input_ids.dims.at(-1)).map(Number);
    return { token_ids, logits: steps ?? undefined };
}

function int64(values, dims) {
    return new Tensor('int64', BigInt64Array.from(values.map(BigInt)), dims);
}

const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];
const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
const inputs = await processor(prompt, await RawImage.read(imagePath)); // Qwen: (text, images)

const px = inputs.pixel_values.data;
let [min, max, sum] = [Infinity, -Infinity, 0];
for (let i = 0; i < px.length; ++i) {
    min = Math.min(min, px[i]);
    max = Math.max(max, px[i]);
    sum += px[i];
}
const pixels = { min, max, mean: sum / px.length };

let ref;
if (refPath) {
    const req = JSON.parse(fs.readFileSync(refPath, 'utf8'));
    const buf = fs.readFileSync(req.pixel_values);
    const data = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
    if (data.length === px.length) {
        let [dmax, dsum] = [0, 0];
        for (let i = 0; i < px.length; ++i) {
            const d = Math.abs(px[i] - data[i]);
            dmax = Math.max(dmax, d);
            dsum += d;
        }
        Object.assign(pixels, { max_abs_diff: dmax, mean_abs_diff: dsum / px.length });
    }
    const width = inputs.pixel_values.dims.at(-1);
    ref = await greedy({
        input_ids: int64(req.input_ids, [1, req.input_ids.length]),
        attention_mask: int64(req.input_ids.map(() => 1), [1, req.input_ids.length]),
        pixel_values: new Tensor('float32', data, [data.length / width, width]),
        image_grid_thw: int64(req.image_grid_thw, [1, 3]),
    });
}

const t0 = performance.now();
const { token_ids, logits } = await greedy(inputs);
const ms = performance.now() - t0;

console.log(
    JSON.stringify({
        prompt,
        prompt_ids: inputs.input_ids.tolist()[0].map(Number),
        image_grid_thw: inputs.image_grid_thw.tolist()[0].map(Number),
        pixel_shape: inputs.pixel_values.dims,
        pixels,
        token_ids,
        answer: processor.batch_decode([token_ids], { skip_special_tokens: true })[0],
        ms: Math.round(ms),
        logits,
        ref,
    }),
);
