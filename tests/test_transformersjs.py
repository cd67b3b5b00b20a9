"""transformers.js (Node) runs our bundles unchanged: its pixels, kept tokens and greedy tokens
equal the runtime's.

    examples/node/package.json + lock ─► npm ci --ignore-scripts ─► build/node-cache/<hash>/ (once)
    tiny CLIP+Llama / SigLIP+Qwen2 x decoder exporter optimum / torch (+ a q4 variant) ─► bundle
    runtime.generate.Pipeline on the real photos ─► prompt ids, pixel_values, token_ids
    node greedy_ids.mjs (one process per bundle, all photos): LlavaForConditionalGeneration
      .from_pretrained + AutoProcessor from the folder ─► token ids          ══ equal
    node agreement.mjs (CLIP, SigLIP; the 131 real photos): examples/node/preprocess.mjs pixels
      ─► the vision graph transformers.js loaded ─► kept_indices          ══ equal, pixels max 0

transformers.js's own image processor resizes with sharp (point-sampled, corner-aligned bicubic),
not PIL, and keeps other tokens (docs/transformersjs.md); examples/node/preprocess.mjs replaces it
with the runtime's preprocessing (PIL's resampling in JS), which answer.mjs and greedy_ids.mjs use.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import tjs_agreement as tjs
from export.__main__ import cli as export_cli
from runtime import contract as C
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import load_image, preprocess
from runtime.session import SessionConfig

TJS_VERSION = "4.3.1"
ORT_NODE_VERSION = "1.30.0"  # its CPU binaries are in the tarball
QUESTION = "What is in the image?"
NEW_TOKENS = 12
EXAMPLE_CASE = "clip-llama-optimum"  # answer.mjs runs on this bundle
# One bundle per tower for the all-photo agreement (the vision graph does not depend on the
# decoder exporter); 3 demo photos + 128 coco128 photos.
AGREEMENT_CASES = ("clip-llama-optimum", "siglip-qwen2-optimum")
ALL_PHOTOS = 131
# Vision-section keys export/manifest.py writes without a runtime/contract.py constant.
VISION_KEYS_OUTSIDE_CONTRACT: set[str] = set()


@dataclass(frozen=True)
class Case:
    name: str
    tower: str  # fixture name: tiny_clip / tiny_siglip
    exporter: str
    k: int
    dtype: str | None = None  # --dtype variant (None: the default fp32 bundle)


CASES = [
    pytest.param(Case("clip-llama-optimum", "tiny_clip", "optimum", 16), id="clip-llama-optimum"),
    pytest.param(Case("clip-llama-torch", "tiny_clip", "torch", 16), id="clip-llama-torch"),
    pytest.param(Case("siglip-qwen2-optimum", "tiny_siglip", "optimum", 16), id="siglip-optimum"),
    # K = 24 is no square: the processor trick must not depend on a square grid.
    pytest.param(Case("siglip-qwen2-torch", "tiny_siglip", "torch", 24), id="siglip-torch-k24"),
    # A q4 variant (MatMulNBits / GatherBlockQuantized graphs, float32 I/O, same file names).
    pytest.param(Case("clip-llama-q4", "tiny_clip", "optimum", 16, dtype="q4"), id="clip-q4"),
]


# --- node + the pinned package, installed once per package.json/lock ------------------------
@pytest.fixture(scope="module")
def node_dir() -> Path:
    """build/node-cache/<hash>/ with node_modules (npm ci --ignore-scripts) and our scripts."""
    try:
        cache = tjs.node_cache()
    except RuntimeError as e:  # node / npm missing or npm ci failed: fail, do not skip
        pytest.fail(f"{e} (the transformers.js test needs them; CI has them)")
    pkg = cache / "node_modules" / "@huggingface" / "transformers" / "package.json"
    assert json.loads(pkg.read_text())["version"] == TJS_VERSION
    ort_pkg = cache / "node_modules" / "onnxruntime-node" / "package.json"
    assert json.loads(ort_pkg.read_text())["version"] == ORT_NODE_VERSION  # the lock's pin
    return cache


def run_node(node_dir: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return tjs.run_node(node_dir, *args)
    except RuntimeError as e:
        pytest.fail(str(e))


def node_module(node_dir: Path, source: str) -> str:
    """stdout of an inline ES module run beside node_modules (imports './preprocess.mjs')."""
    return run_node(node_dir, "--input-type=module", "-e", source).stdout


# --- bundles -------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=CASES)
def case_bundle(request, tmp_path_factory) -> tuple[Case, Path]:
    case: Case = request.param
    ckpt = request.getfixturevalue(case.tower)
    out = tmp_path_factory.mktemp("tjs") / case.name
    argv = ["-m", str(ckpt), "--k", str(case.k), "--decoder-exporter", case.exporter]
    argv += ["--dtype", case.dtype] if case.dtype else []
    assert export_cli([*argv, "-o", str(out)]) == 0
    return case, out


def test_side_files_follow_transformersjs(case_bundle: tuple[Case, Path]) -> None:
    """config.json / processor_config.json as transformers.js reads them; cache axes it resolves."""
    case, bundle = case_bundle
    cfg = json.loads((bundle / C.HF_CONFIG).read_text())
    assert cfg[C.TJS_CONFIG]["dtype"] == C.TJS_DTYPE
    assert cfg["image_seq_length"] == case.k
    proc = json.loads((bundle / C.HF_PROCESSOR_CONFIG).read_text())
    (h, w) = json.loads((bundle / C.MANIFEST_FILE).read_text())[C.KEY_VISION][C.V_IMAGE_SIZE]
    grid = (h // proc["patch_size"]) * (w // proc["patch_size"])
    assert grid + proc["num_additional_image_tokens"] == case.k  # transformers.js's count
    assert proc["vision_feature_select_strategy"] == "full"  # so Python's count is the same
    tok = json.loads((bundle / C.HF_TOKENIZER_CONFIG).read_text())
    assert tok["chat_template"]  # transformers.js's LlavaProcessor reads it only here
    # transformers.js builds the empty past from these shapes: batch_size -> B, the rest -> 0.
    dec = ort.InferenceSession(str(bundle / C.DECODER_ONNX), providers=["CPUExecutionProvider"])
    past = [i for i in dec.get_inputs() if i.name.startswith(C.PAST_PREFIX)]
    assert past
    for i in past:
        assert i.shape[0] == C.AXIS_BATCH and i.shape[2] == C.AXIS_PAST, (i.name, i.shape)
        assert isinstance(i.shape[1], int) and isinstance(i.shape[3], int), (i.name, i.shape)


def python_processor_ids(bundle: Path, photo: Path) -> list[int]:
    """Prompt ids from transformers' (Python) AutoProcessor loaded from the bundle's own files."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(bundle, local_files_only=True, use_fast=False)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True)
    with Image.open(photo) as image:
        ids = processor(images=image, text=text, return_tensors="np")["input_ids"]
    return ids[0].tolist()


