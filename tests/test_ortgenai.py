"""ONNX Runtime GenAI's own generator runs our bundles: its greedy tokens equal the runtime's.

    tiny CLIP+Llama optimum fp32 | SigLIP+Qwen2 torch fp32 (weights as external data, so
    embed_genai.onnx shares embed_tokens.onnx_data) | CLIP+Llama torch q4  ─► bundle
    runtime.generate.Pipeline on the real photos ─► token_ids
    examples/ortgenai/generate.py (og.Model / Generator.set_inputs) ─► token_ids      ══ equal

Also: the manifest records the GenAI files; bundles without them, or with original position
ids, are refused in one line; and the model-type guard (a new ORT GenAI release, or a changed
handling of GENAI_MODEL_TYPE, fails here first).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime_genai as og
import pytest

import export.lean
from export.__main__ import cli as export_cli
from export.bundle import write_manifest
from export.genai import check_embed, embed_genai, write_genai
from export.vision import ExportValidationError
from runtime import contract as C
from runtime.bundle import load_manifest
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import load_image, preprocess_batch
from runtime.session import SessionConfig

from .conftest import REPO

EXAMPLE = REPO / "examples" / "ortgenai" / "generate.py"
QUESTION = "What is in the image?"
NEW_TOKENS = 12
# name: (checkpoint fixture, export flags, weights as external data). ORT GenAI runs the vision
# graph as it is, whatever the pruning method: past the default bundle, `norm` halves the export.
FAST = ("--method", "norm")
BUNDLES = {
    "clip-optimum-fp32": ("tiny_clip", (), False),
    "siglip-torch-fp32": ("tiny_siglip", ("--decoder-exporter", "torch", *FAST), True),
    "clip-torch-q4": ("tiny_clip", ("--decoder-exporter", "torch", "--dtype", "q4", *FAST), False),
}
FP32 = "clip-optimum-fp32"


def _load_example():
    spec = importlib.util.spec_from_file_location("ortgenai_generate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module")
def bundles(request, tmp_path_factory) -> Callable[[str], Path]:
    """Each bundle exported once per module, on first use."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            model, flags, external = BUNDLES[name]
            out = tmp_path_factory.mktemp("ortgenai") / name
            argv = ["-m", str(request.getfixturevalue(model)), "--k", "16", "-o", str(out)]
            with pytest.MonkeyPatch.context() as mp:
                if external:  # as a real model's graphs are (export/lean.py)
                    mp.setattr(export.lean, "INLINE_BYTES", 0)
                assert export_cli([*argv, *flags]) == 0
            made[name] = out
        return made[name]

    return get


def runtime_answer(bundle: Path, photo: Path, new_tokens: int = NEW_TOKENS) -> list[int]:
    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    pixels = preprocess_batch([load_image(photo)], pipe.m[C.KEY_VISION])
    (result,) = pipe.generate(pixels, [pipe.prompt_ids(QUESTION)], Sampling(new_tokens))
    return result.token_ids


@pytest.mark.parametrize("name", list(BUNDLES))
def test_greedy_tokens_equal_the_runtime(bundles, photo_paths, name: str) -> None:
    bundle = bundles(name)
    runner = example.GenaiRunner(bundle)
    for photo in photo_paths:
        got = runner.answer(photo, QUESTION, NEW_TOKENS)
        assert got["token_ids"] == runtime_answer(bundle, photo), (name, photo.name)
        assert len(got["token_ids"]) == NEW_TOKENS  # the tiny models name no early eos here
        assert got["timings_ms"]["ttft"] > 0 and got["tokens_per_s"] > 0


def test_several_images_and_frames_equal_the_runtime(bundles, photo_paths, tmp_path) -> None:
    """Three photos in one prompt, and a 4-frame clip (LLaVA: a frame is an image block): ORT
    GenAI's own generator gives runtime.run --one-prompt's greedy tokens."""
    from runtime import rows
    from runtime.media import load_video

    bundle = bundles(FP32)
    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    runner = example.GenaiRunner(bundle)
    clip = tmp_path / "clip"
    clip.mkdir()
    photo = load_image(photo_paths[1])
    for i in range(4):  # a pan across a real photo
        photo.crop((60 * i, 0, 60 * i + 320, 240)).save(clip / f"{i}.png")
    for media in ([load_image(p) for p in photo_paths], list(load_video(clip, 4).frames)):
        (row,) = rows.prepare(pipe, [media])
        ids = rows.prompt_ids(pipe, QUESTION, row)
        (want,) = pipe.generate(None, [ids], Sampling(NEW_TOKENS), vision_out=rows.run(pipe, [row]))
        got = runner.answer(media, QUESTION, NEW_TOKENS)
        assert got["prompt_token_ids"] == ids
        assert got["token_ids"] == want.token_ids


