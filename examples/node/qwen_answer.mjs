// Answer a question about an image with an UNPRUNED (export --method none) Qwen2.5-VL bundle in
// transformers.js (Node), through its own processor and generate(); prints JSON.
//
//   npm install --ignore-scripts
//   node qwen_answer.mjs BUNDLE IMAGE ["What is in the image?"] [max_new_tokens] [PIXELS.f32]
//
// The folder loads as it is (local files only): config.json says model_type qwen2_5_vl, the graphs
// are onnx/{vision_encoder,embed_tokens,decoder_model_merged}.onnx with transformers.js's I/O
// names; the vision graph's extra kept_indices output is ignored. Output (stdout, one JSON):
//   prompt, prompt_ids (the processor's ids), image_grid_thw, pixel_shape, pixel stats
//   (min/max/mean of pixel_values; with PIXELS.f32, a raw float32 file of the same shape such as
//   the runtime's pixel_values, also max/mean |diff| against it), token_ids (greedy new ids),
//   answer (decoded).
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
} from '@huggingface/transformers';

const [bundleArg, imagePath, question = 'What is in the image?', maxNew = '64', pixelsPath] =
    process.argv.slice(2);
if (!bundleArg || !imagePath) {
    console.error('usage: node qwen_answer.mjs BUNDLE IMAGE ["question"] [max_new_tokens] [PIXELS.f32]');
    process.exit(2);
}

const bundle = path.resolve(bundleArg);
// The model id is the bundle's folder name under env.localModelPath; never a hub download.
env.localModelPath = path.dirname(bundle) + path.sep;
env.allowRemoteModels = false;
const id = path.basename(bundle);

const manifest = JSON.parse(fs.readFileSync(path.join(bundle, 'svdprune.json'), 'utf8'));
const { k, n } = manifest.pruning ?? {};
if (manifest.pruning?.method !== 'none' && k !== n) {
    console.error(
        `note: ${id} is pruned (K=${k} per image); transformers.js cannot run it ` +
            '(expect "Number of tokens and features do not match")',
    );
}

const processor = await AutoProcessor.from_pretrained(id);
const model = await Qwen2_5_VLForConditionalGeneration.from_pretrained(id); // dtype from config.json

const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: question }] }];
const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
const inputs = await processor(prompt, await RawImage.read(imagePath)); // Qwen: (text, images)

const px = inputs.pixel_values.data;
let min = Infinity;
let max = -Infinity;
let sum = 0;
for (let i = 0; i < px.length; ++i) {
    min = Math.min(min, px[i]);
    max = Math.max(max, px[i]);
    sum += px[i];
}
const pixels = { min, max, mean: sum / px.length };
if (pixelsPath) {
    const buf = fs.readFileSync(pixelsPath);
    const ref = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
    if (ref.length === px.length) {
        let dmax = 0;
        let dsum = 0;
        for (let i = 0; i < px.length; ++i) {
            const d = Math.abs(px[i] - ref[i]);
            dmax = Math.max(dmax, d);
            dsum += d;
        }
        Object.assign(pixels, { max_abs_diff: dmax, mean_abs_diff: dsum / px.length });
    } else {
        pixels.compared = `shapes differ: ${px.length} vs ${ref.length} values`;
    }
}

const t0 = performance.now();
const output = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
const ms = performance.now() - t0;
const promptLen = inputs.input_ids.dims.at(-1);
const newTokens = output.slice(null, [promptLen, null]);
const [answer] = processor.batch_decode(newTokens, { skip_special_tokens: true });

console.log(
    JSON.stringify({
        prompt,
        prompt_ids: inputs.input_ids.tolist()[0].map(Number),
        image_grid_thw: inputs.image_grid_thw.tolist()[0].map(Number),
        pixel_shape: inputs.pixel_values.dims,
        pixels,
        token_ids: newTokens.tolist()[0].map(Number),
        answer,
        ms: Math.round(ms),
    }),
);
