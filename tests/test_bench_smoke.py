"""Smoke test of the benchmark code paths at tiny sizes (no tower, no shared data, seconds)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import torch

from bench import fidelity, overhead
from bench.report import md_table
from runtime import contract as C
from svdprune_onnx import leverage as lev
from svdprune_onnx.select import PruneConfig

N = fidelity.N


def test_synthetic_has_the_requested_gap() -> None:
    X = fidelity.synthetic(1.5, 16, seed=0)  # (N, D)
    assert X.shape == (N, fidelity.D)
    gap = fidelity.spectral_gap(X[None], 16, center=False).item()
    assert 1.35 < gap < 1.65


def test_evaluate_tiny_grid_rows_are_consistent() -> None:
    X = torch.stack([fidelity.synthetic(1.5, 16, seed=s) for s in range(2)])  # (2, N, D)
    rows = fidelity.evaluate(X, {"gap1.5@16": [0, 1]}, iters=[2, 4], oversamples=[4],
                             centers=(True,))  # fmt: skip
    assert rows and all(0 <= r["overlap_min"] <= r["overlap_mean"] <= 1 for r in rows)
    assert all(r["mass_mean"] <= 1 + 1e-9 for r in rows)
    # The exact-vs-exact figure is not in the grid, but a gap of 1.5 converges within 4 steps.
    s = fidelity.Setting(lev.GRAM, 4, "16", True, 4)
    row = fidelity.find(rows, s, 16, "gap1.5")
    assert row is not None and row["overlap_mean"] >= 0.9


def test_prune_subgraph_exports_and_matches_torch(tmp_path, monkeypatch) -> None:
    cfg = PruneConfig(k=16, n=N, iterations=3)
    feats = {64: torch.randn(1, N, 64)}  # small width keeps the test fast
    monkeypatch.setattr(overhead, "OUT_DIR", tmp_path)
    rows = overhead.bench_subgraphs([cfg], feats)
    assert rows[0]["nodes"] > 0 and rows[0]["median_ms"] > 0
    path = next(tmp_path.glob("prune_*.onnx"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (idx,) = sess.run([C.KEPT_INDICES], {overhead.FEATURES_INPUT: feats[64].numpy()})
    with torch.no_grad():
        ref = overhead.PruneOnly(cfg)(feats[64]).numpy()
    np.testing.assert_array_equal(idx, ref)


def test_md_table_pads_columns() -> None:
    text = md_table(["a", "bb"], [[1, "x"], ["long", 2]])
    assert text.splitlines()[1] == "|------|----|"


def test_export_memory_reports_every_step(tmp_path, monkeypatch) -> None:
    """bench.export_memory on the tiny preset: a peak and a duration for each export step."""
    from bench import export_memory

    monkeypatch.setattr(export_memory, "OUT_DIR", tmp_path)
    assert export_memory.main(["--preset", "tiny", "--keep", "--", "--rank", "4"]) == 0
    (report,) = tmp_path.glob("*.json")
    result = json.loads(report.read_text())
    steps = [s["step"][:5] for s in result["steps"]]
    assert steps == ["start", "[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    assert all(s["peak_bytes"] > 0 and s["seconds"] >= 0 for s in result["steps"])
    assert result["peak_bytes"] == max(s["peak_bytes"] for s in result["steps"])
    assert result["peak_bytes"] > 100 * 2**20  # torch alone is more than that
    assert result["bundle_bytes"] > 0 and (tmp_path / "tiny-k16-rank-4").is_dir()
