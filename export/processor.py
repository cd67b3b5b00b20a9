"""vision_section preprocessing facts from an HF image processor, or refuse.

The runtime (runtime/preprocess.py) reproduces three of transformers' slow image processors bit
for bit: CLIPImageProcessor, LlavaImageProcessor and SiglipImageProcessor. `preprocessing_facts`
reads every option of those classes into the manifest's vision section and refuses, with an
ImageProcessorError naming it, any other class and any option or value the runtime does not
model, so a checkpoint can never export green and then compute other pixels on the device.
`check_runtime_pixels` then proves it on real photos: the runtime's pixels must equal the
checkpoint's own processor's, max |diff| 0.

| option         | modelled                                        | refused                     |
|----------------|-------------------------------------------------|-----------------------------|
| class          | CLIP / Llava / Siglip ImageProcessor (slow)     | any other (fast ones too)   |
| do_convert_rgb | true, false, null (equal pixels on RGB input)   | a non-boolean value         |
| do_pad         | LlavaImageProcessor: square of int(mean * 255)  | elsewhere; no 3-colour fill |
| do_resize/size | {shortest_edge} (not SigLIP), {height, width}   | other size forms            |
| resample       | PIL ids 0..5                                    | anything else, if resizing  |
| do_center_crop | CLIP, Llava: crop_size {height, width}          | on SigLIP; other crop forms |
| do_rescale     | any finite factor; false -> 1.0                 | non-finite factor           |
| do_normalize   | 1 or 3 finite mean/std, std != 0; false -> 0/1  | other lengths, std 0        |
| output size    | one fixed size = the vision tower's image_size  | per-image or other sizes    |
| other options  | metadata keys; null / false / empty values      | any other option set        |
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import numpy as np
from PIL import Image

from runtime import contract as C

# Keys the processors' to_dict() carries that say nothing about pixels.
METADATA = frozenset(
    {"_processor_class", "processor_class", "image_processor_type", "feature_extractor_type"}
)
# PIL filters every Pillow has: NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, BOX 4, HAMMING 5
# (Pillow 13's MKS2013 / MKS2021 are refused: older Pillow on a device lacks them).
RESAMPLE_IDS = frozenset(range(6))
WHERE = C.HF_PREPROCESSOR_CONFIG


class ImageProcessorError(ValueError):
    """The checkpoint's image processor does something the runtime does not reproduce."""


def _modelled() -> dict[type, bool]:
    """{processor class: whether it has a center crop}; imported lazily (transformers)."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor, SiglipImageProcessor

    return {CLIPImageProcessor: True, LlavaImageProcessor: True, SiglipImageProcessor: False}


def _refuse(name: str, text: str) -> ImageProcessorError:
    return ImageProcessorError(
        f"{WHERE}: {name} {text}; the export refuses what the runtime cannot reproduce exactly "
        "(see docs/robustness.md, Preprocessing)"
    )


def _flag(options: dict, key: str, cls: str) -> bool:
    # transformers tests truthiness; null means off. Anything but a boolean is refused.
    value = options.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise _refuse(f"{key}={value!r}", f"on {cls} is not true, false or null")


def _number(value, name: str, cls: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise _refuse(f"{name}={value!r}", f"on {cls} is not a finite number")
    return float(value)


def _channels(value, name: str, cls: str) -> list[float]:
    # transformers' normalize takes one number for every channel, or one per channel (RGB: 3).
    values = [value] if isinstance(value, Real) else value
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) not in (1, 3):
        raise _refuse(f"{name}={value!r}", f"on {cls} is not one number or 3 (R, G, B)")
    numbers = [_number(v, name, cls) for v in values]
    return numbers * 3 if len(numbers) == 1 else numbers


def _size(options: dict, key: str, square: bool, forms: tuple, cls: str) -> dict[str, int]:
    """A size option as transformers' preprocess reads it (get_size_dict), in one of `forms`."""
    from transformers.image_processing_utils import get_size_dict

    raw = options.get(key)
    try:
        size = get_size_dict(raw, param_name=key, default_to_square=square)
    except (ValueError, TypeError) as e:
        raise _refuse(f"{key}={raw!r}", f"on {cls} is not a size transformers reads ({e})") from e
    if set(size) not in [set(f) for f in forms]:
        shown = " or ".join("{" + ", ".join(f) + "}" for f in forms)
        raise _refuse(f"{key}={raw!r}", f"on {cls} is not a modelled form ({shown})")
    for name, value in size.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _refuse(f"{key}={raw!r}", f"on {cls}: {name} is not a positive integer")
    return size


