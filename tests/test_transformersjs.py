"""transformers.js (Node) runs our bundles unchanged: its greedy tokens equal the runtime's.

    examples/node/package.json + lock ─► npm ci --ignore-scripts ─► build/node-cache/<hash>/ (once)
    tiny CLIP+Llama / SigLIP+Qwen2 x decoder exporter optimum / torch (+ a q4 variant) ─► bundle
    runtime.generate.Pipeline on the real photos ─► prompt ids, pixel_values, token_ids
    node greedy_ids.mjs (one process per bundle, all photos): LlavaForConditionalGeneration
      .from_pretrained + AutoProcessor from the folder ─► token ids          ══ equal

transformers.js resizes with sharp, not PIL, so its own pixel_values differ slightly from the
checkpoint processor's; the token check therefore feeds it the runtime's pixel_values and the
runtime's prompt ids, and checks separately that its processor builds the same ids (exactly K
image tokens) and near pixels of the same shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.__main__ import cli as export_cli
from runtime import contract as C
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import load_image, preprocess
from runtime.session import SessionConfig

from .conftest import REPO

NODE_DIR = REPO / "examples" / "node"
NODE_FILES = ("package.json", "package-lock.json")
SCRIPTS = ("greedy_ids.mjs", "answer.mjs")
TJS_VERSION = "4.3.1"
ORT_NODE_VERSION = "1.30.0"  # its CPU binaries are in the tarball
QUESTION = "What is in the image?"
NEW_TOKENS = 12
# transformers.js (sharp) vs transformers (PIL) resampling, in normalised units; a misread
# preprocessor config (no crop, wrong mean/std/size) is far above this.
PIXEL_MEAN_ABS_DIFF = 0.15
EXAMPLE_CASE = "clip-llama-optimum"  # answer.mjs runs on this bundle


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
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail(
            "node and npm are required for the transformers.js test (Node >= 18); install them, "
            "e.g. `apt-get install nodejs npm` (CI has them)"
        )
    digest = hashlib.sha256(b"".join((NODE_DIR / f).read_bytes() for f in NODE_FILES))
    cache = REPO / "build" / "node-cache" / digest.hexdigest()[:16]
    pkg = cache / "node_modules" / "@huggingface" / "transformers" / "package.json"
    if not pkg.is_file():
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in NODE_FILES:
            shutil.copy2(NODE_DIR / f, tmp / f)
        # --ignore-scripts: onnxruntime-node ships its CPU binaries in the tarball; its install
        # script only downloads GPU ones.
        proc = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"npm ci failed in {tmp}:\n{proc.stderr[-3000:]}")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    assert json.loads(pkg.read_text())["version"] == TJS_VERSION
    ort_pkg = cache / "node_modules" / "onnxruntime-node" / "package.json"
    assert json.loads(ort_pkg.read_text())["version"] == ORT_NODE_VERSION  # the lock's pin
    for script in SCRIPTS:  # beside node_modules, so `import '@huggingface/transformers'` resolves
        shutil.copy2(NODE_DIR / script, cache / script)
    return cache


def run_node(node_dir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["node", *args], cwd=node_dir, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"node {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc


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
    """Same prompt ids and pixels in, same greedy tokens out, photo by photo; same prompt ids
    from transformers.js's (and transformers') processor reading the bundle's own files."""
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
        assert theirs["pixel_mean_abs_diff"] < PIXEL_MEAN_ABS_DIFF, theirs

    if case.name != EXAMPLE_CASE:
        return
    # The example script answers from the folder with transformers.js's own preprocessing.
    proc = run_node(node_dir, "answer.mjs", str(bundle), str(photo_paths[0]), QUESTION, "4")
    count = re.search(r"\((\d+) tokens in \d+ ms\)", proc.stderr)
    assert count and 1 <= int(count.group(1)) <= 4, proc.stderr


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