def test_manifest_lists_the_genai_files(bundles) -> None:
    for name, (_, flags, external) in BUNDLES.items():
        bundle = bundles(name)
        m = load_manifest(bundle)  # every listed file verified, the GenAI ones included
        section = m[C.KEY_GENAI]
        assert section[C.GN_MODEL_TYPE] == C.GENAI_MODEL_TYPE and section[C.GN_UNSUPPORTED] is None
        assert (section[C.GN_CONFIG], section[C.GN_EMBED]) == C.GENAI_FILES
        assert set(C.GENAI_FILES) <= set(m[C.KEY_FILES])
        assert m[C.KEY_VALIDATION][C.VAL_GENAI_EMBED] == 0.0
        graphs = m[C.KEY_GRAPHS]  # the genai graph keeps the embed graph's format
        assert graphs[C.GENAI_EMBED_ONNX][C.G_DTYPE] == graphs[C.EMBED_ONNX][C.G_DTYPE]
        ops = {n.op_type for n in onnx.load(str(bundle / C.GENAI_EMBED_ONNX)).graph.node}
        assert "ScatterND" in ops and ("GatherBlockQuantized" in ops) == ("q4" in flags)
        # external data: one copy of the table on disk, read by both embedding graphs
        shared = f"{C.EMBED_ONNX}{C.EXTERNAL_DATA_SUFFIX}" if external else None
        assert section[C.GN_SHARED_DATA] == shared
        assert not (bundle / f"{C.GENAI_EMBED_ONNX}{C.EXTERNAL_DATA_SUFFIX}").exists()
        # transformers.js reads none of the new files
        tjs = json.loads((bundle / C.HF_CONFIG).read_text())[C.TJS_CONFIG]
        assert Path(C.GENAI_EMBED_ONNX).name not in tjs.get("use_external_data_format", {})


def test_genai_config_comes_from_the_manifest(bundles) -> None:
    bundle = bundles(FP32)
    t = load_manifest(bundle)[C.KEY_TEXT]
    cfg = json.loads((bundle / C.GENAI_CONFIG).read_text())
    model, decoder = cfg["model"], cfg["model"]["decoder"]
    assert (model["context_length"], model["vocab_size"]) == (t[C.T_MAX_POS], t[C.T_VOCAB])
    assert (model["eos_token_id"], model["bos_token_id"]) == (t[C.T_EOS], t[C.T_BOS])
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (
        t[C.T_KV_HEADS],
        t[C.T_HEAD_DIM],
    )
    assert decoder["inputs"]["past_key_names"] % 1 == C.past_names(1)[0]
    assert model["vision"]["config_filename"] == C.GENAI_PROCESSOR_CONFIG
    assert not (bundle / C.GENAI_PROCESSOR_CONFIG).exists()
    # ORT GenAI's own processor (its default file name is the HF processor_config.json here)
    # fails loudly instead of reading the HF file
    with pytest.raises(RuntimeError, match=re.escape(C.GENAI_PROCESSOR_CONFIG)):
        og.Model(str(bundle)).create_multimodal_processor()