def test_transformersjs_greedy_equals_runtime(
    case_bundle: tuple[Case, Path], photo_paths: list[Path], node_dir: Path, tmp_path: Path
) -> None:
    """Same prompt ids and pixels in, same greedy tokens out, photo by photo; and end to end as a
    user runs it (AutoProcessor from the bundle's own files + preprocess.mjs, as answer.mjs): the
    same prompt ids, bit-identical pixels and the same greedy tokens."""
    case, bundle = case_bundle
    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    ids = pipe.prompt_ids(QUESTION)
    assert python_processor_ids(bundle, photo_paths[0]) == ids  # K image tokens there too
    items, ours = [], []
    for i, photo in enumerate(photo_paths):
        pixels = preprocess(load_image(photo), pipe.m[C.KEY_VISION])[None]  # (1,3,H,W)
        raw = tmp_path / f"pixels{i}.f32"
        pixels.astype(np.float32).tofile(raw)
        (r,) = pipe.generate(pixels, [ids], Sampling(max_new_tokens=NEW_TOKENS))
        ours.append(r.token_ids)
        items.append(
            {"image": str(photo), "input_ids": ids, "pixel_values": str(raw),
             "pixel_shape": list(pixels.shape)}
        )  # fmt: skip
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {"bundle": str(bundle), "max_new_tokens": NEW_TOKENS, "question": QUESTION,
             "items": items}
        )
    )  # fmt: skip
    answer = tmp_path / "answer.json"
    run_node(node_dir, "greedy_ids.mjs", str(request), str(answer))
    out = json.loads(answer.read_text())

    assert out["prompt"] == pipe.prompt_cfg[C.PR_TEMPLATE].replace(
        pipe.prompt_cfg[C.PR_MARKER], QUESTION
    )  # transformers.js renders the checkpoint's chat template as transformers does
    for photo, mine, theirs in zip(photo_paths, ours, out["results"], strict=True):
        assert theirs["tokens"] == mine, f"{case.name} {photo.name}: transformers.js differs"
        assert theirs["js_input_ids"] == ids, f"{photo.name}: processor ids differ"
        assert theirs["js_pixel_shape"] == items[0]["pixel_shape"]
        assert theirs["pixel_max_abs_diff"] == 0.0, f"{photo.name}: {theirs}"
        assert theirs["js_tokens"] == mine, f"{case.name} {photo.name}: user path differs"

    if case.name != EXAMPLE_CASE:
        return
    # The example script answers from the folder (its processor + preprocess.mjs).
    proc = run_node(node_dir, "answer.mjs", str(bundle), str(photo_paths[0]), QUESTION, "4")
    count = re.search(r"\((\d+) tokens in \d+ ms\)", proc.stderr)
    assert count and 1 <= int(count.group(1)) <= 4, proc.stderr