def _resample(value, needed: bool, cls: str) -> int | None:
    try:
        rid = int(value)
    except (TypeError, ValueError):
        rid = None
    if rid in RESAMPLE_IDS and not isinstance(value, bool | float):
        return rid
    if not needed:
        return None  # not used: the processor does not resize
    ids = sorted(RESAMPLE_IDS)
    raise _refuse(f"resample={value!r}", f"on {cls} is not a PIL resample id {ids}")


def _unknown_options(options: dict, known: set[str], cls: str, has_crop: bool) -> None:
    """Refuse options the class does not have but the config sets (transformers ignores them)."""
    for key, value in sorted(options.items()):
        unset = value is None or value is False or value in ([], {}, "")
        if key in known or key in METADATA or unset:
            continue
        if key == "do_pad" or key.startswith("pad_"):
            why = f"but {cls} does not pad (LlavaImageProcessor does, to a mean-colour square)"
        elif key in ("do_center_crop", "crop_size") and not has_crop:
            why = f"but {cls} has no center crop (it resizes straight to size)"
        elif "grid_pinpoints" in key or "anyres" in key:
            why = "asks for LLaVA-NeXT anyres tiling, which this export does not model"
        else:
            why = (
                f"is not an option of {cls} (transformers ignores it, the checkpoint may expect "
                "it to act): remove it if it is meaningless"
            )
        raise _refuse(f"{key}={value!r}", why)


def preprocessing_facts(processor, tower_size: Sequence[int] | None = None) -> dict:
    """The vision section's preprocessing keys for `processor`, or ImageProcessorError.

    tower_size: the vision tower's [H, W]; the processor must produce exactly that size.
    """
    modelled = _modelled()
    cls = type(processor).__name__
    if type(processor) not in modelled:
        names = ", ".join(sorted(c.__name__ for c in modelled))
        raise _refuse(
            f"image processor {cls}",
            f"is not modelled by the runtime (supported, slow: {names})",
        )
    has_crop = modelled[type(processor)]
    options = processor.to_dict()
    params = inspect.signature(type(processor).__init__).parameters
    known = {name for name, p in params.items() if name != "self" and p.kind != p.VAR_KEYWORD}
    _unknown_options(options, known, cls, has_crop)

    convert = _flag(options, "do_convert_rgb", cls)
    do_pad = _flag(options, "do_pad", cls) if "do_pad" in known else False
    do_resize = _flag(options, "do_resize", cls)
    do_crop = _flag(options, "do_center_crop", cls) if has_crop else False
    do_rescale = _flag(options, "do_rescale", cls)
    do_normalize = _flag(options, "do_normalize", cls)

    pad_color = None
    if do_pad:  # transformers: background = tuple(int(x * 255) for x in self.image_mean)
        mean = options.get("image_mean")
        if not isinstance(mean, Sequence) or len(mean) != 3:
            raise _refuse(f"do_pad with image_mean={mean!r}", f"on {cls} has no 3-colour fill")
        pad_color = [int(_number(m, "image_mean", cls) * 255) for m in mean]
        if not all(0 <= c <= 255 for c in pad_color):
            raise _refuse(f"do_pad with image_mean={mean!r}", "gives a fill outside 0..255")

    shortest = exact = None
    if do_resize:
        forms = (("shortest_edge",), ("height", "width")) if has_crop else (("height", "width"),)
        size = _size(options, "size", False, forms, cls)
        shortest = size.get("shortest_edge")
        exact = [size["height"], size["width"]] if "height" in size else None
    resample = _resample(options.get("resample"), do_resize, cls)

    if do_crop:
        crop = _size(options, "crop_size", True, (("height", "width"),), cls)
        out = [crop["height"], crop["width"]]
    elif exact is not None:
        out = exact
    elif shortest is not None and do_pad:  # a square resized by its shortest edge stays square
        out = [shortest, shortest]
    else:
        what = "do_resize=false" if not do_resize else f"size={options.get('size')!r}"
        raise _refuse(
            f"{what} with do_center_crop false",
            f"on {cls} gives every image its own size (its aspect ratio), but the vision graph "
            "takes one fixed size",
        )
    if tower_size is not None and [int(s) for s in tower_size] != out:
        raise _refuse(
            f"output size {out[1]}x{out[0]}",
            f"on {cls} is not the vision tower's {tower_size[1]}x{tower_size[0]} input",
        )

    rescale = _number(options.get("rescale_factor"), "rescale_factor", cls) if do_rescale else 1.0
    if do_normalize:
        mean = _channels(options.get("image_mean"), "image_mean", cls)
        std = _channels(options.get("image_std"), "image_std", cls)
        if 0.0 in std:
            raise _refuse(f"image_std={options.get('image_std')!r}", f"on {cls} divides by zero")
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    return {
        C.V_PROCESSOR: cls,
        C.V_CONVERT_RGB: convert,
        C.V_PAD: C.PAD_SQUARE if do_pad else C.PAD_NONE,
        C.V_PAD_COLOR: pad_color,
        C.V_DO_RESIZE: do_resize,
        C.V_RESIZE: shortest,
        C.V_RESIZE_SIZE: exact,
        C.V_RESAMPLE: resample,
        C.V_CROP: C.CROP_CENTER if do_crop else C.CROP_NONE,
        C.V_IMAGE_SIZE: out,
        C.V_DO_RESCALE: do_rescale,
        C.V_RESCALE: rescale,
        C.V_DO_NORMALIZE: do_normalize,
        C.V_IMAGE_MEAN: mean,
        C.V_IMAGE_STD: std,
    }


