"""`python -m export` end to end: bundle layout, manifest, checksums, atomicity, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import export.vision
from export.__main__ import cli
from runtime import contract as C
from runtime.bundle import BundleError, load_manifest
from runtime.parity import DECODER_RTOL, FEATURE_RTOL

from .conftest import REPO


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default export (built-in tiny LLaVA, K=16), as `make export K=16` runs it."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-llava-k16"
    assert cli(["--k", "16", "-o", str(out)]) == 0
    return out


def test_bundle_layout_and_manifest(bundle: Path) -> None:
    m = load_manifest(bundle)  # verifies every sha256
    for graph in (C.VISION_ONNX, C.EMBED_ONNX, C.DECODER_ONNX):
        assert (bundle / graph).is_file() and graph in m[C.KEY_FILES]
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (bundle / name).is_file() and name in m[C.KEY_FILES]
    p = m[C.KEY_PRUNING]
    assert (p[C.P_K], p[C.P_N], p[C.P_SCORED]) == (16, 576, C.SCORED_VISION)
    assert {C.P_METHOD, C.P_RANK, C.P_ITERS, C.P_CENTER} <= p.keys()
    v = m[C.KEY_VISION]
    assert v[C.V_FEATURE_LAYER] == -2 and v[C.V_SELECT_STRATEGY] == "default"
    assert v[C.V_IMAGE_SIZE] == [336, 336] and len(v[C.V_IMAGE_MEAN]) == len(v[C.V_IMAGE_STD]) == 3
    t = m[C.KEY_TEXT]
    assert t[C.T_IMAGE_TOKEN_ID] == 4 and t[C.T_IMAGE_TOKENS] == 16
    assert (t[C.T_HIDDEN], t[C.T_LAYERS], t[C.T_KV_HEADS], t[C.T_HEAD_DIM]) == (64, 2, 2, 16)
    assert t[C.T_EOS] == [2] and t[C.T_PAD] == 3 and t[C.T_MAX_POS] == 2048
    assert t[C.T_LOGITS] == C.LOGITS_LAST
    pr = m[C.KEY_PROMPT]
    assert pr[C.PR_TEMPLATE].count(pr[C.PR_IMAGE]) == 1 and pr[C.PR_MARKER] in pr[C.PR_TEMPLATE]
    assert m[C.KEY_PRUNING][C.P_POSITIONS] == C.POSITIONS_COMPACT
    assert m[C.KEY_VALIDATION][C.VAL_DECODER_REL] <= DECODER_RTOL
    assert m[C.KEY_VALIDATION]["embed_tokens_max_abs_diff"] == 0.0
    assert m[C.KEY_EXPORTER]["decoder_exporter"] == "optimum"
    assert m[C.KEY_VALIDATION]["kept_indices_equal"] is True
    assert m[C.KEY_VALIDATION][C.VAL_SELECTION]["agreement_min"] == 1.0
    assert m[C.KEY_VALIDATION][C.VAL_FEATURES_REL] <= FEATURE_RTOL
    assert m[C.KEY_EXPORTER]["packages"]["torch"].startswith("2.13.0")
    assert not list(bundle.parent.glob(".*tmp-*")), "temp folders must not survive an export"


def test_bundle_runs_in_ort_alone(bundle: Path, clip_pixels: np.ndarray) -> None:
    feats, idx = export.vision.run_vision(bundle / C.VISION_ONNX, clip_pixels)
    assert feats.shape == (3, 16, 64) and idx.shape == (3, 16)
    assert np.isfinite(feats).all()


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_text_graph_contract(bundle: Path) -> None:
    import onnx

    embed = onnx.load(str(bundle / C.EMBED_ONNX))
    assert [(i.name, _dims(i)) for i in embed.graph.input] == [
        (C.INPUT_IDS, [C.AXIS_BATCH, C.AXIS_SEQ])
    ]
    assert [(o.name, _dims(o)) for o in embed.graph.output] == [
        (C.INPUTS_EMBEDS, [C.AXIS_BATCH, C.AXIS_SEQ, 64])
    ]
    dec = onnx.load(str(bundle / C.DECODER_ONNX))
    assert not {n.op_type for n in dec.graph.node} & {"If", "Loop", "Scan"}
    ins = {i.name: _dims(i) for i in dec.graph.input}
    outs = {o.name: _dims(o) for o in dec.graph.output}
    assert ins.pop(C.INPUTS_EMBEDS) == [C.AXIS_BATCH, C.AXIS_SEQ, 64]
    assert ins.pop(C.ATTENTION_MASK) == [C.AXIS_BATCH, C.AXIS_TOTAL]
    assert ins.pop(C.POSITION_IDS) == [C.AXIS_BATCH, C.AXIS_SEQ]
    assert outs.pop(C.LOGITS) == [C.AXIS_BATCH, C.LOGITS_POSITIONS, 1000]  # last position
    for i in range(2):
        for name in C.past_names(i):
            assert ins.pop(name) == [C.AXIS_BATCH, 2, C.AXIS_PAST, 16]
        for name in C.present_names(i):
            assert outs.pop(name) == [C.AXIS_BATCH, 2, C.AXIS_TOTAL, 16]
    assert ins == {} and outs == {}, "no extra graph inputs or outputs"


def test_missing_file_is_detected(bundle: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "b"
    shutil.copytree(bundle, bad)
    (bad / C.DECODER_ONNX).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_manifest(bad)


def test_tampered_or_foreign_bundle_is_refused(bundle: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "b"
    shutil.copytree(bundle, bad)
    with (bad / C.VISION_ONNX).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_manifest(bad)
    manifest = json.loads((bad / C.MANIFEST_FILE).read_text())
    (bad / C.MANIFEST_FILE).write_text(json.dumps(manifest | {C.KEY_SCHEMA: 99}))
    with pytest.raises(BundleError, match="schema_version"):
        load_manifest(bad)
    # version 1 (before the preprocessing flags) is still read: its vision section means the same
    (bad / C.MANIFEST_FILE).write_text(json.dumps(manifest | {C.KEY_SCHEMA: 1}))
    assert load_manifest(bad, verify=False)[C.KEY_SCHEMA] == 1
    with pytest.raises(BundleError, match="not a bundle"):
        load_manifest(tmp_path)


def test_failed_export_keeps_the_old_bundle(bundle: Path, monkeypatch, capsys) -> None:
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise export.vision.ExportValidationError("kept_indices differ (injected)")

    monkeypatch.setattr(export.vision, "validate_vision", boom)
    assert cli(["--k", "16", "-o", str(bundle)]) == 2
    assert "error: kept_indices differ" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert not list(bundle.parent.glob(".*tmp-*"))


def test_failed_first_export_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupted export

    monkeypatch.setattr(export.vision, "export_vision", boom)
    with pytest.raises(KeyboardInterrupt):
        cli(["--k", "16", "-o", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []


def test_siglip_checkpoint_by_path(tiny_siglip: Path, tmp_path: Path) -> None:
    assert cli(["-m", str(tiny_siglip), "--k", "32", "--rank", "k", "-o", str(tmp_path / "s")]) == 0
    m = load_manifest(tmp_path / "s")
    assert m[C.KEY_VISION][C.V_SELECT_STRATEGY] == "full"
    assert (m[C.KEY_PRUNING][C.P_K], m[C.KEY_PRUNING][C.P_RANK]) == (32, 32)


def _not_llava(tmp_path: Path) -> Path:
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return d


def _corrupt_image(tmp_path: Path) -> Path:
    f = tmp_path / "broken.jpg"
    f.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return f


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "K must be in 1..576"),
        (["--k", "600"], "K must be in 1..576"),
        (["--k", "16", "--method", "none"], "use --k 576"),
        (["--k", "16", "--rank", "many"], "--rank takes an integer"),
        (["--k", "16", "--rank", "999"], "rank must be in"),
        (["--k", "16", "--iters", "0"], "iterations must be >= 1"),
        (["-m", "/nonexistent/model"], "is not a folder"),
        (["-m", _not_llava], "model_type 'bert' is not supported"),
        (["-i", _corrupt_image], "is not a readable image"),
        (["-i", Path("/nonexistent.jpg")], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, capsys, args: list, message: str) -> None:
    argv = [str(a(tmp_path)) if callable(a) else str(a) for a in args]
    out = tmp_path / "never"
    assert cli([*argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_real_cli_exit_code_and_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--k", "0"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error: K must be in" in proc.stderr