def test_transformersjs_several_images_equal_runtime(
    case_bundle: tuple[Case, Path], photo_paths: list[Path], node_dir: Path, tmp_path: Path
) -> None:
    """Three photos in one prompt, and a clip's 4 frames (one image block each): transformers.js
    (its processor, every placeholder expanded by preprocess.mjs) gives runtime.rows' prompt
    ids, pixels and greedy tokens."""
    from runtime import rows

    case, bundle = case_bundle
    if case.name != EXAMPLE_CASE:
        pytest.skip("one bundle suffices: the prompt logic is the processor's, not the graph's")
    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    photo = load_image(photo_paths[1])
    frames = []
    for i in range(4):  # a pan across a real photo, as PNG frames
        frames.append(tmp_path / f"frame{i}.png")
        photo.crop((60 * i, 0, 60 * i + 320, 240)).save(frames[-1])
    items, ours = [], []
    for j, paths in enumerate([list(photo_paths), frames]):
        (row,) = rows.prepare(pipe, [[load_image(p) for p in paths]])
        ids = rows.prompt_ids(pipe, QUESTION, row)
        (r,) = pipe.generate(None, [ids], Sampling(NEW_TOKENS), vision_out=rows.run(pipe, [row]))
        pixels = np.concatenate([it.inputs for it in row]).astype(np.float32)
        pixels.tofile(raw := tmp_path / f"several{j}.f32")
        items.append({"images": [str(p) for p in paths], "input_ids": ids,
                      "pixel_values": str(raw), "pixel_shape": list(pixels.shape)})  # fmt: skip
        ours.append((ids, r.token_ids))
    request, answer = tmp_path / "request.json", tmp_path / "answer.json"
    request.write_text(json.dumps({"bundle": str(bundle), "max_new_tokens": NEW_TOKENS,
                                   "question": QUESTION, "items": items}))  # fmt: skip
    run_node(node_dir, "greedy_ids.mjs", str(request), str(answer))
    for (ids, tokens), theirs in zip(ours, json.loads(answer.read_text())["results"], strict=True):
        assert theirs["js_input_ids"] == ids
        assert theirs["pixel_max_abs_diff"] == 0.0
        assert theirs["tokens"] == tokens and theirs["js_tokens"] == tokens


def test_transformersjs_kept_tokens_equal_runtime_on_all_photos(
    case_bundle: tuple[Case, Path], node_dir: Path
) -> None:
    """preprocess.mjs pixels through the vision graph transformers.js loaded: the runtime's pixels
    (max |diff| 0) and kept_indices on every real photo (bench/tjs_agreement.py also measures
    transformers.js's own processor and each cause)."""
    case, bundle = case_bundle
    if case.name not in AGREEMENT_CASES:
        pytest.skip(f"all-photo agreement runs on {', '.join(AGREEMENT_CASES)}")
    paths = tjs.photos("all")
    if len(paths) != ALL_PHOTOS:
        pytest.fail(f"expected {ALL_PHOTOS} photos under {tjs.SHARED}, found {len(paths)}")
    s = tjs.compare(bundle, paths, node_dir, processor=False)["bundle"]
    assert s["pixel_max_abs_diff"] == 0.0 and s["photos_exact"] == len(paths), s
    assert s["overlap_min"] == 1.0 and s["photos_same_tokens"] == len(paths), s


