"""The bundle self-test: the reference stored at export, `runtime.bundle --selftest`, the runtime's
automatic first-use check (cached), and the TensorRT fp16 -> fp32 vision fallback.

    export ─► selftest.npz (2 real photos, kept indices, PyTorch scores, greedy tokens)
    runtime.bundle --selftest ─► exit 0 on the same provider; exit 1 on a graph that prunes
                                 differently (a uniform grid swapped in: the failure to catch)
    runtime.run ─► runs it once per provider/precision, then only reads the cached verdict
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from export.__main__ import cli as export_cli
from export.bundle import write_manifest
from runtime import contract as C
from runtime import selftest as st
from runtime.bundle import main as bundle_main
from runtime.run import cli as run_cli
from runtime.session import CPU, TRT, SessionConfig

from .conftest import IMAGES


@pytest.fixture(scope="module")
def bundles(tiny_clip: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("selftest")
    for method in ("gram", "uniform"):
        args = ["-m", str(tiny_clip), "--k", "16", "--method", method, "-o", str(root / method)]
        assert export_cli(args) == 0
    return {"gram": root / "gram", "uniform": root / "uniform"}


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def test_reference_is_in_the_bundle(bundles) -> None:
    m = json.loads((bundles["gram"] / C.MANIFEST_FILE).read_text())
    section = m[C.KEY_SELFTEST]
    assert section[C.S_FILE] == C.SELFTEST_FILE and C.SELFTEST_FILE in m[C.KEY_FILES]
    with np.load(bundles["gram"] / C.SELFTEST_FILE) as ref:
        for i in range(section[C.S_IMAGES]):  # real photos, downscaled, uint8
            image = ref[C.ST_IMAGE.format(i)]
            assert image.dtype == np.uint8 and image.ndim == 3 and max(image.shape) <= st.SIDE
        assert ref[C.ST_KEPT].shape == (section[C.S_IMAGES], 16)
        assert ref[C.ST_TOKENS].shape == (section[C.S_IMAGES], section[C.S_NEW_TOKENS])
        assert ref[C.ST_SCORES].shape == (section[C.S_IMAGES], 576)


def test_selftest_command_passes(bundles, capsys) -> None:
    assert bundle_main([str(bundles["gram"]), "--selftest", "--provider", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "self-test ok" in out and "agreement 1.000" in out and "8/8" in out


def test_a_graph_that_prunes_differently_fails(bundles, tmp_path, capsys) -> None:
    # A gram bundle whose vision graph picks a uniform grid (what an fp16 overflow looks like).
    bad = _copy(bundles["gram"], tmp_path / "bad")
    shutil.copy(bundles["uniform"] / C.VISION_ONNX, bad / C.VISION_ONNX)
    m = json.loads((bad / C.MANIFEST_FILE).read_text())
    write_manifest(bad, m)  # re-hashed: the bundle is consistent, only its pruning is wrong
    assert bundle_main([str(bad), "--selftest", "--provider", "cpu"]) == 1
    assert "self-test FAILED" in capsys.readouterr().out
    # ... and the runtime refuses to answer with it, in one line
    photo = str(IMAGES / "coco_cats.png")
    rc = run_cli(["-m", str(bad), "-i", photo, "-p", "Hi", "--provider", "cpu", "--json"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "self-test FAILED" in err, err
    assert "\n" not in err


def test_other_preprocessing_on_the_device_fails(bundles, monkeypatch) -> None:
    # a device whose Pillow resizes differently (Pillow 12 vs 13 on some aspect ratios)
    from runtime import preprocess
    from runtime.generate import Pipeline

    real = preprocess.preprocess
    monkeypatch.setattr(preprocess, "preprocess", lambda im, v: real(im, v) + 1e-6)
    report = st.run_selftest(Pipeline(bundles["gram"], SessionConfig(provider="cpu")))
    assert not report["passed"] and "gives other pixels" in report["reason"]


def test_runtime_runs_it_once_then_reads_the_cache(bundles, tmp_path, monkeypatch) -> None:
    b = _copy(bundles["gram"], tmp_path / "b")
    photo = str(IMAGES / "coco_cats.png")
    args = ["-m", str(b), "-i", photo, "-p", "Hi", "--provider", "cpu", "--max-new-tokens", "2"]
    assert run_cli(args) == 0
    (cached,) = (tmp_path / "b.selftest").glob("*.json")
    assert json.loads(cached.read_text())["passed"] is True

    def boom(pipe):
        raise AssertionError("the self-test must not run again")

    monkeypatch.setattr(st, "run_selftest", boom)
    assert run_cli(args) == 0


def _fake_pipe(tmp_path: Path, provider: str):
    reopened = []
    vision = SimpleNamespace(get_providers=lambda: [provider])
    other = SimpleNamespace(get_providers=lambda: [CPU])
    pipe = SimpleNamespace(
        m={C.KEY_SELFTEST: {C.S_FILE: C.SELFTEST_FILE}, C.KEY_FILES: {}},
        bundle=tmp_path / "b",
        vision=vision,
        sessions=lambda: (vision, other, other),
        reopen_vision=reopened.append,
    )
    return pipe, reopened


def _report(passed: bool) -> dict:
    sel = {"agreement_min": 1.0 if passed else 0.1, "mass_min": 1.0 if passed else 0.2}
    return {
        "passed": passed,
        "reason": None if passed else "kept-index agreement 0.100 < floor 0.875",
        C.VAL_SELECTION: sel,
        C.VAL_FEATURES_REL: 0.0,
        "tokens_equal": [8],
        "tokens": 8,
        "providers": {},
    }


def test_tensorrt_fp16_that_changes_pruning_falls_back_to_fp32(tmp_path, monkeypatch, capsys):
    pipe, reopened = _fake_pipe(tmp_path, TRT)
    verdicts = iter([_report(False), _report(True)])  # fp16 engine fails, fp32 passes
    monkeypatch.setattr(st, "run_selftest", lambda p: next(verdicts))
    cfg = st.ensure_selftest(pipe, SessionConfig(provider="tensorrt", trt_fp16=True))
    assert cfg.vision_fp32 and [c.vision_fp32 for c in reopened] == [True]
    err = capsys.readouterr().err.strip()
    assert err.startswith("note: TensorRT fp16 changed the pruning") and "\n" not in err
    # the next process reads the verdict and goes straight to fp32
    monkeypatch.setattr(st, "run_selftest", lambda p: pytest.fail("cached: must not rerun"))
    cfg = st.ensure_selftest(pipe, SessionConfig(provider="tensorrt", trt_fp16=True))
    assert cfg.vision_fp32 and len(reopened) == 2


def test_failure_without_a_fallback_is_an_error(tmp_path, monkeypatch) -> None:
    pipe, reopened = _fake_pipe(tmp_path, CPU)
    monkeypatch.setattr(st, "run_selftest", lambda p: _report(False))
    with pytest.raises(st.SelfTestError, match="--provider cpu"):
        st.ensure_selftest(pipe, SessionConfig(provider="cpu"))
    assert reopened == []


def test_reference_images_take_paths_or_pictures(photo_paths) -> None:
    from PIL import Image

    picture = Image.new("RGB", (1000, 500), (10, 20, 30))
    images = st.reference_images([photo_paths[0], picture], 3)  # cycled
    assert [max(im.size) <= st.SIDE for im in images] == [True] * 3
    assert images[1].size == (st.SIDE, st.SIDE // 2) and picture.size == (1000, 500)
    with pytest.raises(ValueError, match="at least one image"):
        st.reference_images([], 2)