def test_model_type_guard(bundles, photo_paths) -> None:
    """GENAI_MODEL_TYPE stands in for LLaVA because ORT GenAI gives it the generic multimodal
    path (export/genai.py WHY). A new release may change that: this fails first and says what
    to re-check."""
    pin = re.search(r"^# no-deps: onnxruntime-genai==(\S+)$", (REPO / "requirements" / "dev.txt")
                    .read_text(), re.M)  # fmt: skip
    recheck = (
        f"re-check that model type {C.GENAI_MODEL_TYPE!r} still gets the generic multimodal "
        "pipeline in src/models/model.cpp, model_type.h (IsVLM only), position_inputs.cpp "
        "(DefaultPositionInputs) and generators.cpp (RewindTo), then set C.GENAI_VERSION and "
        "the pin in requirements/dev.txt"
    )
    assert pin and pin.group(1) == C.GENAI_VERSION, f"requirements/dev.txt pin: {recheck}"
    assert og.__version__ == C.GENAI_VERSION, f"onnxruntime-genai {og.__version__}: {recheck}"
    bundle = bundles(FP32)
    m = load_manifest(bundle)
    cfg = json.loads((bundle / C.GENAI_CONFIG).read_text())
    assert m[C.KEY_GENAI][C.GN_MODEL_TYPE] == cfg["model"]["type"] == C.GENAI_MODEL_TYPE
    # the behaviour the choice relies on: compact 2-D position ids, rewind allowed
    runner = example.GenaiRunner(bundle)
    want = runner.answer(photo_paths[0], QUESTION, 4)
    ids = want["prompt_token_ids"]
    params = og.GeneratorParams(runner.model)
    params.set_search_options(max_length=len(ids) + 4, do_sample=False)
    gen = og.Generator(runner.model, params)
    inputs = og.NamedTensors()
    inputs[C.INPUT_IDS] = np.array([ids], dtype=np.int32)
    inputs[C.PIXEL_VALUES] = preprocess_batch([load_image(photo_paths[0])], m[C.KEY_VISION])
    inputs[C.NUM_IMAGE_TOKENS] = np.array([m[C.KEY_TEXT][C.T_IMAGE_TOKENS]], dtype=np.int64)
    gen.set_inputs(inputs)
    positions = np.asarray(gen.get_input(C.POSITION_IDS))
    assert np.array_equal(positions, np.arange(len(ids))[None]), recheck
    tokens = []
    for _ in range(2):
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    # drop the second token and feed it again, as a chat turn does (phi3v refuses rewinds)
    gen.rewind_to(len(ids) + 1)
    gen.append_tokens(np.array(tokens[1:], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == want["token_ids"], recheck


def _copy(bundle: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of `bundle` without the GenAI files, its manifest edited and re-hashed."""
    shutil.copytree(bundle, dst)
    for rel in C.GENAI_FILES:
        (dst / rel).unlink()
    m = json.loads((dst / C.MANIFEST_FILE).read_text())
    del m[C.KEY_GENAI], m[C.KEY_GRAPHS][C.GENAI_EMBED_ONNX]
    edit(m)
    write_manifest(dst, m)
    return dst


def _refusal(bundle: Path, photo: Path, capsys) -> str:
    assert example.main([str(bundle), str(photo), QUESTION]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_original_positions_are_refused(bundles, photo_paths, tmp_path: Path, capsys) -> None:
    def original(m: dict) -> None:
        m[C.KEY_PRUNING][C.P_POSITIONS] = C.POSITIONS_ORIGINAL
        write_genai(dst, m)  # what the export does for such a bundle

    dst = tmp_path / "original"
    _copy(bundles(FP32), dst, original)
    m = load_manifest(dst)
    assert "--positions original" in m[C.KEY_GENAI][C.GN_UNSUPPORTED]
    assert m[C.KEY_GENAI][C.GN_CONFIG] is None
    assert not any((dst / rel).exists() for rel in C.GENAI_FILES)
    assert "compact position ids" in _refusal(dst, photo_paths[0], capsys)


def test_bundle_without_genai_files_is_refused(bundles, photo_paths, tmp_path, capsys) -> None:
    dst = _copy(bundles(FP32), tmp_path / "older", lambda m: None)
    assert "has no ONNX Runtime GenAI files" in _refusal(dst, photo_paths[0], capsys)


def test_eos_stops_both_at_the_same_token(bundles, photo_paths, tmp_path: Path) -> None:
    """Name the third greedy token eos: both stop there and keep it as the last token."""
    bundle, photo = bundles(FP32), photo_paths[0]
    eos = runtime_answer(bundle, photo)[2]

    def stop_at(m: dict) -> None:
        m[C.KEY_TEXT][C.T_EOS] = [eos]
        write_genai(dst, m)

    dst = tmp_path / "eos"
    _copy(bundle, dst, stop_at)
    want = runtime_answer(dst, photo)
    assert want[-1] == eos and len(want) < NEW_TOKENS
    assert example.generate(dst, photo, QUESTION, NEW_TOKENS)["token_ids"] == want


def test_embed_check_catches_a_wrong_graph(bundles, tmp_path: Path) -> None:
    """The export's check of embed_genai.onnx fails on other values and on a graph that
    cannot run (another image token id: ScatterND gets 0 rows for K features)."""
    dst = shutil.copytree(bundles(FP32), tmp_path / "wrong")
    m = load_manifest(dst)
    t = m[C.KEY_TEXT]
    embed = onnx.load(str(dst / C.EMBED_ONNX))
    good = embed_genai(embed, t[C.T_IMAGE_TOKEN_ID], t[C.T_HIDDEN])
    table = next(w for w in good.graph.initializer if len(w.dims) == 2)  # (V, D) float32
    table.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(table) * 2, table.name))
    onnx.save(good, str(dst / C.GENAI_EMBED_ONNX))
    with pytest.raises(ExportValidationError, match="differs from"):
        check_embed(dst, m)
    wrong = embed_genai(embed, t[C.T_IMAGE_TOKEN_ID] + 1, t[C.T_HIDDEN])
    onnx.save(wrong, str(dst / C.GENAI_EMBED_ONNX))
    with pytest.raises(ExportValidationError, match="cannot run"):
        check_embed(dst, m)


def test_script_prints_json_last(bundles, photo_paths) -> None:
    """The example as a script (from any folder): --json's last line holds the tokens."""
    bundle, photo = bundles(FP32), photo_paths[1]
    argv = [sys.executable, str(EXAMPLE), str(bundle), str(photo), QUESTION, "--json"]
    proc = subprocess.run(
        [*argv, "--max-new-tokens", "5"], cwd="/", capture_output=True, text=True, check=True
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == runtime_answer(bundle, photo, 5)
    assert isinstance(out["text"], str)
