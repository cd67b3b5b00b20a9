// Greedy token ids from transformers.js for a bundle, as JSON (used by tests/test_transformersjs.py).
//
//   node greedy_ids.mjs REQUEST.json OUT.json
//
// REQUEST: {"bundle": dir, "max_new_tokens": n, "question": text, "items": [{"image": path,
//   "input_ids": [...], "pixel_values": raw float32 file, "pixel_shape": [1, 3, H, W]}]}; an item
//   with "images": [paths] (pixel_shape [n, 3, H, W]) puts them all in one prompt, in order.
// OUT, per item: tokens (new ids; given input_ids + pixel_values), js_input_ids (the processor's
//   ids for the chat-rendered question), js_tokens (new ids from the processor's own inputs, as
//   answer.mjs builds them: preprocess.mjs pixels), pixel_max/mean_abs_diff (processor pixels vs
//   the given ones). One process serves all items.
import fs from 'node:fs';
import { RawImage, Tensor } from '@huggingface/transformers';
import { openBundle } from './bundle.mjs';
import { useBundlePreprocessing } from './preprocess.mjs';

const [requestPath, outPath] = process.argv.slice(2);
const req = JSON.parse(fs.readFileSync(requestPath, 'utf8'));
const { processor, model, vision } = await openBundle(req.bundle);
useBundlePreprocessing(processor, vision); // the runtime's pixels, as answer.mjs does
const gen = { max_new_tokens: req.max_new_tokens, do_sample: false };

/** New token ids of a batch-1 generate call. */
async function greedy(inputs) {
    const out = await model.generate({ ...inputs, ...gen });
    return out.tolist()[0].slice(inputs.input_ids.dims.at(-1)).map(Number);
}

function idsTensor(ids) {
    return new Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
}

function readF32(file, shape) {
    const buf = fs.readFileSync(file);
    const data = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
    return new Tensor('float32', data, shape);
}

/** The question in the chat template, after `n` image parts. */
function render(n) {
    const content = [...Array(n).fill({ type: 'image' }), { type: 'text', text: req.question }];
    return processor.apply_chat_template([{ role: 'user', content }], { add_generation_prompt: true });
}

const prompt = render(1);
const results = [];
for (const item of req.items) {
    const paths = item.images ?? [item.image];
    const pixel_values = readF32(item.pixel_values, item.pixel_shape);
    const input_ids = idsTensor(item.input_ids);
    const attention_mask = idsTensor(item.input_ids.map(() => 1));
    const tokens = await greedy({ input_ids, attention_mask, pixel_values });

    const images = await Promise.all(paths.map((p) => RawImage.read(p)));
    const js = await processor(images.length === 1 ? images[0] : images, render(paths.length));
    let max = 0;
    let sum = 0;
    const n = js.pixel_values.data.length;
    for (let i = 0; i < n; ++i) {
        const d = Math.abs(js.pixel_values.data[i] - pixel_values.data[i]);
        max = Math.max(max, d);
        sum += d;
    }
    results.push({
        image: item.image,
        tokens,
        js_input_ids: js.input_ids.tolist()[0].map(Number),
        js_pixel_shape: js.pixel_values.dims,
        pixel_max_abs_diff: max,
        pixel_mean_abs_diff: sum / n,
        js_tokens: await greedy(js),
    });
}
fs.writeFileSync(outPath, JSON.stringify({ prompt, results }, null, 1));
