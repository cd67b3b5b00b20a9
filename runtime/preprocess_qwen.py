"""Qwen2-VL / Qwen2.5-VL pixel preprocessing for the runtime, with numpy and Pillow only.

`preprocess_qwen` reproduces transformers' slow Qwen2VLImageProcessor (4.57; Qwen2.5-VL uses the
same class) bit for bit from the manifest's vision section, in its order: PIL `convert("RGB")`;
`smart_resize` of (H, W) to multiples of patch_size * merge_size (28) with H*W brought into
[min_pixels, max_pixels] and the aspect ratio nearly kept; PIL resize of the uint8 image to that
size (`reducing_gap=None`, the section's resample: the processor's, bicubic by default), even
when the size is unchanged; rescale in float64 cast to float32; `(x - mean) / std` in float32; the
still image repeated temporal_patch_size (T) times; then the processor's patch flattening:
pixel_values (grid_t*grid_h*grid_w, C*T*P*P) float32, rows in (t, h / merge, w / merge, merge,
merge) order (each merge x merge block of patches adjacent, as the patch merger reads them), each
row (C, T, P, P); image_grid_thw (1, 3) int64 = (1, H / P, W / P).
Deliberate differences: those of runtime.preprocess (EXIF orientation applied, 16-bit greyscale
scaled to 8 bits, any mode converted to RGB even with do_convert_rgb false); an image under
MIN_SIDE px on a side is refused (the processor reads an image 1 or 3 px tall as channels-first
and fails or computes a transposed grid; any other small image it upscales to min_pixels, and so
does this); a zero-size smart_resize result (min_pixels 0 and a side under factor / 2), where the
processor fails later, and a resize above MAX_PIXELS are refused; with do_rescale and
do_normalize both false the processor returns uint8 patches, this the same values as float32.
The fast processor (Qwen2VLImageProcessorFast) computes other pixels, and AutoImageProcessor
returns it for Qwen2VLImageProcessor checkpoints wherever torchvision is installed unless given
use_fast=False (FORCE_FAST_IMAGE_PROCESSOR, 4.57): torchvision's antialiased bicubic resize of a
uint8 tensor lands some pixels on another integer than PIL (on the shared photos: 1-2 levels on
under 1% of values, up to 9 levels on 22% when one axis shrinks as the other grows, 640x480 to
644x476), and it fuses rescale and normalize into `(x - mean / factor) / (std / factor)` in
float32, which differs from the slow path's two roundings by up to 2.4e-7 on ~70% of values even
at an unchanged size. This module equals the slow one.
`preprocess_qwen_fixed` resizes to exactly a given (H, W) instead: NOT what the processor does
(it distorts the aspect ratio), for static vision graphs (e.g. TensorRT) only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

import numpy as np
from PIL import Image

from runtime import contract as C
from runtime.preprocess import MAX_PIXELS, ImageError, PathLike, load_image, to_rgb

MAX_ASPECT = 200  # smart_resize's limit on long side / short side
MIN_SIDE = 4  # smallest side accepted: transformers misreads images 1 or 3 px tall
RESAMPLE_IDS = range(6)  # PIL filters every Pillow has (export/processor.py refuses others)
_REQUIRED = (
    *(C.V_MIN_PIXELS, C.V_MAX_PIXELS, C.V_PATCH_SIZE, C.V_TEMPORAL_PATCH, C.V_MERGE_SIZE),
    *(C.V_RESAMPLE, C.V_RESCALE, C.V_IMAGE_MEAN, C.V_IMAGE_STD),
)
# Options of the other processors' sections (runtime/preprocess.py) that Qwen2VLImageProcessor
# has no counterpart for: each must be absent, null or "none".
_UNMODELLED = (C.V_PAD, C.V_PAD_COLOR, C.V_CROP, C.V_RESIZE, C.V_RESIZE_SIZE)
# Qwen2VLImageProcessor.to_dict(): the options vision_from_processor reads, and metadata.
_OPTIONS = (
    *("min_pixels", "max_pixels", "do_resize", "resample", "do_rescale", "rescale_factor"),
    *("do_normalize", "image_mean", "image_std", "patch_size", "temporal_patch_size"),
    *("merge_size", "do_convert_rgb"),
)
_METADATA = ("_processor_class", "processor_class", "image_processor_type", "size")


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """(H, W) multiples of `factor` with H*W in [min_pixels, max_pixels], the aspect ratio nearly
    kept: transformers 4.57's qwen2_vl `smart_resize` (same defaults, same float maths, Python's
    round-half-even), its ValueError as an ImageError (a ValueError) that names the fix; also
    an ImageError for a side under 1 px or a zero-size result (min_pixels 0), where it returns 0."""
    if height < 1 or width < 1:
        raise ImageError(f"a {width}x{height} image has no pixels; pass a real image")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageError(
            f"a {width}x{height} image has an aspect ratio of "
            f"{max(height, width) / min(height, width):.1f}, above the {MAX_ASPECT} Qwen's "
            "smart_resize accepts; crop it (or pad it) closer to square first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < 1 or w_bar < 1:
        raise ImageError(
            f"a {width}x{height} image smart-resizes to {w_bar}x{h_bar} with min_pixels "
            f"{min_pixels}; set min_pixels to at least {factor * factor} or upscale the image"
        )
    return h_bar, w_bar


def _int(v: Mapping, key: str, low: int) -> int:
    value = v[key]
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"manifest {C.KEY_VISION}.{key} is {value!r}, not an int >= {low}")
    return int(value)


def _facts(vision: Mapping) -> dict:
    # The section's values, checked; ValueError for a section this runtime cannot reproduce.
    missing = [k for k in _REQUIRED if k not in vision]
    if missing:
        raise ValueError(
            f"manifest {C.KEY_VISION} section lacks {', '.join(missing)}: not a Qwen2-VL bundle "
            "section; re-export the bundle with this version of svdprune-onnx"
        )
    kind = vision.get(C.V_PROCESSOR, C.QWEN_PROCESSOR)
    used = [k for k in _UNMODELLED if vision.get(k) not in (None, C.PAD_NONE, C.CROP_NONE)]
    if kind != C.QWEN_PROCESSOR or used:
        raise ValueError(
            f"manifest {C.KEY_VISION} section ({kind}; {', '.join(used) or 'no pad/crop'}) is "
            f"not one runtime.preprocess_qwen reproduces ({C.QWEN_PROCESSOR}, no pad, crop or "
            "other resize); use runtime.preprocess for it, or re-export the bundle"
        )
    f = {k: _int(vision, k, 1) for k in (C.V_PATCH_SIZE, C.V_TEMPORAL_PATCH, C.V_MERGE_SIZE)}
    f |= {k: _int(vision, k, 0) for k in (C.V_MIN_PIXELS, C.V_MAX_PIXELS, C.V_RESAMPLE)}
    if f[C.V_RESAMPLE] not in RESAMPLE_IDS:
        raise ValueError(f"manifest {C.KEY_VISION}.{C.V_RESAMPLE} {f[C.V_RESAMPLE]} is no PIL id")
    f[C.V_DO_RESIZE] = bool(vision.get(C.V_DO_RESIZE, True))
    # V_RESCALE / mean / std hold effective values; a false flag also switches the step off.
    f[C.V_RESCALE] = float(vision[C.V_RESCALE]) if vision.get(C.V_DO_RESCALE, True) else 1.0
    f[C.V_DO_NORMALIZE] = bool(vision.get(C.V_DO_NORMALIZE, True))
    for key in (C.V_IMAGE_MEAN, C.V_IMAGE_STD):  # 1 value broadcasts as transformers' [x] * 3
        f[key] = np.asarray(vision[key], dtype=np.float32).reshape(-1)
        if f[key].size not in (1, 3):
            raise ValueError(f"manifest {C.KEY_VISION}.{key} needs 1 or 3 values")
    fixed = vision.get(C.V_FIXED_SIZE)
    f[C.V_FIXED_SIZE] = None if fixed is None else _fixed(fixed, f)
    return f


def _fixed(size: Sequence[int], f: Mapping) -> tuple[int, int]:
    step = f[C.V_PATCH_SIZE] * f[C.V_MERGE_SIZE]
    h, w = (int(s) for s in size)
    if h < step or w < step or h % step or w % step:
        raise ValueError(
            f"fixed size {h}x{w} (H x W) is not made of {step} px blocks "
            f"(patch_size x merge_size); pick multiples of {step}, e.g. {step * 16}x{step * 16}"
        )
    return h, w


def patchify(pixels: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int):
    """(H, W, C) -> (pixel_values (H*W / P^2, C*T*P*P), image_grid_thw (1, 3) int64): the still
    image repeated T times, in Qwen2VLImageProcessor's element order (a pure permutation)."""
    h, w, c = pixels.shape
    p, t, m = patch_size, temporal_patch_size, merge_size
    if h % (p * m) or w % (p * m):
        raise ImageError(
            f"a {w}x{h} image is not made of {p * m} px blocks (patch_size x merge_size); "
            "resize it to multiples of that (the processor fails on it too)"
        )
    gh, gw = h // p, w // p
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # (.., C, T, P, P)
    return x.reshape(gh * gw, c * t * p * p), np.array([[1, gh, gw]], dtype=np.int64)