def test_js_vision_keys_follow_the_contract(node_dir: Path) -> None:
    """preprocess.mjs knows exactly the manifest's vision keys and refuses, naming it, any key or
    value it does not model."""
    out = node_module(
        node_dir,
        """
import { VISION_KEYS, checkVision } from './preprocess.mjs';
const base = { image_size: [8, 8], resample: 3, rescale_factor: 1 / 255,
               image_mean: [0, 0, 0], image_std: [1, 1, 1] };
const refused = [{ new_key: 1 }, { crop: 'random' }, { pad: 'reflect' }, { resample: 6 },
                 { image_processor: 'Idefics3ImageProcessor' }, { pad: 'square' }]
    .map((extra) => { try { checkVision({ ...base, ...extra }); return null; }
                      catch (e) { return e.message; } });
console.log(JSON.stringify({ keys: Object.keys(VISION_KEYS), refused }));
""",
    )
    got = json.loads(out)
    contract = {value for name, value in vars(C).items() if name.startswith("V_")}
    contract -= set(C.QWEN_VISION_KEYS)  # a LLaVA reader never gets a Qwen bundle
    assert set(got["keys"]) == contract | VISION_KEYS_OUTSIDE_CONTRACT
    for key, message in zip(
        ("new_key", "crop", "pad", "resample", "image_processor", "pad_color"),
        got["refused"],
        strict=True,
    ):
        assert message and f"vision.{key}:" in message, (key, message)


def _vision(size: tuple[int, int], extra: dict) -> dict:
    base = {
        C.V_IMAGE_SIZE: list(size),
        C.V_RESAMPLE: 3,
        C.V_RESCALE: 1 / 255,
        C.V_IMAGE_MEAN: [0.48145466, 0.4578275, 0.40821073],
        C.V_IMAGE_STD: [0.26862954, 0.26130258, 0.27577711],
    }
    return {**base, **extra}


LLAVA = {
    C.V_PROCESSOR: "LlavaImageProcessor",
    C.V_CONVERT_RGB: True,
    C.V_PAD: C.PAD_SQUARE,
    C.V_PAD_COLOR: [122, 116, 104],
    C.V_DO_RESIZE: True,
    C.V_RESIZE: 32,
    C.V_CROP: C.CROP_CENTER,
    C.V_RESAMPLE: 5,
    C.V_DO_RESCALE: True,
    C.V_DO_NORMALIZE: True,
}
NO_RESIZE_NO_NORMALISE = {
    C.V_DO_RESIZE: False,
    C.V_RESAMPLE: None,
    C.V_CROP: C.CROP_CENTER,
    C.V_RESCALE: 1.0,
    C.V_IMAGE_MEAN: [0.0] * 3,
    C.V_IMAGE_STD: [1.0] * 3,
    C.V_DO_RESCALE: False,
    C.V_DO_NORMALIZE: False,
}
# Every option preprocess.mjs models, each PIL filter, up- and downscaling, pad and crop edges.
JS_CONFIGS = [
    _vision((64, 64), {C.V_RESIZE: 64, C.V_CROP: C.CROP_CENTER}),  # CLIP
    _vision((40, 40), {C.V_CROP: C.CROP_NONE, C.V_RESAMPLE: 2}),  # SigLIP: straight to [H, W]
    _vision((48, 64), {C.V_RESIZE: 50, C.V_CROP: C.CROP_CENTER, C.V_RESAMPLE: 1}),
    _vision((48, 48), {C.V_RESIZE: 30, C.V_CROP: C.CROP_CENTER, C.V_RESAMPLE: 4}),  # crop pads
    _vision((32, 32), LLAVA),
    _vision(
        (24, 24),
        {
            C.V_PAD: C.PAD_SQUARE,
            C.V_PAD_COLOR: [0, 255, 7],
            C.V_RESAMPLE: 0,
            C.V_RESIZE_SIZE: [24, 24],
        },
    ),
    _vision((16, 16), NO_RESIZE_NO_NORMALISE),
    _vision(
        (50, 70), {C.V_RESIZE_SIZE: [50, 70], C.V_IMAGE_MEAN: [0.5] * 3, C.V_IMAGE_STD: [0.5] * 3}
    ),
    _vision((300, 200), {C.V_RESAMPLE: 1}),  # upscaling with the widest kernel
]


