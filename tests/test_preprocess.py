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

TOL = 0.0  # bit-exact: same ops, same dtypes, same order as transformers
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


# --- every modelled processor option (export/processor.py) vs the real HF processor -----------

OPENAI = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954] * 3}
CLIP15 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, **OPENAI}
SQUARE = {"size": {"height": 336, "width": 336}}
# name -> (processor class, options): each one flag (or value) away from a released config.
VARIANTS = {
    "clip-llava15": ("CLIPImageProcessor", CLIP15),
    "clip-no-center-crop": ("CLIPImageProcessor", {**CLIP15, **SQUARE, "do_center_crop": False}),
    "clip-no-resize": ("CLIPImageProcessor", {**CLIP15, "do_resize": False}),
    "clip-no-rescale": ("CLIPImageProcessor", {**CLIP15, "do_rescale": False}),
    "clip-no-normalize": ("CLIPImageProcessor", {**CLIP15, "do_normalize": False}),
    "clip-neither": ("CLIPImageProcessor", {**CLIP15, "do_rescale": False, "do_normalize": False}),
    "clip-no-convert-rgb": ("CLIPImageProcessor", {**CLIP15, "do_convert_rgb": False}),
    "clip-resize-384-crop-336": ("CLIPImageProcessor", {**CLIP15, "size": [384, 384]}),
    "clip-size-int": ("CLIPImageProcessor", {**CLIP15, "size": 336, "crop_size": 336}),
    "clip-nearest": ("CLIPImageProcessor", {**CLIP15, "resample": 0}),
    "clip-lanczos": ("CLIPImageProcessor", {**CLIP15, "resample": 1}),
    "clip-bilinear": ("CLIPImageProcessor", {**CLIP15, "resample": 2}),
    "clip-box": ("CLIPImageProcessor", {**CLIP15, "resample": 4}),
    "clip-hamming": ("CLIPImageProcessor", {**CLIP15, "resample": 5}),
    "clip-rescale-half": ("CLIPImageProcessor", {**CLIP15, "rescale_factor": 0.5}),
    "llava-pad": ("LlavaImageProcessor", {**CLIP15, "do_pad": True}),
    "llava-no-pad": ("LlavaImageProcessor", CLIP15),
    "llava-pad-no-crop": (
        "LlavaImageProcessor",
        {**CLIP15, "do_pad": True, "do_center_crop": False},
    ),
    "llava-pad-no-normalize": (
        "LlavaImageProcessor",
        {**CLIP15, "do_pad": True, "do_normalize": False},
    ),
    "llava-pad-square-resize": ("LlavaImageProcessor", {**CLIP15, **SQUARE, "do_pad": True}),
    "siglip": ("SiglipImageProcessor", {**SQUARE, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
    "siglip-convert-rgb": ("SiglipImageProcessor", {**SQUARE, "do_convert_rgb": True}),
    "siglip-scalar-mean": ("SiglipImageProcessor", {**SQUARE, "image_mean": 0.5, "image_std": 0.5}),
    "siglip-no-rescale": ("SiglipImageProcessor", {**SQUARE, "do_rescale": False}),
    "siglip-bilinear-no-normalize": (
        "SiglipImageProcessor",
        {**SQUARE, "resample": 2, "do_normalize": False},
    ),
}


def _processor(name: str, options: dict):
    import transformers

    return getattr(transformers, name)(**options)


def _probe_images(photo_paths: list[Path]) -> list[Image.Image]:
    """Real photos as stored (landscape, portrait, very wide, small, greyscale L) plus a greyscale
    and an RGBA (alpha from its grey) built from a real photo."""
    images = []
    for path in _photos(photo_paths):
        with Image.open(path) as im:
            im.load()
            images.append(im.copy())
    portrait = images[0].transpose(Image.Transpose.TRANSPOSE)
    rgba = portrait.convert("RGBA")
    rgba.putalpha(portrait.convert("L"))
    return [*images, portrait.convert("L"), rgba]


@pytest.fixture(scope="module")
def probe_images(photo_paths: list[Path]) -> list[Image.Image]:
    images = _probe_images(photo_paths)
    assert {im.mode for im in images} == {"RGB", "L", "RGBA"}
    assert {im.width > im.height for im in images} == {True, False}  # both orientations
    return images


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_option_matches_transformers(variant: str, probe_images) -> None:
    from export.processor import preprocessing_facts

    cls, options = VARIANTS[variant]
    proc = _processor(cls, options)
    vision = json.loads(json.dumps(preprocessing_facts(proc, [336, 336])))  # as shipped
    assert vision[C.V_PROCESSOR] == cls and vision[C.V_IMAGE_SIZE] == [336, 336]
    for image in probe_images:
        # do_convert_rgb false: transformers raises on non-RGB input, the runtime converts it.
        given = image if vision[C.V_CONVERT_RGB] else image.convert("RGB")
        ref = np.asarray(_reference(proc, [given])[0], dtype=np.float32)
        ours = preprocess(image, vision)
        assert ours.shape == ref.shape == (3, 336, 336) and ours.dtype == np.float32
        assert np.abs(ours - ref).max() == 0.0, (variant, image.size, image.mode)


def test_manifest_records_each_flag() -> None:
    from export.processor import preprocessing_facts

    def facts(name: str) -> dict:
        return preprocessing_facts(_processor(*VARIANTS[name]), [336, 336])

    plain = facts("clip-llava15")
    assert plain[C.V_PAD] == C.PAD_NONE and plain[C.V_PAD_COLOR] is None
    assert plain[C.V_RESIZE] == 336 and plain[C.V_RESIZE_SIZE] is None
    assert plain[C.V_CROP] == C.CROP_CENTER and plain[C.V_DO_RESIZE] is True
    assert plain[C.V_RESCALE] == 1 / 255 and plain[C.V_IMAGE_MEAN] == OPENAI["image_mean"]
    # LLaVA-1.5's expand2square fill: tuple(int(x * 255) for x in image_mean).
    assert facts("llava-pad")[C.V_PAD_COLOR] == [122, 116, 104]
    assert facts("llava-pad")[C.V_PAD] == C.PAD_SQUARE
    assert facts("clip-no-center-crop")[C.V_RESIZE_SIZE] == [336, 336]
    assert facts("clip-resize-384-crop-336")[C.V_RESIZE_SIZE] == [384, 384]
    assert facts("clip-no-resize")[C.V_DO_RESIZE] is False
    off = facts("clip-neither")  # effective values: exact no-ops on the pixels
    assert off[C.V_RESCALE] == 1.0 and not off[C.V_DO_RESCALE]
    assert off[C.V_IMAGE_MEAN] == [0.0] * 3 and off[C.V_IMAGE_STD] == [1.0] * 3
    assert facts("siglip")[C.V_CONVERT_RGB] is False  # do_convert_rgb null
    assert facts("siglip-scalar-mean")[C.V_IMAGE_MEAN] == [0.5] * 3


def _expand2square(pil_img: Image.Image, background_color: tuple) -> Image.Image:
    # LLaVA-1.5's original (llava/mm_utils.py), verbatim.
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def test_pad_is_llava15_expand2square(probe_images) -> None:
    # The original recipe: expand2square with the mean colour, then CLIPImageProcessor.
    from export.processor import preprocessing_facts

    clip = _processor(*VARIANTS["clip-llava15"])
    vision = preprocessing_facts(_processor(*VARIANTS["llava-pad"]), [336, 336])
    fill = tuple(int(x * 255) for x in clip.image_mean)
    for image in probe_images:
        rgb = image.convert("RGB")
        ref = _reference(clip, [_expand2square(rgb, fill)])[0]
        assert np.abs(preprocess(image, vision) - ref).max() == 0.0, image.size


def test_pad_to_square_follows_transformers() -> None:
    from transformers import LlavaImageProcessor

    from runtime.preprocess import pad_to_square

    rng = np.random.default_rng(0)
    hf = LlavaImageProcessor()
    for h, w in [(3, 8), (8, 3), (4, 7), (7, 4), (5, 5), (1, 6), (218, 640)]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = hf.pad_to_square(pixels, (122, 116, 104), input_data_format="channels_last")
        ours = pad_to_square(pixels, (122, 116, 104))
        assert ours.dtype == np.uint8 and np.array_equal(ours, ref), (h, w)


def test_older_manifests_keep_their_meaning(tower, photo_paths: list[Path]) -> None:
    # A bundle written before the preprocessing keys existed computes the same pixels.
    _, _, vision = tower
    new = {
        C.V_PROCESSOR, C.V_CONVERT_RGB, C.V_PAD, C.V_PAD_COLOR, C.V_DO_RESIZE, C.V_RESIZE_SIZE,
        C.V_DO_RESCALE, C.V_DO_NORMALIZE,
    }  # fmt: skip
    old = {k: v for k, v in vision.items() if k not in new}
    paths = _photos(photo_paths)
    assert np.array_equal(preprocess_batch(paths, old), preprocess_batch(paths, vision))


def test_runtime_refuses_what_it_cannot_compute(tower, photo_paths: list[Path]) -> None:
    _, _, vision = tower
    image = load_image(photo_paths[0])
    for key, value in ((C.V_PAD, "reflect"), (C.V_CROP, "random")):
        with pytest.raises(ValueError, match=f"{key} is '{value}'.*update runtime"):
            preprocess(image, {**vision, key: value})
    # Shortest edge without a crop (an older exporter allowed it): each photo its own size.
    loose = {**vision, C.V_RESIZE: 336, C.V_RESIZE_SIZE: None, C.V_CROP: C.CROP_NONE}
    with pytest.raises(ImageError, match="not the 336x336 the vision graph takes"):
        preprocess(image, loose)
    # A padded square is bounded like the resize: a 20000x1 strip would pad to 400 megapixels.
    padded = {**vision, C.V_PAD: C.PAD_SQUARE, C.V_PAD_COLOR: [0, 0, 0]}
    with pytest.raises(ImageError, match="pads to 20000x20000"):
        preprocess(Image.new("RGB", (20000, 1)), padded)


def test_export_check_catches_other_pixels(photo_paths: list[Path]) -> None:
    from export.processor import check_runtime_pixels, preprocessing_facts
    from export.vision import ExportValidationError

    proc = _processor(*VARIANTS["llava-pad"])
    vision = preprocessing_facts(proc, [336, 336])
    report = check_runtime_pixels(proc, vision, photo_paths)
    assert report == {C.VAL_PREPROCESS: 0.0, C.VAL_PREPROCESS_IMAGES: 4 * len(photo_paths)}
    for key, value in ((C.V_PAD, C.PAD_NONE), (C.V_PAD_COLOR, [0, 0, 0]), (C.V_RESAMPLE, 2)):
        with pytest.raises(ExportValidationError, match="differs from the checkpoint's Llava"):
            check_runtime_pixels(proc, {**vision, key: value}, photo_paths[:1])


def test_llava_pad_checkpoint_exports(tiny_clip: Path, photo_paths: list[Path], tmp_path: Path):
    """A checkpoint with LLaVA-1.5's original preprocessing (LlavaImageProcessor, do_pad)
    exports, and the bundle's runtime pixels equal the checkpoint's processor."""
    import shutil

    from transformers import AutoImageProcessor

    from export.__main__ import cli

    ckpt = tmp_path / "llava-pad"
    shutil.copytree(tiny_clip, ckpt)
    cfg_path = ckpt / C.HF_PREPROCESSOR_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg.update(image_processor_type="LlavaImageProcessor", do_pad=True)
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "bundle"
    assert cli(["-m", str(ckpt), "--k", "16", "-o", str(out)]) == 0
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    vision = manifest[C.KEY_VISION]
    assert vision[C.V_PROCESSOR] == "LlavaImageProcessor" and vision[C.V_PAD] == C.PAD_SQUARE
    assert vision[C.V_PAD_COLOR] == [122, 116, 104]
    assert manifest[C.KEY_VALIDATION][C.VAL_PREPROCESS] == 0.0
    # 4 variants of each photo, plus the self-test's photos (one per image it stores)
    extra = manifest[C.KEY_SELFTEST][C.S_IMAGES]
    assert manifest[C.KEY_VALIDATION][C.VAL_PREPROCESS_IMAGES] == 4 * len(photo_paths) + extra
    proc = AutoImageProcessor.from_pretrained(out, use_fast=False, local_files_only=True)
    assert type(proc).__name__ == "LlavaImageProcessor" and proc.do_pad
    images = [load_image(p) for p in _photos(photo_paths)]
    ours = preprocess_batch(images, vision)
    assert np.abs(ours - _reference(proc, images)).max() == 0.0