def patchify_slice(frames: np.ndarray, patch_size: int, merge_size: int):
    """(T, H, W, C) -> (pixel_values (H*W / P^2, C*T*P*P), image_grid_thw (1, 3)): T distinct
    frames as one temporal slice of a video, in Qwen2VLImageProcessor's element order."""
    t, h, w, c = frames.shape
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    x = frames.reshape(t, gh // m, m, p, gw // m, m, p, c).transpose(1, 4, 2, 5, 7, 0, 3, 6)
    return x.reshape(gh * gw, c * t * p * p), np.array([[1, gh, gw]], dtype=np.int64)


def _pipeline(rgb: Image.Image, size: tuple[int, int] | None, f: Mapping, patch: bool = True):
    if size is not None:
        if size[0] * size[1] > MAX_PIXELS:
            raise ImageError(
                f"a {rgb.width}x{rgb.height} image resizes to {size[1]}x{size[0]}, above "
                f"{MAX_PIXELS / 1e6:.0f} megapixels; lower the bundle's {C.V_MAX_PIXELS}"
            )
        # PIL takes (W, H); transformers resizes the uint8 RGB image with PIL, reducing_gap=None.
        rgb = rgb.resize((size[1], size[0]), resample=Image.Resampling(f[C.V_RESAMPLE]))
    # transformers' rescale: multiply in float64, cast to float32 (1.0: its plain float32 cast)
    x = (np.asarray(rgb).astype(np.float64) * f[C.V_RESCALE]).astype(np.float32)
    if f[C.V_DO_NORMALIZE]:
        x = (x - f[C.V_IMAGE_MEAN]) / f[C.V_IMAGE_STD]  # (H, W, 3) float32, transformers' order
    if not patch:
        return x
    return patchify(x, f[C.V_PATCH_SIZE], f[C.V_TEMPORAL_PATCH], f[C.V_MERGE_SIZE])


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"expected a PIL image, got {type(image).__name__}; "
            "use load_image(path) or PIL.Image.fromarray(array)"
        )
    return to_rgb(image)


