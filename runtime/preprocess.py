"""Image loading and pixel preprocessing for the runtime, with numpy and Pillow only.

`preprocess` reproduces transformers' slow CLIPImageProcessor, LlavaImageProcessor and
SiglipImageProcessor (4.57) bit for bit from the manifest's vision section, in their order: PIL
`convert("RGB")`; LlavaImageProcessor's pad to a square of the mean colour (uint8, offset floored);
PIL resize of the uint8 image (`reducing_gap=None`) to the shortest edge or to [H, W], or none;
numpy center crop (zero-padding a smaller image); rescale in float64 cast to float32 (factor 1.0
when the processor does not rescale: the same float32 values as its plain cast); `(x - mean) / std`
in float32 (0 / 1 when it does not normalize); HWC -> CHW. The export checks these pixels against
the checkpoint's own processor (export/processor.py) and refuses any flag not modelled here.
Deliberate differences, all in `load_image` / `to_rgb` / `preprocess`: EXIF orientation is applied
(as `transformers.image_utils.load_image` does, but not the processors when handed a PIL image),
16-bit greyscale is scaled to 8 bits (PIL's convert clips it to 255), any mode is converted to RGB
even when the processor has do_convert_rgb false (transformers raises on such input there), and
an image whose padded square or resize would exceed MAX_PIXELS is refused.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from runtime import contract as C

MAX_PIXELS = 64_000_000  # default decompression-bomb limit for load_image (64 megapixels)
FORMATS = "a JPEG/PNG/WebP file"
# Integer greyscale modes holding 16-bit samples (older Pillow decodes 16-bit PNG as "I").
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What Pillow's decoders raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError, struct.error)
_REQUIRED = (C.V_IMAGE_SIZE, C.V_RESAMPLE, C.V_RESCALE, C.V_IMAGE_MEAN, C.V_IMAGE_STD)
_CROPS = (C.CROP_CENTER, C.CROP_NONE)  # the last is the default of an absent key
_PADS = (C.PAD_SQUARE, C.PAD_NONE)

PathLike = str | os.PathLike


class ImageError(ValueError):
    """An image the runtime cannot use; the message says what to pass instead."""


def _too_big(path: Path, size: tuple[int, int], limit: int) -> ImageError:
    w, h = size
    return ImageError(
        f"{path} is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the max_pixels limit of "
        f"{limit / 1e6:.1f} (decompression-bomb guard); downscale it (e.g. to 4096 px on the long "
        "side) or, if you trust the file, raise max_pixels"
    )


def load_image(path: PathLike, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied; ImageError if unusable.

    max_pixels: refuse images with more pixels than this (decompression bombs); None keeps only
    Pillow's own hard limit (2 × PIL.Image.MAX_IMAGE_PIXELS).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image {path} does not exist; pass an existing file ({FORMATS})")
    if not path.is_file():
        raise ImageError(f"{path} is not a file (a folder?); pass {FORMATS}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes); pass {FORMATS}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS; our own max_pixels decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise _too_big(path, im.size, max_pixels)
                im.load()  # decodes now: truncated / corrupt data fails here
                image = _upright(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's hard limit, 2 × MAX_IMAGE_PIXELS
        raise ImageError(
            f"{path} is too large to decode safely ({e}); downscale it, or if you trust the file "
            "raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels"
        ) from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{path} is not a readable image ({e}); pass {FORMATS}") from e
    return to_rgb(image)


def _upright(image: Image.Image) -> Image.Image:
    # A loaded copy with the EXIF orientation applied; unreadable EXIF keeps the stored pixels.
    try:
        return ImageOps.exif_transpose(image)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB exactly as transformers' `convert_to_rgb` (PIL convert) except for 16-bit greyscale.

    PIL convert drops alpha (RGBA, LA, P with transparency: no compositing, like transformers
    4.57), maps CMYK naively and greys L. 16-bit greyscale ("I;16", "I") would be clipped to 255
    by PIL, whitening a normal 16-bit photo, so it is scaled instead: round(v / 257).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY:
        wide = np.asarray(image, dtype=np.float64)  # (H, W) in [0, 65535]
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        return image.convert("RGB")


def resize_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(H, W) after scaling the shortest edge to `shortest_edge`, exactly as transformers'
    `get_resize_output_image_size(default_to_square=False)` (long edge truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def pad_to_square(pixels: np.ndarray, color: Sequence[int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (m, m, 3), m = max(h, w): the image centred on `color`, offset floored,
    exactly as transformers' LlavaImageProcessor.pad_to_square (LLaVA-1.5's expand2square)."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    m = max(h, w)
    out = np.empty((m, m, pixels.shape[2]), dtype=pixels.dtype)
    out[...] = np.asarray(color, dtype=pixels.dtype)
    if w > h:
        top = (m - h) // 2
        out[top : top + h] = pixels
    else:
        left = (m - w) // 2
        out[:, left : left + w] = pixels
    return out


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, c) -> (height, width, c) with transformers' offsets; zero-pads a smaller image."""
    h, w = pixels.shape[:2]
    if h < height or w < width:  # transformers pads with zeros, centred (ceil on the top/left)
        ph, pw = max(height, h), max(width, w)
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
        padded = np.zeros((ph, pw, *pixels.shape[2:]), dtype=pixels.dtype)
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, ph, pw
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


