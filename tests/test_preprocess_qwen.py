"""runtime.preprocess_qwen against transformers' slow Qwen2VLImageProcessor (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime import contract as C
from runtime.preprocess import ImageError, load_image
from runtime.preprocess_qwen import (
    merged_tokens,
    patchify,
    preprocess_qwen,
    preprocess_qwen_batch,
    preprocess_qwen_fixed,
    smart_resize,
    vision_from_processor,
)

# min/max pixels: the processor's defaults, Qwen2.5-VL's preprocessor_config, a small budget.
BUDGETS = {
    "default": {},
    "qwen2.5": {"min_pixels": 3136, "max_pixels": 12845056},
    "small": {"max_pixels": 256 * 28 * 28},
}
# (W, H) the photos are PIL-resized to first (None: as stored): squares, landscape, a tall strip,
# ~2 megapixels, tiny ones the processor upscales to min_pixels.
SIZES = [None, (448, 448), (1008, 1008), (640, 480), (480, 1280), (1632, 1224), (30, 40), (5, 7)]


def _processor(**kwargs):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(**kwargs)


def _vision(processor) -> dict:
    return json.loads(json.dumps(vision_from_processor(processor.to_dict())))  # as shipped


def _assert_same(image: Image.Image, processor, vision: dict, what: str = "") -> np.ndarray:
    ref = processor(images=image, return_tensors="np")
    pixels, grid = preprocess_qwen(image, vision)
    assert pixels.dtype == ref["pixel_values"].dtype == np.float32, what
    assert np.array_equal(pixels, ref["pixel_values"]), what  # bit-exact
    assert grid.dtype == np.int64 and np.array_equal(grid, ref["image_grid_thw"]), what
    return grid


@pytest.fixture(scope="module")
def photos(photo_paths: list[Path]) -> list[tuple[str, Image.Image]]:
    out = []
    for path in photo_paths:
        image = load_image(path)
        for size in SIZES:
            sized = image if size is None else image.resize(size, Image.Resampling.BICUBIC)
            out.append((f"{path.name} {sized.width}x{sized.height}", sized))
    return out


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_bit_exact_on_real_photos(budget: str, photos: list) -> None:
    processor = _processor(**BUDGETS[budget])
    vision = _vision(processor)
    grids = {name: _assert_same(image, processor, vision, name) for name, image in photos}
    if budget == "small":  # every grid within the budget: at most 256 merged tokens
        assert all(merged_tokens(g, 2)[0] <= 256 for g in grids.values())


def test_flags_and_other_settings(photo_paths: list[Path]) -> None:
    image = load_image(photo_paths[0])
    for kwargs in (
        {"do_rescale": False},
        {"do_normalize": False},
        {"image_mean": 0.5, "image_std": 0.25},  # scalars broadcast as [x] * 3
        {"resample": Image.Resampling.BILINEAR},
        {"rescale_factor": 1 / 127.5, "image_mean": [0, 1, 1], "image_std": [1, 1, 2]},
    ):
        processor = _processor(**kwargs)
        _assert_same(image, processor, _vision(processor), str(kwargs))
    # do_resize false: an image already made of 28 px blocks passes through at its size
    processor = _processor(do_resize=False)
    square = image.resize((448, 336))
    assert _assert_same(square, processor, _vision(processor)).tolist() == [[1, 24, 32]]
    # both steps off: the processor returns uint8 patches, the runtime the same values as float32
    processor = _processor(do_rescale=False, do_normalize=False)
    ref = processor(images=image, return_tensors="np")["pixel_values"]
    ours, _ = preprocess_qwen(image, _vision(processor))
    assert ref.dtype == np.uint8 and np.array_equal(ours, ref.astype(np.float32))


def test_batch_matches_processor(photo_paths: list[Path]) -> None:
    processor = _processor()
    ref = processor(images=[load_image(p) for p in photo_paths], return_tensors="np")
    pixels, grid = preprocess_qwen_batch(photo_paths, _vision(processor))
    assert np.array_equal(pixels, ref["pixel_values"]) and grid.shape == (len(photo_paths), 3)
    assert np.array_equal(grid, ref["image_grid_thw"])
    assert merged_tokens(grid, 2).sum() * 4 == len(pixels)


def test_patch_order_is_merge_interleaved() -> None:
    # 56x28 image, 14 px patches, merge 2: rows go (0,0) (0,1) (1,0) (1,1), then the next block.
    x = np.arange(28 * 56 * 3, dtype=np.float32).reshape(28, 56, 3)
    pixels, grid = patchify(x, 14, 2, 2)
    assert pixels.shape == (8, 3 * 2 * 14 * 14) and grid.tolist() == [[1, 2, 4]]
    row = pixels[1].reshape(3, 2, 14, 14)  # (C, T, P, P): patch row 0, column 1
    assert np.array_equal(row[:, 0], x[0:14, 14:28].transpose(2, 0, 1))
    assert np.array_equal(row[:, 0], row[:, 1])  # the still image repeated along time
    assert np.array_equal(pixels[2].reshape(3, 2, 14, 14)[:, 0], x[14:28, 0:14].transpose(2, 0, 1))
    assert np.array_equal(pixels[4].reshape(3, 2, 14, 14)[:, 0], x[0:14, 28:42].transpose(2, 0, 1))


@settings(max_examples=400, deadline=None)
@given(
    height=st.integers(1, 20000),
    width=st.integers(1, 20000),
    factor=st.sampled_from([28, 32, 14]),
    min_pixels=st.integers(0, 4_000_000),
    max_pixels=st.integers(1, 16_000_000),
)
@example(height=10, width=2500, factor=28, min_pixels=3136, max_pixels=1003520)  # 250:1
@example(height=5, width=5, factor=28, min_pixels=0, max_pixels=1003520)  # zero size
@example(height=4000, width=3000, factor=28, min_pixels=3136, max_pixels=1003520)  # shrinks
def test_smart_resize_matches_transformers(height, width, factor, min_pixels, max_pixels) -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf

    try:
        ref = hf(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError:
        with pytest.raises(ImageError, match="aspect ratio"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    if min(ref) < 1:  # transformers returns a zero size (then fails in the resize)
        with pytest.raises(ImageError, match="min_pixels"):
            smart_resize(height, width, factor, min_pixels, max_pixels)
        return
    assert smart_resize(height, width, factor, min_pixels, max_pixels) == ref


def test_aspect_ratio_and_tiny_images_refused() -> None:
    processor = _processor()
    vision = _vision(processor)
    strip = Image.new("RGB", (2010, 10))  # 201:1
    with pytest.raises(ValueError, match="aspect ratio"):
        processor(images=strip)
    with pytest.raises(ImageError, match=r"aspect ratio of 201\.0.*crop it"):
        preprocess_qwen(strip, vision)
    assert smart_resize(10, 2000) == (28, 812)  # 200:1 still passes (upscaled to min_pixels)
    # 3 px tall: transformers reads it channels-first and returns a transposed grid; refused here
    flat = Image.new("RGB", (5, 3))
    assert processor(images=flat, return_tensors="np")["image_grid_thw"].tolist() == [[1, 6, 4]]
    with pytest.raises(ImageError, match=r"under 4 px.*upscale"):
        preprocess_qwen(flat, vision)
    with pytest.raises(ImageError, match="min_pixels"):
        smart_resize(5, 5, min_pixels=0)


def test_fixed_size(photo_paths: list[Path]) -> None:
    processor = _processor()
    vision = _vision(processor)
    image = load_image(photo_paths[0])
    pixels, grid = preprocess_qwen_fixed(image, vision, (448, 448))
    assert pixels.shape == (1024, 1176) and grid.tolist() == [[1, 32, 32]]
    assert merged_tokens(grid, 2).tolist() == [256]
    # = the processor on the image PIL-resized to 448x448 first (which it then keeps)
    ref = processor(images=image.resize((448, 448), Image.Resampling.BICUBIC), return_tensors="np")
    assert np.array_equal(pixels, ref["pixel_values"])
    wide, grid = preprocess_qwen_fixed(image, vision, (336, 672))
    assert wide.shape == (1152, 1176) and grid.tolist() == [[1, 24, 48]]
    # the manifest's fixed_size does the same
    assert np.array_equal(preprocess_qwen(image, {**vision, C.V_FIXED_SIZE: [448, 448]})[0], pixels)
    with pytest.raises(ValueError, match="multiples of 28"):
        preprocess_qwen_fixed(image, vision, (448, 440))


def test_unmodelled_options_refused() -> None:
    options = _processor().to_dict()
    with pytest.raises(ValueError, match="use_fast=False"):
        vision_from_processor({**options, "image_processor_type": "Qwen2VLImageProcessorFast"})
    with pytest.raises(ValueError, match="std != 0"):
        vision_from_processor({**options, "image_std": [1, 0, 1]})
    with pytest.raises(ValueError, match="do_center_crop"):
        vision_from_processor({**options, "do_center_crop": True})
    with pytest.raises(ValueError, match=r"lack.*min_pixels"):
        vision_from_processor({k: v for k, v in options.items() if k != "min_pixels"})
    vision = vision_from_processor(options)
    image = Image.new("RGB", (64, 64))
    for extra in ({C.V_PAD: C.PAD_SQUARE}, {C.V_CROP: C.CROP_CENTER}, {C.V_RESIZE: 336}):
        with pytest.raises(ValueError, match=r"not one runtime\.preprocess_qwen reproduces"):
            preprocess_qwen(image, {**vision, **extra})
    with pytest.raises(ValueError, match=r"not one runtime\.preprocess_qwen"):
        preprocess_qwen(image, {**vision, C.V_PROCESSOR: "CLIPImageProcessor"})
    with pytest.raises(ValueError, match="lacks merge_size"):
        preprocess_qwen(image, {k: v for k, v in vision.items() if k != C.V_MERGE_SIZE})
    with pytest.raises(ImageError, match="expected a PIL image"):
        preprocess_qwen(np.zeros((64, 64, 3), np.uint8), vision)
