"""`make eval` on Qwen2.5-VL: the tiny checkpoint, K=16 gram in both positions modes, 1 image.

Three exports (the unpruned reference with its own original M-RoPE positions, gram K=16 with
original and with compact positions) dominate the time; the answers take seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runtime import contract as C

N_MAX = 16384  # a dynamic Qwen2.5-VL bundle's manifest N (svdprune_onnx.qwen_vision.N_MAX)


@pytest.fixture(scope="module")
def ckpt(tiny_qwen: Path) -> Path:
    return tiny_qwen  # tests/conftest.py: the built-in tiny Qwen2.5-VL under models_root


def _args(ckpt: Path, out: Path, bundles: Path, *extra: str):
    from eval.__main__ import parse_args

    flags = ["-m", str(ckpt), "--limit", "1", "--provider", "cpu", "--no-progress"]
    return parse_args([*flags, "-o", str(out), "--bundles", str(bundles), *extra])


@pytest.fixture(scope="module")
def run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from eval.__main__ import main

    out, bundles = tmp_path_factory.mktemp("evalq_out"), tmp_path_factory.mktemp("evalq_b")
    flags = ["--k", "16", "--methods", "gram", "--positions", "original", "compact"]
    result = main(_args(ckpt, out, bundles, *flags))
    return {"out": out, "bundles": bundles, "result": result}


@pytest.mark.slow
def test_rows_per_positions_mode_with_sane_figures(run) -> None:
    rows = json.loads((run["out"] / "results.json").read_text())
    assert [(r["method"], r["k"], r["positions"]) for r in rows] == [
        ("none", N_MAX, C.POSITIONS_ORIGINAL),  # the unpruned model's own positions
        ("gram", 16, C.POSITIONS_ORIGINAL),
        ("gram", 16, C.POSITIONS_COMPACT),
    ]
    for r in rows:
        assert 0 <= r["agreement"] <= 1 and 0 <= r["accuracy"] <= 1
        assert r["agreement"] == pytest.approx(1 - r["flip_rate"])
        assert 0 <= r["top1_agreement"] <= 1 and r["first_token_kl"] >= 0
        assert r["n_images"] == 1 and r["n_questions"] > 0
        # no PyTorch side for Qwen2.5-VL: absent (null), never estimated
        assert r["leverage_mass"] is None and r["ipr_ratio"] is None
    ref, orig, compact = rows
    assert ref["agreement"] == 1.0 and ref["flip_rate"] == 0.0
    assert ref["first_token_kl"] == 0.0 and ref["top1_agreement"] == 1.0
    assert ref["margin_mae"] == 0.0
    assert ref["image_tokens"] > 16  # every merged token of the image (its own N)
    assert orig["image_tokens"] == compact["image_tokens"] == 16
    for r in (orig, compact):
        assert r["first_token_kl"] > 0 and r["margin_mae"] > 0  # pruning changes the logits
    # the two modes are different models: the positions reached the runtime
    assert orig["first_token_kl"] != compact["first_token_kl"]


@pytest.mark.slow
def test_report_names_the_closer_mode(run) -> None:
    summary = run["result"]["positions"]
    assert set(summary["modes"]) == {C.POSITIONS_ORIGINAL, C.POSITIONS_COMPACT}
    assert summary["closer"] in summary["modes"] and summary["pairs"] == 1
    assert summary["decided_by"] in ("agreement", "margin_mae", "first_token_kl", None)
    for s in summary["modes"].values():
        assert s["configs"] == 1 and 0 <= s["agreement"] <= 1
    md = (run["out"] / "results.md").read_text()
    assert md.startswith("| method | K | positions | image tokens | accuracy")
    assert "| gram | 16 | compact |" in md and "| gram | 16 | original |" in md
    assert f"closer to the unpruned model: {summary['closer']} (" in md
    images = json.loads((run["out"] / "images.json").read_text())
    assert images["meta"]["family"] == C.FAMILY_QWEN25VL
    assert images["meta"]["positions"]["closer"] == summary["closer"]
    assert (run["out"] / "results.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bundles_per_positions_mode_share_their_graphs(run, ckpt: Path) -> None:
    from runtime.bundle import load_manifest

    root, name = run["bundles"], ckpt.name
    ref = root / f"{name}-none-k{N_MAX}-original"
    orig, compact = root / f"{name}-gram-k16-original", root / f"{name}-gram-k16-compact"
    for bundle, mode in ((ref, "original"), (orig, "original"), (compact, "compact")):
        assert load_manifest(bundle)[C.KEY_PRUNING][C.P_POSITIONS] == mode  # checksums verify
    same = [C.VISION_ONNX, C.EMBED_ONNX, C.DECODER_ONNX]  # positions are a runtime setting
    for g in same:
        assert (orig / g).stat().st_ino == (compact / g).stat().st_ino
    assert (ref / C.DECODER_ONNX).stat().st_ino == (orig / C.DECODER_ONNX).stat().st_ino


@pytest.mark.slow
def test_rerun_recomputes_nothing(run, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from eval.__main__ import main
    from runtime.generate import Pipeline

    def refuse(*a, **kw):
        raise AssertionError("a finished run must answer from its cache")

    monkeypatch.setattr(Pipeline, "generate", refuse)
    flags = ["--k", "16", "--methods", "gram", "--positions", "compact", "original"]
    again = main(_args(ckpt, run["out"], run["bundles"], *flags))  # modes in the other order

    def by_config(rows: list[dict]) -> dict:
        return {(r["method"], r["k"], r["positions"]): r["first_token_kl"] for r in rows}

    assert by_config(again["rows"]) == by_config(run["result"]["rows"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "exact"], "not available for Qwen2.5-VL .exact runs in eval's PyTorch"),
        (["--methods", "gram", "cls_attn"], "cls_attn not available for Qwen2.5-VL"),
        (["--family", "llava"], "is a qwen2_5_vl checkpoint, not llava"),
    ],
)
def test_refusals_before_any_export(ckpt: Path, tmp_path: Path, flags, message) -> None:
    from eval.__main__ import main
    from eval.errors import USER_ERRORS

    with pytest.raises(USER_ERRORS, match=message):
        main(_args(ckpt, tmp_path / "out", tmp_path / "b", "--k", "16", *flags))
    assert not (tmp_path / "b").exists()  # refused before exporting anything


@pytest.mark.slow
def test_no_nan_in_the_json(run) -> None:
    text = (run["out"] / "results.json").read_text()
    assert "NaN" not in text  # strict JSON: absent figures are null
    rows = json.loads(text)
    assert all(not (isinstance(v, float) and math.isnan(v)) for r in rows for v in r.values())


def _row(method: str, k: int, mode: str, agreement: float, margin: float, kl: float) -> dict:
    return {"method": method, "k": k, "positions": mode, "agreement": agreement,
            "margin_mae": margin, "first_token_kl": kl, "top1_agreement": 1.0}  # fmt: skip


def test_positions_summary_orders_agreement_then_margin_then_kl() -> None:
    from eval.report import positions_summary, positions_text

    ref = _row("none", 99, "original", 1.0, 0.0, 0.0)
    rows = [
        ref,
        _row("gram", 16, "original", 0.9, 0.5, 0.1),
        _row("gram", 16, "compact", 0.8, 0.1, 0.01),  # closer logits, fewer equal answers
        _row("gram", 64, "original", 1.0, 0.2, 0.1),
        _row("gram", 64, "compact", 1.0, 0.1, 0.2),  # same answers: the margin decides
    ]
    s = positions_summary(rows)
    assert s["closer"] == "original" and s["decided_by"] == "agreement" and s["pairs"] == 2
    assert s["modes"]["original"]["agreement"] == pytest.approx(0.95)
    assert s["modes"]["original"]["closer_on"] == 1 and s["modes"]["compact"]["closer_on"] == 1
    assert "closer to the unpruned model: original (by agreement" in positions_text(s)
    same_answers = [ref, rows[3], rows[4]]
    s = positions_summary(same_answers)
    assert (s["closer"], s["decided_by"]) == ("compact", "margin_mae")
    text_mode = [{**r, "margin_mae": None} for r in same_answers]  # --answer text: no margins
    s = positions_summary(text_mode)
    assert (s["closer"], s["decided_by"]) == ("original", "first_token_kl")
    assert positions_summary([ref, rows[1], rows[3]]) == {}  # one mode: nothing to compare
