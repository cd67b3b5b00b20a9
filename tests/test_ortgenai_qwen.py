"""ONNX Runtime GenAI's own qwen2_5_vl type runs an unpruned Qwen2.5-VL bundle as our runtime does.

    tiny Qwen2.5-VL, --method none ─► bundle ─► export.genai.write_genai_qwen
    runtime (Pipeline / Generator, runtime.mrope positions) on the real photos ─► tokens, logits
    examples/ortgenai/generate.py (og.Model, set_inputs: our pixels, grid, N pads) ─► the same
    ORT GenAI's own QwenImageProcessor (ort-extensions) ─► same grid and ids, pixels measured

Also: a pruned bundle (or compact positions) gets no GenAI files and says why.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.genai import (
    GN_PROCESSOR,
    QWEN_MODEL_TYPE,
    QWEN_PROCESSOR_CONFIG,
    QWEN_PRUNED,
    write_genai_qwen,
)
from runtime import contract as C
from runtime.bundle import load_manifest
from runtime.generate import Pipeline, Sampling
from runtime.generator import Generator
from runtime.preprocess import load_image
from runtime.session import SessionConfig

from .conftest import REPO

EXAMPLE = REPO / "examples" / "ortgenai" / "generate.py"
QUESTION = "What is in the image?"
NEW_TOKENS = 8
# ORT GenAI runs the same graphs on the same inputs: logits measured bit-equal (0.0) at every
# step; the bound leaves room for another ONNX Runtime build's kernels, and is far below what
# compact positions change (the control below, ~5e-3 on the tiny model).
LOGITS_ATOL = 1e-5


def _load_example():
    spec = importlib.util.spec_from_file_location("ortgenai_generate_qwen", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module")
def bundle(qwen_bundle) -> Path:
    """The session's tiny unpruned Qwen bundle (the export writes ORT GenAI's files into it)."""
    out = qwen_bundle("all")
    assert load_manifest(out)[C.KEY_GENAI][C.GN_UNSUPPORTED] is None
    return out


@pytest.fixture(scope="module")
def runner(bundle: Path):
    return example.GenaiRunner(bundle)


def our_steps(pipe: Pipeline, photo: Path, new_tokens: int, positions: str | None = None):
    """(tokens, per-step logits (V,)) from the runtime's Generator; `positions` overrides the
    manifest's mode (the control)."""
    px = pipe.preprocess([load_image(photo)])
    ids = pipe.prompt_ids(QUESTION, pipe.image_tokens(px)[0])
    m = pipe.m[C.KEY_PRUNING]
    saved = m.get(C.P_POSITIONS)
    if positions:
        m[C.P_POSITIONS] = positions
    try:
        gen = Generator(pipe, Sampling(max_new_tokens=new_tokens), 1)
        gen.append_tokens([ids], image=pipe.run_vision(px))
        tokens, logits = [], []
        while not gen.is_done():
            tokens.append(int(gen.generate_next_token()[0]))
            logits.append(gen.logits[0].copy())
    finally:
        m[C.P_POSITIONS] = saved
    return ids, px, tokens, logits


