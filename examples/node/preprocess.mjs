// The runtime's pixel preprocessing (runtime/preprocess.py) in plain JS, for transformers.js.
//
// transformers.js 4.3's own image processor resizes with sharp's affine interpolator: the bicubic
// kernel point-sampled at corner-aligned positions, so a downscale aliases and shifts by about
// half a pixel, where PIL widens the kernel by the downscale factor and samples at pixel centres.
// Its pixels then differ from the device's by up to ~1.9 (normalised units) and the pruning graph
// keeps other tokens (docs/transformersjs.md). This module reproduces PIL's resampling
// (libImaging/Resample.c: separable two-pass convolution, 8-bit intermediate, coefficients in
// 22-bit fixed point) and transformers' pad / size / crop / rescale / normalise steps from the
// bundle's svdprune.json "vision" section, so the pixels are bit-identical.
//
//   import { useBundlePreprocessing } from './preprocess.mjs';
//   const { vision } = JSON.parse(fs.readFileSync(`${bundle}/svdprune.json`, 'utf8'));
//   useBundlePreprocessing(processor, vision); // processor(image, prompt) now gives these pixels
//
// Pure JS apart from the Tensor it hands to transformers.js, so it runs in the browser too.
import { Tensor } from '@huggingface/transformers';

// Every key of the manifest's vision section and what this module does with it. A key not listed
// (a newer manifest) is refused, so a bundle never runs silently with other pixels than the
// device's. tests/test_transformersjs.py checks this list against runtime/contract.py.
export const VISION_KEYS = {
    image_size: 'pixels',
    pad: 'pixels',
    pad_color: 'pixels',
    do_resize: 'pixels',
    resize_shortest_edge: 'pixels',
    resize_size: 'pixels',
    resample: 'pixels',
    crop: 'pixels',
    rescale_factor: 'pixels', // the effective factor (1.0 when do_rescale is false)
    image_mean: 'pixels', // the effective mean / std (0 / 1 when do_normalize is false)
    image_std: 'pixels',
    // Informational: the values above already say it (the runtime converts any mode to RGB).
    image_processor: 'info',
    convert_rgb: 'info',
    do_rescale: 'info',
    do_normalize: 'info',
    // Read by the graphs / runtime, not by the pixel pipeline.
    tower: 'graph',
    feature_layer: 'graph',
    select_strategy: 'graph',
    patch_size: 'graph',
    static_batch: 'graph',
};
const MAX_PIXELS = 64_000_000; // runtime/preprocess.py's limit on a padded or resized image
const REQUIRED = ['image_size', 'resample', 'rescale_factor', 'image_mean', 'image_std'];
// The slow transformers processors whose pixels the runtime reproduces (export/processor.py).
const PROCESSORS = ['CLIPImageProcessor', 'LlavaImageProcessor', 'SiglipImageProcessor'];

const isSize = (v) => Array.isArray(v) && v.length === 2 && v.every((s) => Number.isInteger(s) && s > 0);
const isBool = (v) => v === true || v === false || v === null;