def preprocess_qwen(
    image: Image.Image, vision: Mapping, min_tokens: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values (N, C*T*P*P) float32, image_grid_thw (1, 3) int64) for one PIL image, as the
    slow Qwen2VLImageProcessor computes them; the section's fixed_size, if set, overrides it.

    `min_tokens` (a pruned graph's K, manifest pruning.min_tokens) raises min_pixels to
    min_tokens * (patch_size * merge_size)^2 where it is lower: an image the processor would
    give fewer than K tokens is upscaled to K instead of refused (the only case where the
    pixels differ from the processor's; at or above K tokens they are equal)."""
    f = _facts(vision)
    rgb = _rgb(image)
    if f[C.V_FIXED_SIZE] is not None:
        return _pipeline(rgb, f[C.V_FIXED_SIZE], f)
    if min(rgb.size) < MIN_SIDE:
        raise ImageError(
            f"a {rgb.width}x{rgb.height} image is under {MIN_SIDE} px on a side (transformers' "
            "Qwen processor misreads an image 1 or 3 px tall); upscale or pad it first"
        )
    size = None
    if f[C.V_DO_RESIZE]:
        step = f[C.V_PATCH_SIZE] * f[C.V_MERGE_SIZE]
        floor = max(f[C.V_MIN_PIXELS], min_tokens * step * step)
        size = smart_resize(rgb.height, rgb.width, step, floor, f[C.V_MAX_PIXELS])
    return _pipeline(rgb, size, f)


def preprocess_qwen_video(
    frames: Sequence[Image.Image], vision: Mapping, min_tokens: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One video -> its temporal slices [(pixel_values, image_grid_thw (1, 3))], each T frames
    (temporal_patch_size; the last frame repeated to fill the last slice), as the slow
    processor's `videos=` path computes the clip's rows (t-major: slice s is rows s*h*w..).
    Every frame is resized to the size smart_resize gives the first one, with the video's
    min/max pixels (manifest V_VIDEO_MIN_PIXELS / V_VIDEO_MAX_PIXELS). The vision tower attends
    within one slice only (transformers' cu_seqlens repeat h*w per t), so each slice runs
    through the image graph on its own and the clip equals transformers' video features."""
    if C.V_VIDEO_MAX_PIXELS not in vision:
        raise ImageError(
            "this bundle's manifest has no video settings; re-export it with this version "
            "of svdprune-onnx to pass videos"
        )
    f = _facts(vision)
    if not frames:
        raise ImageError("a video with no frames; pass at least one frame")
    rgb = [_rgb(im) for im in frames]
    step, t = f[C.V_PATCH_SIZE] * f[C.V_MERGE_SIZE], f[C.V_TEMPORAL_PATCH]
    if f[C.V_FIXED_SIZE] is not None:
        size = f[C.V_FIXED_SIZE]
    else:
        floor = max(int(vision[C.V_VIDEO_MIN_PIXELS]), min_tokens * step * step)
        size = smart_resize(rgb[0].height, rgb[0].width, step, floor, vision[C.V_VIDEO_MAX_PIXELS])
    # (H, W, C) float32 per frame: the still-image pipeline without its patching
    xs = [_pipeline(im, size, f, patch=False) for im in rgb]
    xs += [xs[-1]] * (-len(xs) % t)
    p, m = f[C.V_PATCH_SIZE], f[C.V_MERGE_SIZE]
    return [patchify_slice(np.stack(xs[i : i + t]), p, m) for i in range(0, len(xs), t)]


def preprocess_qwen_fixed(
    image: Image.Image, vision: Mapping, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """As preprocess_qwen, but resized to exactly `size` (H, W), multiples of patch_size *
    merge_size (e.g. 448x448: 256 patches, 64 tokens), for a static vision graph. NOT what the
    processor does: it ignores the aspect ratio, min_pixels, max_pixels and do_resize."""
    f = _facts(vision)
    return _pipeline(_rgb(image), _fixed(size, f), f)


def preprocess_qwen_batch(
    images: Sequence[Image.Image | PathLike],
    vision: Mapping,
    limit: int | None = MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """The processor's batch: every image's rows concatenated, image_grid_thw (B, 3); paths
    are opened with load_image (limit: its decompression-bomb guard, in pixels)."""
    if len(images) == 0:
        raise ImageError("no images given; pass at least one image or image path")
    out = [
        preprocess_qwen(im if isinstance(im, Image.Image) else load_image(im, limit), vision)
        for im in images
    ]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def merged_tokens(image_grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """(B,) int64: the LLM tokens each image's grid gives after the patch merger, t*h*w / m^2."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return grid.prod(axis=1) // (merge_size * merge_size)


def vision_from_processor(options: Mapping) -> dict:
    """The vision-section facts of a slow Qwen2VLImageProcessor from its `to_dict()` (a plain
    dict: the runtime never imports transformers), effective values as runtime.preprocess keeps
    them (rescale 1.0 / mean 0, std 1 for a step switched off). ValueError for another class
    (the fast one computes other pixels), a missing option or any other option set."""
    kind = options.get("image_processor_type", C.QWEN_PROCESSOR)
    if kind != C.QWEN_PROCESSOR:
        raise ValueError(
            f"{kind} is not {C.QWEN_PROCESSOR}, the processor runtime.preprocess_qwen equals "
            "bit for bit; load the checkpoint's processor with use_fast=False"
        )
    missing = [k for k in _OPTIONS if k not in options]
    other = [
        k for k, v in options.items() if k not in (*_OPTIONS, *_METADATA) and v not in (None, False)
    ]
    if missing or other:
        raise ValueError(
            f"{C.QWEN_PROCESSOR} options lack {missing} or set {other}: pass the processor "
            "object's to_dict() (preprocessor_config.json may hold only size, which its "
            "__init__ ignores), with no option runtime.preprocess_qwen does not model"
        )

    def channels(key: str, off: float) -> list[float]:
        if not options["do_normalize"]:
            return [off] * 3
        values = options[key]
        values = [values] * 3 if isinstance(values, Real) else [float(x) for x in values]
        zero = key == "image_std" and 0.0 in values
        if len(values) != 3 or not all(math.isfinite(x) for x in values) or zero:
            raise ValueError(f"{C.QWEN_PROCESSOR} {key} {values}: not 3 finite values (std != 0)")
        return values

    rescale = float(options["rescale_factor"]) if options["do_rescale"] else 1.0
    if not math.isfinite(rescale):
        raise ValueError(f"{C.QWEN_PROCESSOR} rescale_factor {rescale} is not finite")
    facts = {
        C.V_PROCESSOR: C.QWEN_PROCESSOR,
        C.V_CONVERT_RGB: options["do_convert_rgb"],
        C.V_DO_RESIZE: bool(options["do_resize"]),
        C.V_MIN_PIXELS: int(options["min_pixels"]),
        C.V_MAX_PIXELS: int(options["max_pixels"]),
        C.V_PATCH_SIZE: int(options["patch_size"]),
        C.V_TEMPORAL_PATCH: int(options["temporal_patch_size"]),
        C.V_MERGE_SIZE: int(options["merge_size"]),
        C.V_RESAMPLE: int(options["resample"]),
        C.V_DO_RESCALE: bool(options["do_rescale"]),
        C.V_RESCALE: rescale,
        C.V_DO_NORMALIZE: bool(options["do_normalize"]),
        C.V_IMAGE_MEAN: channels("image_mean", 0.0),
        C.V_IMAGE_STD: channels("image_std", 1.0),
        C.V_FIXED_SIZE: None,
    }
    _facts(facts)  # the same checks the runtime makes on the manifest
    return facts