def genai_steps(runner, ids: list[int], px, new_tokens: int):
    """(tokens, per-step logits) from ORT GenAI on our ids, pixels and grid."""
    og = runner.og
    params = og.GeneratorParams(runner.model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(runner.model, params)
    inputs = og.NamedTensors()
    (pixels, grid), n = px[0], sum(1 for i in ids if i == runner.text[C.T_IMAGE_TOKEN_ID])
    inputs[C.INPUT_IDS] = np.array([ids], np.int32)
    inputs[C.PIXEL_VALUES], inputs[C.IMAGE_GRID_THW] = pixels, grid
    inputs[C.NUM_IMAGE_TOKENS] = np.array([n], np.int64)
    gen.set_inputs(inputs)
    tokens, logits = [], []
    while not gen.is_done():
        logits.append(np.asarray(gen.get_logits()).reshape(-1).copy())  # before the pick
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, logits


def test_greedy_tokens_and_logits_equal_the_runtime(bundle, runner, photo_paths) -> None:
    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    for photo in photo_paths:  # each at its own size: 640x480, 570x380, 1000x667
        # the example's path (our pixels and ids, set by hand) vs Pipeline.generate
        px = pipe.preprocess([load_image(photo)])
        ids = pipe.prompt_ids(QUESTION, pipe.image_tokens(px)[0])
        (want,) = pipe.generate(px, [ids], Sampling(max_new_tokens=NEW_TOKENS))
        got = runner.answer(photo, QUESTION, NEW_TOKENS)
        assert got["prompt_token_ids"] == ids
        assert got["token_ids"] == want.token_ids, photo.name
        assert got["timings_ms"]["ttft"] > 0
        # every step's logits: ORT GenAI's M-RoPE positions are the runtime's
        ids, px, tokens, ours = our_steps(pipe, photo, NEW_TOKENS)
        g_tokens, theirs = genai_steps(runner, ids, px, NEW_TOKENS)
        assert g_tokens == tokens == want.token_ids
        diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
        assert diff <= LOGITS_ATOL, (photo.name, diff)
        # the control: other positions (compact) move the logits far past the bound
        *_, compact = our_steps(pipe, photo, 1, positions=C.POSITIONS_COMPACT)
        assert float(np.abs(compact[0] - theirs[0]).max()) > 100 * LOGITS_ATOL, photo.name


def test_genai_processor_path(runner, photo_paths) -> None:
    """ORT GenAI's own processor (ort-extensions smart_resize + PIL's C resampler, its own
    JPEG decoder): the same grid and prompt ids as ours; the pixels differ by a few 8-bit
    levels (measured max 9 / 28 / 15 levels, mean 0.22 / 0.46 / 0.22 on coco_cats.png /
    extreme_ironing.jpg / waterview.jpg), and it answers."""
    for photo in photo_paths:
        d = runner.compare_preprocessing(photo, QUESTION)
        assert d["grid_genai"] == d["grid_ours"] and d["ids_equal"], (photo.name, d)
        assert d["mean_levels"] < 1.0 and d["max_levels"] <= 40, (photo.name, d)
        out = runner.answer(photo, QUESTION, 4, genai_processor=True)
        assert len(out["token_ids"]) == 4


def test_manifest_and_files(bundle) -> None:
    m = load_manifest(bundle)  # every listed file verified, the GenAI ones included
    section = m[C.KEY_GENAI]
    assert section[C.GN_MODEL_TYPE] == QWEN_MODEL_TYPE and section[C.GN_UNSUPPORTED] is None
    assert (section[C.GN_CONFIG], section[C.GN_EMBED]) == C.GENAI_FILES
    assert section[GN_PROCESSOR] == QWEN_PROCESSOR_CONFIG
    assert {*C.GENAI_FILES, QWEN_PROCESSOR_CONFIG} <= set(m[C.KEY_FILES])
    assert m[C.KEY_VALIDATION][C.VAL_GENAI_EMBED] == 0.0
    graph = onnx.load(str(bundle / C.GENAI_EMBED_ONNX))
    (features,) = [i for i in graph.graph.input if i.name == C.IMAGE_FEATURES]
    assert len(features.type.tensor_type.shape.dim) == 2  # (T, D), as the vision graph returns
    cfg = json.loads((bundle / C.GENAI_CONFIG).read_text())["model"]
    hf = json.loads((bundle / C.HF_CONFIG).read_text())
    assert cfg["type"] == QWEN_MODEL_TYPE
    assert cfg["vision_start_token_id"] == hf["vision_start_token_id"]
    assert cfg["image_token_id"] == hf["image_token_id"]
    assert cfg["vision"]["inputs"][C.IMAGE_GRID_THW] == C.IMAGE_GRID_THW


@pytest.mark.parametrize("change", ["pruned", "compact"])
def test_unsupported_bundles_say_why(bundle, tmp_path: Path, change: str) -> None:
    """A pruned bundle (or compact positions): no GenAI files, the reason in the manifest, and
    the example refuses it in one line."""
    m = copy.deepcopy(load_manifest(bundle))
    m.pop(C.KEY_GENAI)
    if change == "pruned":
        m[C.KEY_TEXT][C.T_IMAGE_TOKENS] = 16
    else:
        m[C.KEY_PRUNING][C.P_POSITIONS] = C.POSITIONS_COMPACT
    write_genai_qwen(tmp_path, m)
    section = m[C.KEY_GENAI]
    reason = section[C.GN_UNSUPPORTED]
    assert reason and "image_grid_thw" in reason
    if change == "pruned":
        assert reason == QWEN_PRUNED and "kept_indices" in reason and "--method none" in reason
    assert section[C.GN_CONFIG] is section[C.GN_EMBED] is section[GN_PROCESSOR] is None
    assert not any(tmp_path.iterdir())
    with pytest.raises(example.GenaiError, match="cannot run it"):
        example.check_bundle(tmp_path, m)
