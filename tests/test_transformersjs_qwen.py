"""transformers.js 4.3.1 (Node) runs an UNPRUNED Qwen2.5-VL bundle with its own processor and
generate(); the runtime and it agree wherever their pixels can, and this test says where not.

    tiny Qwen2.5-VL ─► export --method none ─► bundle (+ adapt_qwen_for_transformersjs on a copy)
    runtime Pipeline on the real photos ─► grid, prompt ids, pixel_values, greedy tokens, logits
    node examples/node/qwen_answer.mjs (one process per photo): AutoProcessor +
      Qwen2_5_VLForConditionalGeneration.from_pretrained on the folder, local files only
        own path  its processor's grid, ids, pixels ─► generate()
        ref path  the runtime's ids + pixel_values + grid ─► its generate()

What holds, asserted (the 3 real photos):
  - the chat-rendered prompt, image_grid_thw and prompt ids equal the runtime's (none of the photos
    hits the rounding case below);
  - ref path (same inputs): the same greedy tokens and every step's logits within 1e-4 of the
    runtime's (measured: bit-equal), so its vision call, feature scatter, M-RoPE (get_rope_index)
    and decode positions (rope_deltas) are ours;
  - own path: the same greedy tokens. (The tiny random model answers "\n" over and over on every
    photo, so tokens alone prove little; the per-step logits above are the evidence.)
What differs, measured and asserted as such:
  - pixels: transformers.js resizes with sharp (affine, bicubic), the runtime with PIL (antialiased
    bicubic): pixel_values differ by 0.07-0.09 at most (normalised units; mean <= 0.004) on these
    photos, never 0 (with max_pixels 12.8 MP their resizes only snap to multiples of 28:
    640x480 -> 644x476, 570x380 -> 560x392, 1000x667 -> 1008x672); so the own path's first
    logits are close to ours (measured <= 2e-3), not equal;
  - grid: its smart_resize rounds with Math.round, Python (and the runtime) half to even: a 126x70
    crop of a photo reads as grid (1, 6, 10) there and (1, 4, 8) here, i.e. 15 vs 8 image tokens;
    transformers.js then answers from other pixels, consistently with itself.
A pruned bundle (K < N) fails in transformers.js: its processor writes t*h*w/4 pads for the K
features ("Number of tokens and features do not match"); its M-RoPE never sees kept_indices either.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.transformersjs import adapt_qwen_for_transformersjs
from runtime import contract as C
from runtime.generate import Pipeline, Sampling
from runtime.generator import Generator
from runtime.session import SessionConfig
from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl
from tests.test_transformersjs import node_dir, run_node  # noqa: F401  (node_dir: a fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "qwen_answer.mjs"
QUESTION = "What is in the image?"
NEW_TOKENS = 6
LOGITS_ATOL = 1e-4  # ref path: same inputs, two ORT builds (Python vs onnxruntime-node)
PIXEL_DIFF_MAX = 0.25  # sharp vs PIL bicubic on the 3 photos, normalised units (measured <= 0.09)
# A crop whose sides / 28 end in .5: Math.round (JS) vs round-half-even (Python).
HALF_CROP = (126, 70)  # (w, h)
GRID_PY, GRID_JS = [1, 4, 8], [1, 6, 10]


@pytest.fixture(scope="module")
def qwen_script(node_dir: Path) -> Path:  # noqa: F811
    """qwen_answer.mjs beside the cache's node_modules (bench.tjs_agreement copies the others)."""
    shutil.copy2(REPO / "examples" / "node" / SCRIPT, node_dir / SCRIPT)
    return node_dir


@pytest.fixture(scope="module")
def ckpt(models_root: Path) -> Path:
    return ensure_tiny_qwen25vl(models_root)