/** Throw (naming the key) unless every key and value of `vision` is one this module models. */
export function checkVision(vision) {
    const bad = (key, why) => {
        throw new Error(`svdprune.json vision.${key}: ${why}; preprocess.mjs does not model it, so its pixels would not match the runtime's`);
    };
    const value = (key) => JSON.stringify(vision[key]);
    for (const key of Object.keys(vision)) {
        if (!(key in VISION_KEYS)) bad(key, `unknown key (value ${value(key)})`);
    }
    for (const key of REQUIRED) if (!(key in vision)) bad(key, 'missing');
    const v = vision;
    if (!isSize(v.image_size)) bad('image_size', `expected [H, W], got ${value('image_size')}`);
    if (!['square', 'none', undefined].includes(v.pad)) bad('pad', `value ${value('pad')}`);
    const color = v.pad_color;
    if (v.pad === 'square' && !(Array.isArray(color) && color.length === 3 && color.every((c) => Number.isInteger(c) && c >= 0 && c <= 255))) {
        bad('pad_color', `expected [r, g, b] in 0..255, got ${value('pad_color')}`);
    }
    if (v.pad !== 'square' && color != null) bad('pad_color', `set without pad "square": ${value('pad_color')}`);
    if (![true, false, undefined].includes(v.do_resize)) bad('do_resize', `value ${value('do_resize')}`);
    const shortest = v.resize_shortest_edge;
    if (shortest != null && !(Number.isInteger(shortest) && shortest > 0)) bad('resize_shortest_edge', `value ${value('resize_shortest_edge')}`);
    if (v.resize_size != null && !isSize(v.resize_size)) bad('resize_size', `expected [H, W], got ${value('resize_size')}`);
    const resizes = v.do_resize !== false;
    if (!(v.resample in RESAMPLE) && (resizes || v.resample != null)) bad('resample', `PIL filter ${value('resample')}`);
    if (!['center', 'none', undefined].includes(v.crop)) bad('crop', `value ${value('crop')}`);
    if (!Number.isFinite(v.rescale_factor)) bad('rescale_factor', `value ${value('rescale_factor')}`);
    for (const key of ['image_mean', 'image_std']) {
        if (!Array.isArray(v[key]) || v[key].length !== 3 || !v[key].every(Number.isFinite)) bad(key, `expected 3 numbers, got ${value(key)}`);
    }
    if (v.image_processor !== undefined && !PROCESSORS.includes(v.image_processor)) bad('image_processor', `value ${value('image_processor')}`);
    for (const key of ['convert_rgb', 'do_rescale', 'do_normalize']) {
        if (v[key] !== undefined && !isBool(v[key])) bad(key, `value ${value(key)}`);
    }
    return vision;
}

// --- PIL's filters (libImaging/Resample.c), in float64 as there ------------------------------
function bicubic(x) {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
    if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
    return 0;
}
const bilinear = (x) => ((x = Math.abs(x)) < 1 ? 1 - x : 0);
const box = (x) => (x > -0.5 && x <= 0.5 ? 1 : 0);
const HAMMING_A = Math.fround(0.54); // C float literals 0.54f / 0.46f
const HAMMING_B = Math.fround(0.46);
function hamming(x) {
    x = Math.abs(x);
    if (x === 0) return 1;
    if (x >= 1) return 0;
    x *= Math.PI;
    return (Math.sin(x) / x) * (HAMMING_A + HAMMING_B * Math.cos(x));
}
const sinc = (x) => (x === 0 ? 1 : Math.sin(x * Math.PI) / (x * Math.PI));
const lanczos = (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0);
// PIL.Image.Resampling ids -> [filter, support]; 0 (nearest) is a separate path in PIL too.
const RESAMPLE = { 0: null, 1: [lanczos, 3], 2: [bilinear, 1], 3: [bicubic, 2], 4: [box, 0.5], 5: [hamming, 1] };
const PRECISION_BITS = 22; // 32 - 8 - 2: 8-bit samples, 2 bits of headroom

/** precompute_coeffs + normalize_coeffs_8bpc: per output index, first input index and int taps. */
function coefficients(inSize, outSize, [filter, support0]) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1); // downscaling widens the kernel (antialias)
    const support = support0 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const ss = 1 / filterscale;
    const first = new Int32Array(outSize);
    const count = new Int32Array(outSize);
    const taps = new Int32Array(outSize * ksize);
    const w = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
        const center = (xx + 0.5) * scale;
        const xmin = Math.max(Math.trunc(center - support + 0.5), 0); // C (int) truncates
        const n = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
        let ww = 0;
        for (let x = 0; x < n; x++) ww += w[x] = filter((x + xmin - center + 0.5) * ss);
        for (let x = 0; x < n; x++) {
            const k = ww !== 0 ? w[x] / ww : w[x];
            taps[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
        }
        first[xx] = xmin;
        count[xx] = n;
    }
    return { first, count, taps, ksize };
}

const HALF = 1 << (PRECISION_BITS - 1);