def test_js_preprocess_equals_runtime_on_every_option(
    node_dir: Path, photo_paths: list[Path], tmp_path: Path
) -> None:
    """preprocess.mjs vs runtime.preprocess, bit for bit, for every modelled option on the real
    photos, a tall crop of one (Pillow 13's vertical-first pass order) and small noise images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [np.asarray(load_image(p)) for p in photo_paths]
    tall = np.ascontiguousarray(images[0][:, ::4])  # 480x160: Pillow 13 resizes it vertically first
    noise = rng.integers(0, 256, (23 * 37 + 90 * 5) * 3, dtype=np.uint8)
    images += [
        tall,
        noise[: 23 * 37 * 3].reshape(23, 37, 3),
        noise[23 * 37 * 3 :].reshape(90, 5, 3),
    ]
    (tmp_path / "images.u8").write_bytes(b"".join(im.tobytes() for im in images))
    spec = {"shapes": [im.shape[:2] for im in images], "configs": JS_CONFIGS}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    node_module(
        node_dir,
        f"""
import fs from 'node:fs';
import {{ pixelValues }} from './preprocess.mjs';
const spec = JSON.parse(fs.readFileSync('{tmp_path}/spec.json', 'utf8'));
const buf = fs.readFileSync('{tmp_path}/images.u8');
const out = [];
for (const vision of spec.configs) {{
    let off = 0;
    for (const [height, width] of spec.shapes) {{
        const data = buf.subarray(off, off + height * width * 3);
        off += height * width * 3;
        const p = pixelValues({{ data, width, height, channels: 3 }}, vision).data;
        out.push(Buffer.from(p.buffer, p.byteOffset, p.byteLength));
    }}
}}
fs.writeFileSync('{tmp_path}/out.f32', Buffer.concat(out));
""",
    )
    got = np.fromfile(tmp_path / "out.f32", dtype=np.float32)
    off = 0
    for n, vision in enumerate(JS_CONFIGS):
        for image in images:
            want = preprocess(Image.fromarray(image), vision)
            mine = got[off : off + want.size].reshape(want.shape)
            off += want.size
            diff = np.abs(mine - want).max()
            assert diff == 0.0, f"config {n}, image {image.shape}: max |diff| {diff}"
    assert off == got.size


def test_adapt_writes_external_data_and_missing_files(tmp_path: Path) -> None:
    """A bundle with an external-data decoder, no processor_config, chat_template.json."""
    from export.transformersjs import adapt_for_transformersjs

    (tmp_path / C.ONNX_DIR).mkdir()
    for rel in (C.VISION_ONNX, C.EMBED_ONNX, C.DECODER_ONNX):
        (tmp_path / rel).write_bytes(b"")
    decoder = tmp_path / C.DECODER_ONNX
    decoder.with_name(decoder.name + C.EXTERNAL_DATA_SUFFIX).write_bytes(b"")
    (tmp_path / C.HF_CONFIG).write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / C.HF_TOKENIZER_CONFIG).write_text(json.dumps({"bos_token": "<s>"}))
    (tmp_path / C.HF_CHAT_TEMPLATE_JSON).write_text(json.dumps({"chat_template": "{{ x }}"}))
    manifest = {
        C.KEY_TEXT: {C.T_IMAGE_TOKENS: 32},
        C.KEY_VISION: {C.V_IMAGE_SIZE: [384, 384]},
        C.KEY_PROMPT: {C.PR_IMAGE: "<image>"},
    }
    adapt_for_transformersjs(tmp_path, manifest)
    cfg = json.loads((tmp_path / C.HF_CONFIG).read_text())
    assert cfg[C.TJS_CONFIG] == {
        "dtype": C.TJS_DTYPE,
        "use_external_data_format": {decoder.name: 1},
    }
    proc = json.loads((tmp_path / C.HF_PROCESSOR_CONFIG).read_text())
    assert proc["image_token"] == "<image>" and proc["processor_class"] == "LlavaProcessor"
    assert (384 // proc["patch_size"]) ** 2 + proc["num_additional_image_tokens"] == 32
    assert json.loads((tmp_path / C.HF_TOKENIZER_CONFIG).read_text())["chat_template"] == "{{ x }}"


def test_processor_fields_give_k_tokens_for_any_aspect() -> None:
    from export.transformersjs import TransformersJsError, processor_fields

    for size, grid in (((336, 500), 1), ((336, 672), 2), ((224, 1120), 5)):
        f = processor_fields(16, size)
        tokens = (size[0] // f["patch_size"]) * (size[1] // f["patch_size"])
        assert (tokens, tokens + f["num_additional_image_tokens"]) == (grid, 16)
    with pytest.raises(TransformersJsError, match="raise --k"):
        processor_fields(4, (100, 1000))
