"""runtime.preprocess against transformers' slow image processors (the reference), plus inputs."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import contract as C
from runtime.preprocess import (
    ImageError,
    center_crop,
    load_image,
    preprocess,
    preprocess_batch,
    resize_size,
    to_rgb,
)

from .conftest import REPO, SHARED

TOL = 1e-5
# Portrait, greyscale (mode L), very wide (640x218) and small (333x500) COCO photos.
COCO = ["000000000009", "000000000072", "000000000086", "000000000357", "000000000474"]


@pytest.fixture(scope="module", params=["clip", "siglip"])
def tower(request: pytest.FixtureRequest) -> tuple[str, object, dict]:
    """(name, transformers processor, manifest vision section as the bundle stores it)."""
    from transformers import AutoImageProcessor

    from export.load import load_llava
    from export.manifest import vision_section

    ckpt = request.getfixturevalue(f"tiny_{request.param}")
    proc = AutoImageProcessor.from_pretrained(ckpt, use_fast=False, local_files_only=True)
    vision = json.loads(json.dumps(vision_section(load_llava(ckpt), proc)))  # via JSON, as shipped
    return request.param, proc, vision


def _reference(proc, images: list[Image.Image]) -> np.ndarray:
    return proc(images=images, return_tensors="np")["pixel_values"]


def _photos(photo_paths: list[Path]) -> list[Path]:
    coco = [SHARED / "coco128" / "images" / "train" / f"{n}.jpg" for n in COCO]
    return [*photo_paths, *coco]


def test_parity_on_real_photos(tower, photo_paths: list[Path]) -> None:
    from transformers.image_utils import load_image as hf_load_image

    _, proc, vision = tower
    paths = _photos(photo_paths)
    ref = _reference(proc, [hf_load_image(str(p)) for p in paths])
    ours = preprocess_batch(paths, vision)
    assert ours.shape == ref.shape == (len(paths), 3, 336, 336) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOL


def _orientation_jpeg(path: Path, photo: Path) -> Image.Image:
    """Write `photo` (cropped non-square) as a JPEG tagged orientation 6; return stored pixels."""
    stored = Image.open(photo).convert("RGB").crop((0, 0, 300, 180))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    stored.save(path, quality=95, exif=exif)
    return Image.open(path).convert("RGB")


def test_exif_orientation_applied(tower, photo_paths: list[Path], tmp_path: Path) -> None:
    # transformers' processors ignore EXIF on a PIL image; its load_image (what pipelines use)
    # transposes, and so does the runtime, deliberately: phones store photos sideways.
    from transformers.image_utils import load_image as hf_load_image

    _, proc, vision = tower
    path = tmp_path / "rotated.jpg"
    stored = _orientation_jpeg(path, photo_paths[0])
    upright = load_image(path)
    assert upright.size == (180, 300)
    expected = stored.transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(upright), np.asarray(expected))
    ref = _reference(proc, [hf_load_image(str(path))])[0]
    assert np.abs(preprocess(upright, vision) - ref).max() <= TOL


def _odd_modes(photo: Path) -> dict[str, Image.Image]:
    rgb = Image.open(photo).convert("RGB").resize((320, 240))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    palette = rgb.quantize(64)
    palette.info["transparency"] = 0
    return {
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "RGBA": rgba,
        "P": palette,
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
    }


def test_modes_match_transformers(tower, photo_paths: list[Path], tmp_path: Path) -> None:
    name, proc, vision = tower
    for mode, image in _odd_modes(photo_paths[0]).items():
        ours = preprocess(image, vision)
        assert ours.shape == (3, 336, 336) and np.isfinite(ours).all(), mode
        # CLIP converts any PIL mode itself; SigLIP (do_convert_rgb null) needs RGB given, and
        # transformers' convert_to_rgb is exactly PIL convert("RGB").
        given = image if name == "clip" else image.convert("RGB")
        assert np.abs(ours - _reference(proc, [given])[0]).max() <= TOL, mode
        # Through a file too: load_image returns RGB with the same pixels.
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        image.save(path)
        loaded = load_image(path)
        assert loaded.mode == "RGB"
        stored = Image.open(path)
        assert np.array_equal(np.asarray(loaded), np.asarray(stored.convert("RGB"))), mode


def test_alpha_is_dropped_not_composited() -> None:
    # transformers 4.57 convert_to_rgb is PIL convert("RGB"): colour kept, alpha ignored.
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)


def test_16bit_grey_is_scaled_not_clipped(tower, tmp_path: Path) -> None:
    # PIL (and so transformers) clips 16-bit grey to 255, whitening the photo; we scale by 1/257.
    _, proc, vision = tower
    wide = (np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = load_image(path)
    grey = np.rint(wide / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(loaded)[..., 0], grey)
    assert (np.asarray(Image.open(path).convert("L")) == 255).mean() > 0.99  # PIL's clipping
    ref = _reference(proc, [Image.fromarray(grey).convert("RGB")])[0]
    ours = preprocess(Image.open(path), vision)
    assert ours.shape == (3, 336, 336) and np.abs(ours - ref).max() <= TOL


def test_resize_and_crop_follow_transformers() -> None:
    from transformers.image_transforms import center_crop as hf_crop
    from transformers.image_transforms import get_resize_output_image_size

    rng = np.random.default_rng(0)
    for h, w in [(480, 640), (640, 427), (218, 640), (337, 335), (1, 999), (336, 336), (500, 333)]:
        dummy = np.zeros((h, w, 3), np.uint8)
        ref = get_resize_output_image_size(
            dummy, 336, default_to_square=False, input_data_format="channels_last"
        )
        assert resize_size(h, w, 336) == tuple(ref), (h, w)
    for h, w, ch, cw in [(336, 448, 336, 336), (337, 500, 336, 336), (300, 200, 336, 336)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = hf_crop(pixels, (ch, cw), input_data_format="channels_last")
        assert np.array_equal(center_crop(pixels, ch, cw), ref), (h, w)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that only claims its size: signature, IHDR, IEND (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_unusable_files_raise_image_error(tmp_path: Path, photo_paths: list[Path]) -> None:
    jpeg = next(p for p in photo_paths if p.suffix == ".jpg").read_bytes()
    cases = {
        "missing.jpg": (None, "does not exist"),
        "empty.jpg": (b"", "empty"),
        "notes.jpg": (b"just some text, not pixels\n" * 10, "not a readable image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "not a readable image"),
        "bomb.png": (_png_header(100_000, 100_000), "too large"),
        "big.png": (_png_header(10_000, 10_000), "10000x10000 = 100.0 megapixels"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ImageError, match=words) as info:
            load_image(path)
        message = str(info.value)
        assert name in message and ("pass" in message or "downscale" in message), message
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="raise max_pixels"):
        load_image(photo_paths[0], max_pixels=1000)  # a real photo over a lowered limit


def test_api_errors_and_batch(tower, photo_paths: list[Path]) -> None:
    _, _, vision = tower
    batch = preprocess_batch([load_image(p) for p in photo_paths[:2]], vision)
    assert batch.shape == (2, 3, 336, 336) and batch.dtype == np.float32
    with pytest.raises(ImageError, match="at least one"):
        preprocess_batch([], vision)
    with pytest.raises(ImageError, match="PIL image"):
        preprocess(np.zeros((8, 8, 3), np.uint8), vision)  # type: ignore[arg-type]
    partial = {k: v for k, v in vision.items() if k != C.V_IMAGE_MEAN}
    with pytest.raises(ValueError, match=C.V_IMAGE_MEAN):
        preprocess(Image.new("RGB", (8, 8)), partial)


def test_png_bytes_round_trip(tower) -> None:
    # An in-memory image (no file) goes straight to preprocess.
    _, proc, vision = tower
    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buf, "PNG")
    image = Image.open(io.BytesIO(buf.getvalue()))
    assert (
        np.abs(preprocess(image, vision) - _reference(proc, [image.convert("RGB")])[0]).max() <= TOL
    )


def test_import_pulls_no_torch() -> None:
    code = (
        "import sys, runtime.preprocess\n"
        "print(','.join(m for m in ('torch', 'transformers', 'optimum', 'svdprune_onnx', 'export')"
        " if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"runtime.preprocess imported {proc.stdout.strip()}"