function clip8(ss) {
    const v = ss >> PRECISION_BITS; // ss fits in int32, as in PIL's C
    return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** PIL's horizontal pass over `rows` rows of packed RGB (from row `top`): width inW -> outW. */
function horizontalPass(src, inW, top, rows, outW, { first, count, taps, ksize }) {
    const out = new Uint8Array(outW * rows * 3);
    for (let y = 0; y < rows; y++) {
        const row = (y + top) * inW * 3;
        for (let x = 0; x < outW; x++) {
            const k = x * ksize;
            const n = count[x];
            let p = row + first[x] * 3;
            let r = HALF;
            let g = HALF;
            let b = HALF;
            for (let i = 0; i < n; i++, p += 3) {
                const t = taps[k + i];
                r += src[p] * t;
                g += src[p + 1] * t;
                b += src[p + 2] * t;
            }
            const q = (y * outW + x) * 3;
            out[q] = clip8(r);
            out[q + 1] = clip8(g);
            out[q + 2] = clip8(b);
        }
    }
    return out;
}

/** PIL's vertical pass over packed RGB of width w: outH rows from the taps' rows. */
function verticalPass(src, w, outH, { first, count, taps, ksize }) {
    const stride = w * 3;
    const out = new Uint8Array(outH * stride);
    const acc = new Int32Array(stride); // one output row, accumulated tap by tap
    for (let y = 0; y < outH; y++) {
        acc.fill(HALF);
        for (let i = 0, p = first[y] * stride; i < count[y]; i++, p += stride) {
            const t = taps[y * ksize + i];
            for (let j = 0; j < stride; j++) acc[j] += src[p + j] * t;
        }
        for (let j = 0, q = y * stride; j < stride; j++) out[q + j] = clip8(acc[j]);
    }
    return out;
}

/** PIL's nearest resize (Geometry.c ImagingScaleAffine): accumulated source positions. */
function nearest(src, inW, inH, outW, outH) {
    const out = new Uint8Array(outW * outH * 3); // unset pixels stay 0, as PIL's fill
    const ax = inW / outW;
    const ay = inH / outH;
    const xin = new Int32Array(outW);
    for (let x = 0, xo = ax * 0.5; x < outW; x++, xo += ax) xin[x] = xo < 0 ? -1 : Math.trunc(xo);
    for (let y = 0, yo = ay * 0.5; y < outH; y++, yo += ay) {
        const yi = yo < 0 ? -1 : Math.trunc(yo);
        if (yi < 0 || yi >= inH) continue;
        for (let x = 0; x < outW; x++) {
            if (xin[x] < 0 || xin[x] >= inW) continue;
            const s = (yi * inW + xin[x]) * 3;
            out.set(src.subarray(s, s + 3), (y * outW + x) * 3);
        }
    }
    return out;
}

/**
 * PIL `Image.resize((outW, outH), resample)` of packed uint8 RGB (reducing_gap=None), as Pillow
 * `pillow` (major version) does it. Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass
 * first when the height loses more than twice as many pixels as the width (a portrait photo
 * squashed to a square); earlier versions always go horizontal first. The 8-bit intermediate makes
 * the order visible (up to 13 levels on coco photos), so it has to be Pillow's; the runtime pins
 * pillow 13.
 */
export function resizeRGB(src, inW, inH, outW, outH, resample, pillow = 13) {
    if (inW === outW && inH === outH) return src.slice();
    if (resample === 0) return nearest(src, inW, inH, outW, outH);
    const filter = RESAMPLE[resample];
    if (!filter) throw new Error(`PIL resample filter ${resample} is not modelled`);
    const horiz = outW !== inW ? coefficients(inW, outW, filter) : null;
    const vert = outH !== inH ? coefficients(inH, outH, filter) : null;
    if (!horiz) return verticalPass(src, inW, outH, vert);
    if (!vert) return horizontalPass(src, inW, 0, inH, outW, horiz);
    if (pillow >= 13 && outH < inH && inH - outH > 2 * (inW - outW)) {
        return horizontalPass(verticalPass(src, inW, outH, vert), inW, 0, outH, outW, horiz);
    }
    // Horizontal first, over just the rows the vertical pass reads (as PIL).
    const top = vert.first[0];
    const rows = vert.first[outH - 1] + vert.count[outH - 1] - top;
    for (let i = 0; i < outH; i++) vert.first[i] -= top;
    return verticalPass(horizontalPass(src, inW, top, rows, outW, horiz), outW, outH, vert);
}

// --- transformers' steps around the resize ----------------------------------------------------
/** (H, W) after scaling the shortest edge, long edge truncated (runtime resize_size). */
export function resizeSize(height, width, shortest) {
    const [short, long] = width <= height ? [width, height] : [height, width];
    const newLong = Math.trunc((shortest * long) / short);
    return width <= height ? [newLong, shortest] : [shortest, newLong];
}

/** Packed uint8 RGB as PIL convert("RGB") gives it: grey replicated, alpha dropped. */
export function toRGB(image) {
    const { data, width, height, channels } = image;
    if (channels === 3) return data; // read only from here on
    if (![1, 2, 4].includes(channels)) throw new Error(`images with ${channels} channels are not supported`);
    const out = new Uint8Array(width * height * 3);
    for (let i = 0, p = 0; i < width * height; i++, p += channels) {
        const grey = channels < 3;
        out[i * 3] = data[p];
        out[i * 3 + 1] = data[grey ? p : p + 1];
        out[i * 3 + 2] = data[grey ? p : p + 2];
    }
    return out;
}

/** (m, m) square of `color` with the image centred, offset floored (LlavaImageProcessor
 * pad_to_square, LLaVA-1.5's expand2square); a square image is returned as is. */
export function padToSquare(src, w, h, color) {
    if (w === h) return src;
    const m = Math.max(w, h);
    const out = new Uint8Array(m * m * 3);
    for (let i = 0; i < m * m * 3; i += 3) out.set(color, i);
    const top = w > h ? Math.floor((m - h) / 2) : 0;
    const left = w > h ? 0 : Math.floor((m - w) / 2);
    for (let y = 0; y < h; y++) out.set(src.subarray(y * w * 3, (y + 1) * w * 3), ((y + top) * m + left) * 3);
    return out;
}

/** (H, W) window at transformers' center-crop offsets; zero-pads (ceil top/left) when smaller. */
export function centerCrop(src, w, h, outH, outW) {
    const ph = Math.max(outH, h);
    const pw = Math.max(outW, w);
    const dy = Math.ceil((ph - h) / 2) - Math.floor((ph - outH) / 2); // output row - source row
    const dx = Math.ceil((pw - w) / 2) - Math.floor((pw - outW) / 2);
    const out = new Uint8Array(outH * outW * 3);
    const x0 = Math.max(0, dx);
    const x1 = Math.min(outW, w + dx);
    for (let y = Math.max(0, dy); y < Math.min(outH, h + dy); y++) {
        const s = ((y - dy) * w + (x0 - dx)) * 3;
        out.set(src.subarray(s, s + (x1 - x0) * 3), (y * outW + x0) * 3);
    }
    return out;
}

/**
 * Packed uint8 RGB (h, w) -> CHW float32 as transformers: uint8 * rescale in float64 cast to
 * float32, then (x - mean) / std in float32 (each Math.fround of an exact double op is the
 * float32 op's own rounding). A uint8 input has 256 values per channel: a lookup table.
 */
export function normalise(rgb, h, w, vision) {
    const lut = new Float32Array(3 * 256);
    for (let ch = 0; ch < 3; ch++) {
        const mean = Math.fround(vision.image_mean[ch]);
        const std = Math.fround(vision.image_std[ch]);
        for (let v = 0; v < 256; v++) {
            const x = Math.fround(v * vision.rescale_factor);
            lut[ch * 256 + v] = Math.fround(x - mean) / std;
        }
    }
    const plane = h * w;
    const out = new Float32Array(3 * plane);
    for (let i = 0, p = 0; i < plane; i++, p += 3) {
        out[i] = lut[rgb[p]];
        out[plane + i] = lut[256 + rgb[p + 1]];
        out[2 * plane + i] = lut[512 + rgb[p + 2]];
    }
    return out;
}

/**
 * pixel_values (3, H, W) for one image ({data, width, height, channels}: a RawImage), exactly as
 * runtime.preprocess.preprocess under Pillow `pillow`. Returns {data: Float32Array, dims,
 * resized: [h, w]}.
 */
export function pixelValues(image, vision, { pillow = 13 } = {}) {
    checkVision(vision);
    const v = vision;
    const [H, W] = v.image_size;
    const guard = (what, [gh, gw]) => {
        if (gh * gw > MAX_PIXELS) throw new Error(`a ${image.width}x${image.height} image ${what} ${gw}x${gh}, above ${MAX_PIXELS / 1e6} megapixels (aspect ratio too extreme); crop it closer to square first`);
    };
    let rgb = toRGB(image);
    let [h, w] = [image.height, image.width];
    if (v.pad === 'square') {
        h = w = Math.max(h, w);
        guard('pads to', [h, w]);
        rgb = padToSquare(rgb, image.width, image.height, v.pad_color);
    }
    if (v.do_resize !== false) {
        const shortest = v.resize_shortest_edge;
        const [rh, rw] = shortest ? resizeSize(h, w, shortest) : v.resize_size ?? v.image_size;
        guard('resizes to', [rh, rw]);
        rgb = resizeRGB(rgb, w, h, rw, rh, Number(v.resample), pillow);
        [h, w] = [rh, rw];
    }
    const resized = [h, w];
    if (v.crop === 'center') {
        rgb = centerCrop(rgb, w, h, H, W);
        [h, w] = [H, W];
    }
    if (h !== H || w !== W) {
        throw new Error(`a ${image.width}x${image.height} image preprocesses to ${w}x${h}, not the ${W}x${H} the vision graph takes`);
    }
    return { data: normalise(rgb, h, w, v), dims: [3, h, w], resized };
}

/** An image processor for transformers.js giving pixelValues for one image or a list. */
export function bundleImageProcessor(vision, options = {}) {
    checkVision(vision);
    return async (images) => {
        const list = Array.isArray(images) ? images : [images];
        const each = list.map((im) => pixelValues(im, vision, options)); // all (3, H, W)
        const [c, h, w] = each[0].dims;
        const data = new Float32Array(each.length * c * h * w);
        each.forEach((p, i) => data.set(p.data, i * c * h * w));
        return {
            pixel_values: new Tensor('float32', data, [each.length, c, h, w]),
            original_sizes: list.map((im) => [im.height, im.width]),
            reshaped_input_sizes: each.map((p) => p.resized),
        };
    };
}

/** Make `processor(images, text)` (a LlavaProcessor) use the runtime's preprocessing, and
 *  expand every image placeholder of the text (several images in one prompt). */
export function useBundlePreprocessing(processor, vision, options = {}) {
    if (!processor?.components?.image_processor) throw new Error('expected an AutoProcessor with an image processor');
    processor.components.image_processor = bundleImageProcessor(vision, options);
    expandEveryImage(processor);
    return processor;
}

/** transformers.js 4.3's LlavaProcessor expands only the first placeholder (String.replace with
 *  a string); transformers' Python processor expands each. Same count per image, every one. */
function expandEveryImage(processor) {
    processor._call = async (images, text = null, kwargs = {}) => {
        const image_inputs = await processor.image_processor(images, kwargs);
        if (!text) return image_inputs;
        const [height, width] = image_inputs.pixel_values.dims.slice(-2);
        const { image_token, patch_size, num_additional_image_tokens } = processor.config;
        const n = Math.floor(height / patch_size) * Math.floor(width / patch_size) + num_additional_image_tokens;
        const texts = (Array.isArray(text) ? text : [text]).map((t) => t.split(image_token).join(image_token.repeat(n)));
        return { ...image_inputs, ...processor.tokenizer(texts, kwargs) };
    };
}