def _vision_facts(vision: Mapping) -> Mapping:
    missing = [k for k in _REQUIRED if k not in vision]
    if missing:
        raise ValueError(
            f"manifest {C.KEY_VISION} section lacks {', '.join(missing)}; "
            "re-export the bundle with this version of svdprune-onnx"
        )
    for key, allowed in ((C.V_CROP, _CROPS), (C.V_PAD, _PADS)):
        if vision.get(key, allowed[-1]) not in allowed:
            raise ValueError(
                f"manifest {C.KEY_VISION}.{key} is {vision[key]!r}, not one of {allowed}: a bundle "
                "from a newer exporter; update runtime/ or re-export the bundle"
            )
    return vision


def _resize_target(height: int, width: int, v: Mapping) -> tuple[int, int]:
    # (H, W) the image is resized to: shortest edge, an exact size, or (older bundles) image_size.
    shortest = v.get(C.V_RESIZE)
    if shortest:
        return resize_size(height, width, int(shortest))
    exact = v.get(C.V_RESIZE_SIZE) or v[C.V_IMAGE_SIZE]
    return int(exact[0]), int(exact[1])


def _guard(what: str, size: tuple[int, int], image: Image.Image) -> None:
    # A 1x20000 strip would resize to 336x6720000 (6.8 GB) or pad to 20000x20000.
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageError(
            f"a {image.width}x{image.height} image {what} {size[1]}x{size[0]} = "
            f"{size[0] * size[1] / 1e6:.0f} megapixels (aspect ratio too extreme, limit "
            f"{MAX_PIXELS / 1e6:.0f}); crop it closer to square first"
        )


def preprocess(image: Image.Image, vision: Mapping) -> np.ndarray:
    """(3, H, W) float32 pixel_values for one PIL image, from the manifest's vision section."""
    if not isinstance(image, Image.Image):
        raise ImageError(
            f"expected a PIL image, got {type(image).__name__}; "
            "use load_image(path) or PIL.Image.fromarray(array)"
        )
    v = _vision_facts(vision)
    height, width = (int(s) for s in v[C.V_IMAGE_SIZE])
    rgb = to_rgb(image)  # also for do_convert_rgb false: transformers raises on non-RGB there
    if v.get(C.V_PAD) == C.PAD_SQUARE:
        side = max(rgb.size)
        _guard("pads to", (side, side), rgb)
        square = pad_to_square(np.asarray(rgb), [int(c) for c in v[C.V_PAD_COLOR]])
        rgb = Image.fromarray(square)  # transformers resizes the padded uint8 array via PIL too
    if v.get(C.V_DO_RESIZE, True):
        size = _resize_target(rgb.height, rgb.width, v)
        _guard("resizes to", size, rgb)
        resample = Image.Resampling(int(v[C.V_RESAMPLE]))
        # PIL takes (W, H); transformers resizes the uint8 RGB image with PIL, reducing_gap=None.
        rgb = rgb.resize((size[1], size[0]), resample=resample)
    pixels = np.asarray(rgb)  # (h, w, 3) uint8
    if v.get(C.V_CROP) == C.CROP_CENTER:
        pixels = center_crop(pixels, height, width)  # (H, W, 3) uint8
    if pixels.shape[:2] != (height, width):  # only a manifest the export would refuse gets here
        raise ImageError(
            f"a {image.width}x{image.height} image preprocesses to {pixels.shape[1]}x"
            f"{pixels.shape[0]}, not the {width}x{height} the vision graph takes (this bundle's "
            f"{C.KEY_VISION} section neither crops nor resizes to a fixed size); re-export it"
        )
    # transformers' rescale: multiply in float64, then cast to float32 (factor 1.0 when the
    # processor does not rescale: the exact float32 cast its normalize would make).
    x = (pixels.astype(np.float64) * float(v[C.V_RESCALE])).astype(np.float32)
    mean = np.asarray(v[C.V_IMAGE_MEAN], dtype=np.float32)  # (3,)
    std = np.asarray(v[C.V_IMAGE_STD], dtype=np.float32)  # (3,)
    x = (x - mean) / std  # (H, W, 3) float32, same op order and dtype as transformers
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)


def preprocess_batch(
    images: Sequence[Image.Image | PathLike], vision: Mapping, max_pixels: int | None = MAX_PIXELS
) -> np.ndarray:
    """(B, 3, H, W) float32 pixel_values; paths are opened with load_image."""
    if len(images) == 0:
        raise ImageError("no images given; pass at least one image or image path")
    pixels = [
        preprocess(im if isinstance(im, Image.Image) else load_image(im, max_pixels), vision)
        for im in images
    ]
    return np.stack(pixels)  # (B, 3, H, W): preprocess gives every image the manifest's size
