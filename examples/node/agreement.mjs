// Pixels and kept tokens of transformers.js vs reference pixels from the runtime, photo by photo
// (used by tests/test_transformersjs.py and bench/tjs_agreement.py).
//
//   node agreement.mjs REQUEST.json OUT.json
//
// REQUEST: {"bundle": dir, "reference": raw float32 file (N x 3 x H x W, the runtime's pixels),
//   "images": [N paths], "processor": bool (default true), "causes": bool}
// OUT, per image and per path ("bundle": preprocess.mjs; "processor": transformers.js's own image
//   processor): pixel max/mean |diff| vs the reference and the kept_indices its vision graph (the
//   session transformers.js loaded) picks. With causes, also: decoded_sha256 (the RGB bytes
//   RawImage.read decodes), processor_resize ([h, w] transformers.js resizes to), and the paths
//   "sharp_kernel" (sharp's resize at the runtime's size, otherwise preprocess.mjs),
//   "processor_size" (PIL's kernel at transformers.js's size) and "double_normalise"
//   (preprocess.mjs with transformers.js's float64 rescale / normalise).
import crypto from 'node:crypto';
import fs from 'node:fs';
import { RawImage, Tensor } from '@huggingface/transformers';
import { openBundle } from './bundle.mjs';
import { centerCrop, normalise, pixelValues, resizeRGB, resizeSize, toRGB } from './preprocess.mjs';

const [requestPath, outPath] = process.argv.slice(2);
const req = JSON.parse(fs.readFileSync(requestPath, 'utf8'));
const { processor, model, vision } = await openBundle(req.bundle);
const session = model.sessions.vision_encoder; // onnxruntime-node session as transformers.js made it

const [H, W] = vision.image_size;
const plane = 3 * H * W;
const refBuf = fs.readFileSync(req.reference);
const reference = new Float32Array(refBuf.buffer, refBuf.byteOffset, refBuf.byteLength / 4);

async function kept(data) {
    const pixel_values = new Tensor('float32', data, [1, 3, H, W]);
    const out = await session.run({ pixel_values: pixel_values.ort_tensor });
    return Array.from(out.kept_indices.data, Number);
}

/** Pixel max / mean |diff| vs `ref` and the kept_indices of `data`. */
async function measure(data, ref) {
    let max = 0;
    let sum = 0;
    for (let i = 0; i < plane; ++i) {
        const d = Math.abs(data[i] - ref[i]);
        max = Math.max(max, d);
        sum += d;
    }
    return { max_abs_diff: max, mean_abs_diff: sum / plane, kept_indices: await kept(data) };
}

/** uint8 HWC (H, W) -> CHW float32 with transformers.js's arithmetic (float64, one rounding). */
function doubleNormalise(u8) {
    const out = new Float32Array(plane);
    for (let i = 0; i < H * W; i++) {
        for (let c = 0; c < 3; c++) {
            out[c * H * W + i] = (vision.rescale_factor * u8[i * 3 + c] - vision.image_mean[c]) / vision.image_std[c];
        }
    }
    return out;
}

const results = [];
for (const [n, file] of req.images.entries()) {
    const ref = reference.subarray(n * plane, (n + 1) * plane);
    const image = await RawImage.read(file);
    const row = { image: file, bundle: await measure(pixelValues(image, vision).data, ref) };
    if (req.processor ?? true) {
        row.processor = await measure((await processor.image_processor(image)).pixel_values.data, ref);
    }
    if (req.causes) {
        if (vision.pad === 'square' || vision.do_resize === false) throw new Error('causes: CLIP / SigLIP steps only');
        const rgb = toRGB(image);
        row.decoded_sha256 = crypto.createHash('sha256').update(rgb).digest('hex');
        const [w, h] = processor.image_processor.get_resize_output_image_size(image, processor.image_processor.size);
        row.processor_resize = [h, w];
        // One cause at a time, the rest as preprocess.mjs: sharp's kernel at the runtime's size;
        // transformers.js's float64 arithmetic on the runtime's uint8 pixels.
        const [rh, rw] = vision.resize_shortest_edge ? resizeSize(image.height, image.width, vision.resize_shortest_edge) : [H, W];
        const crop = (u8) => (vision.crop === 'center' ? centerCrop(u8, rw, rh, H, W) : u8);
        const resample = Number(vision.resample);
        const pil = crop(resizeRGB(rgb, image.width, image.height, rw, rh, resample));
        const sharp = await new RawImage(rgb, image.width, image.height, 3).resize(rw, rh, { resample });
        row.sharp_kernel = await measure(normalise(crop(sharp.rgb().data), H, W, vision), ref);
        row.double_normalise = await measure(doubleNormalise(pil), ref);
        if (vision.resize_shortest_edge) {
            // transformers.js's resize size (rounded, not truncated) with PIL's kernel.
            const atSize = resizeRGB(rgb, image.width, image.height, w, h, resample);
            const cropped = vision.crop === 'center' ? centerCrop(atSize, w, h, H, W) : atSize;
            row.processor_size = await measure(normalise(cropped, H, W, vision), ref);
        }
    }
    results.push(row);
}
fs.writeFileSync(outPath, JSON.stringify({ results }));