def probe_images(paths: Sequence[Path]) -> list[Image.Image]:
    """The validation photos (runtime.load_image), each also transposed (portrait <-> landscape),
    as greyscale and as RGBA (alpha from its grey)."""
    from export.photos import synthetic_photo
    from runtime.preprocess import load_image

    images = []
    for photo in [load_image(p) for p in paths] or [synthetic_photo()]:
        rgba = photo.convert("RGBA")
        rgba.putalpha(photo.convert("L"))
        images += [photo, photo.transpose(Image.Transpose.TRANSPOSE), photo.convert("L"), rgba]
    return images


def check_runtime_pixels(
    processor, vision: dict, paths: Sequence[Path], extra: Sequence[Image.Image] = ()
) -> dict:
    """runtime.preprocess vs the checkpoint's own processor on the validation photos, their
    probe_images variants and `extra` images (the self-test's): equal pixels, or
    ExportValidationError.

    Returns the validation-section figures C.VAL_PREPROCESS (0.0) and C.VAL_PREPROCESS_IMAGES.
    """
    from export.vision import ExportValidationError
    from runtime.preprocess import preprocess

    worst, images = 0.0, [*probe_images(paths), *extra]
    convert = vision.get(C.V_CONVERT_RGB, True)
    for i, image in enumerate(images):
        # do_convert_rgb false: transformers raises on a non-RGB image, the runtime converts it.
        given = image if convert or image.mode == "RGB" else image.convert("RGB")
        try:
            ref = processor(images=[given], return_tensors="np")["pixel_values"][0]
        except Exception as e:  # third-party code: one typed line, no traceback
            raise ExportValidationError(
                f"the checkpoint's {type(processor).__name__} fails on validation image {i} "
                f"({image.width}x{image.height} {image.mode}): {e}"
            ) from e
        ours = preprocess(image, vision)
        ref = np.asarray(ref, dtype=np.float32)  # uint8 when it neither rescales nor normalizes
        diff = float(np.abs(ours - ref).max()) if ours.shape == ref.shape else math.inf
        if diff != 0.0:
            raise ExportValidationError(
                f"runtime preprocessing differs from the checkpoint's {type(processor).__name__} "
                f"on validation image {i} ({image.width}x{image.height} {image.mode}): shapes "
                f"{ours.shape} vs {ref.shape}, max |diff| {diff:.3g}; the bundle would compute "
                "other pixels on the device, so the export stops"
            )
        worst = max(worst, diff)
    return {C.VAL_PREPROCESS: worst, C.VAL_PREPROCESS_IMAGES: len(images)}