@pytest.fixture(scope="module")
def bundles(qwen_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """(the exported unpruned bundle, a copy adapted for transformers.js)."""
    root = tmp_path_factory.mktemp("tjs-qwen")
    out = qwen_bundle("all")
    tjs_copy = root / "none-tjs"
    shutil.copytree(out, tjs_copy)
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    adapt_qwen_for_transformersjs(tjs_copy, manifest)  # a no-op once the export calls it
    return out, tjs_copy


def test_qwen_side_files_follow_transformersjs(bundles: tuple[Path, Path]) -> None:
    """config.json as transformers.js reads it: qwen2_5_vl, fp32 file names, a chat template in
    tokenizer_config.json; preprocessor_config.json is the checkpoint's."""
    out, tjs_copy = bundles
    cfg = json.loads((tjs_copy / C.HF_CONFIG).read_text())
    assert cfg["model_type"] == "qwen2_5_vl"  # registry: Qwen2_5_VLForConditionalGeneration
    assert cfg[C.TJS_CONFIG] == {"dtype": C.TJS_DTYPE}  # no .onnx_data in the tiny bundle
    tok = json.loads((tjs_copy / C.HF_TOKENIZER_CONFIG).read_text())
    assert tok["chat_template"]
    pre = C.HF_PREPROCESSOR_CONFIG
    assert (tjs_copy / pre).read_bytes() == (out / pre).read_bytes()
    before = {p.name: p.read_bytes() for p in tjs_copy.iterdir() if p.is_file()}
    adapt_qwen_for_transformersjs(tjs_copy, json.loads((out / C.MANIFEST_FILE).read_text()))
    assert {p.name: p.read_bytes() for p in tjs_copy.iterdir() if p.is_file()} == before


def runtime_answer(pipe: Pipeline, image: Image.Image, raw: Path) -> dict:
    """The runtime's grid, ids, greedy tokens and every step's logits; pixels written to `raw`."""
    px = pipe.preprocess([image])
    ids = pipe.prompt_ids(QUESTION, pipe.image_tokens(px)[0])
    (r,) = pipe.generate(px, [ids], Sampling(max_new_tokens=NEW_TOKENS))
    gen = Generator(pipe, Sampling(max_new_tokens=NEW_TOKENS), 1)
    gen.append_tokens([ids], image=pipe.run_vision(px))
    logits = []
    while not gen.is_done():
        gen.generate_next_token()
        logits.append(gen.logits[0].copy())
    assert gen.new_tokens[0] == r.token_ids
    np.testing.assert_array_equal(logits[0], r.first_logits)
    pixels, grid = px[0]
    np.asarray(pixels, np.float32).tofile(raw)
    return {"input_ids": ids, "image_grid_thw": grid[0].tolist(), "pixel_values": str(raw),
            "tokens": r.token_ids, "logits": np.stack(logits)}  # fmt: skip


def tjs_answer(node: Path, bundle: Path, image: Path, ref: dict, tmp: Path) -> dict:
    request = tmp / f"{image.stem}.ref.json"
    request.write_text(json.dumps({k: v for k, v in ref.items() if k != "logits"}))
    args = (SCRIPT, str(bundle), str(image), QUESTION, str(NEW_TOKENS), str(request))
    return json.loads(run_node(node, *args).stdout)


def test_transformersjs_runs_unpruned_qwen_like_runtime(
    bundles: tuple[Path, Path], photo_paths: list[Path], qwen_script: Path, tmp_path: Path
) -> None:
    """Per real photo: equal prompt, grid and ids; on the runtime's inputs the same tokens and
    logits (1e-4); on its own (sharp) pixels the same greedy tokens, pixels measured apart."""
    out, tjs_copy = bundles
    pipe = Pipeline(out, SessionConfig(provider="cpu"))
    prompt = pipe.prompt_cfg[C.PR_TEMPLATE].replace(pipe.prompt_cfg[C.PR_MARKER], QUESTION)
    report = {}
    for photo in photo_paths:
        with Image.open(photo) as im:
            ours = runtime_answer(pipe, im.convert("RGB"), tmp_path / f"{photo.stem}.f32")
        js = tjs_answer(qwen_script, tjs_copy, photo, ours, tmp_path)
        name = photo.name
        assert js["prompt"] == prompt, name  # its chat template rendering = the manifest's
        assert js["image_grid_thw"] == ours["image_grid_thw"], name  # no .5 case on these
        assert js["prompt_ids"] == ours["input_ids"], f"{name}: processor ids differ"
        # Its model path on our inputs: vision, scatter, M-RoPE and decode positions are ours.
        assert js["ref"]["token_ids"] == ours["tokens"], f"{name}: ref path tokens differ"
        ref_logits = np.asarray(js["ref"]["logits"], np.float32)
        np.testing.assert_allclose(ref_logits, ours["logits"], rtol=0, atol=LOGITS_ATOL)
        # Its own pixels: sharp's bicubic, not PIL's -> measurably different, same answer.
        diff = js["pixels"]["max_abs_diff"]
        assert 0 < diff < PIXEL_DIFF_MAX, f"{name}: pixel max |diff| {diff}"
        assert js["token_ids"] == ours["tokens"], f"{name}: own-path tokens differ"
        first = np.abs(np.asarray(js["logits"][0]) - ours["logits"][0]).max()
        report[name] = {"grid": js["image_grid_thw"], "pixel_max_abs_diff": round(diff, 4),
                        "pixel_mean_abs_diff": round(js["pixels"]["mean_abs_diff"], 5),
                        "own_first_logits_max_abs_diff": float(first),
                        "ref_logits_max_abs_diff": float(np.abs(ref_logits - ours["logits"]).max()),
                        "tokens_equal": True}  # fmt: skip
    print(json.dumps(report, indent=1))


def test_transformersjs_grid_rounds_half_up(
    bundles: tuple[Path, Path], photo_paths: list[Path], qwen_script: Path, tmp_path: Path
) -> None:
    """A photo crop whose sides / 28 end in .5: transformers.js's smart_resize (Math.round) reads
    another grid than Python's (round half to even), so other pixels and more image tokens; it
    still runs, consistently with itself (as many pads as its grid's merged tokens)."""
    out, tjs_copy = bundles
    crop = tmp_path / "half.png"
    with Image.open(photo_paths[0]) as im:
        im.convert("RGB").crop((0, 0, *HALF_CROP)).save(crop)
    pipe = Pipeline(out, SessionConfig(provider="cpu"))
    with Image.open(crop) as im:
        ours = runtime_answer(pipe, im.convert("RGB"), tmp_path / "half.f32")
    js = tjs_answer(qwen_script, tjs_copy, crop, ours, tmp_path)
    assert ours["image_grid_thw"] == GRID_PY
    assert js["image_grid_thw"] == GRID_JS
    pads = [sum(1 for i in ids if i == pipe.text[C.T_IMAGE_TOKEN_ID])
            for ids in (ours["input_ids"], js["prompt_ids"])]  # fmt: skip
    assert pads == [np.prod(GRID_PY) // 4, np.prod(GRID_JS) // 4]
    assert "max_abs_diff" not in js["pixels"]  # different shapes: no pixel comparison
    assert js["ref"]["token_ids"] == ours["tokens"]  # our inputs still give our tokens
    assert len(js["token_ids"]) >= 1


def keep_first(graph: Path, k: int) -> None:
    """Cut the vision graph's outputs to their first `k` rows: K features per image, as a pruned
    graph returns (which K does not matter to the failure below; a real pruned export costs
    ~40 s, and tests/test_qwen_end_to_end.py covers those graphs)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(graph)
    g = m.graph
    g.initializer.extend(
        [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in
         (("keep_first.zero", [0]), ("keep_first.k", [k]))]
    )  # fmt: skip
    for out in g.output:
        inner = f"{out.name}.all"
        for node in g.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        g.node.append(
            helper.make_node("Slice", [inner, "keep_first.zero", "keep_first.k", "keep_first.zero"],
                             [out.name])
        )  # fmt: skip
    onnx.checker.check_model(m)
    onnx.save(m, graph)


def test_pruned_qwen_bundle_fails_in_transformersjs(
    bundles: tuple[Path, Path], photo_paths: list[Path], qwen_script: Path, tmp_path: Path, capsys
) -> None:
    """The documented limitation: a vision graph that returns K=16 features per image (as a
    pruned bundle's does), the processor writing one pad per merged token (N), and
    transformers.js's scatter refusing the mismatch; the adapter and the script say so first."""
    _, tjs_copy = bundles
    pruned = tmp_path / "k16"
    shutil.copytree(tjs_copy, pruned)
    keep_first(pruned / C.VISION_ONNX, 16)
    manifest = json.loads((pruned / C.MANIFEST_FILE).read_text())
    manifest[C.KEY_PRUNING] |= {C.P_K: 16, C.P_METHOD: "gram"}
    manifest[C.KEY_TEXT][C.T_IMAGE_TOKENS] = 16
    (pruned / C.MANIFEST_FILE).write_text(json.dumps(manifest))
    capsys.readouterr()
    adapt_qwen_for_transformersjs(pruned, manifest)
    assert "runs only unpruned" in capsys.readouterr().out  # the export says so
    proc = subprocess.run(
        ["node", SCRIPT, str(pruned), str(photo_paths[0]), QUESTION, "2"],
        cwd=qwen_script, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Number of tokens and features do not match" in proc.stderr, proc.stderr[-2000:]
    assert "is pruned (K=16 per image)" in proc.stderr  # qwen_answer.mjs's own note
