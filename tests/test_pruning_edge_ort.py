"""Numerical edge cases of the pruning graph in ONNX Runtime, against PyTorch (hypothesis).

tests/test_select.py checks the selector invariants in PyTorch; here the same scoring +
selection is exported to ONNX once per method and fed adversarial features (NaN/Inf, zeros,
all-equal tokens, rank-deficient, huge and tiny norms):

    feats (B, N, d) ─► token_scores ─► select_topk ─► scores (B, N) f32, kept (B, K) i64

ORT must give K unique, ascending, in-range indices, identical to PyTorch's, run after run,
with finite scores. Rank-deficient features (ranks 1..r + oversample) are scored against exact
SVD leverage, also at the shipped rank / oversampling / iterations. A tiny CLIP vision graph
checks NaN/Inf/huge *pixels* end to end.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from svdprune_onnx import leverage as lev
from svdprune_onnx import select as S
from tests.test_leverage import RANK_KINDS, check_rank_deficient, rank_k, well_defined

N, GRID, D, K, RANK = 64, (8, 8), 12, 8, 4
METHODS = ("purify", "gram", "power", S.NORM)
LEVERAGE = ["purify", "gram", "power"]


class PruneGraph(nn.Module):
    """Scoring + fixed-K selection alone: feats (B, N, D) -> scores (B, N), kept (B, K).

    Small and fast by default (N=64 on an 8x8 grid, K=8, r=4, 4 iterations; purify its own
    default, as its steps are cheap at N=64); `cfg` and `grid` give another size, e.g. the
    shipped rank / oversampling / iterations.
    """

    def __init__(self, method: str, cfg: S.PruneConfig | None = None, grid=GRID) -> None:
        super().__init__()
        iters = None if method == lev.PURIFY else 4
        self.cfg = cfg or S.PruneConfig(k=K, n=N, method=method, rank=RANK, iterations=iters)
        self.register_buffer("priority", S.spatial_priority(self.cfg.n, grid, self.cfg.k))
        const = S.score_constant(self.cfg)
        self.register_buffer("const", const if const is not None else torch.zeros(0))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        const = self.const if self.const.numel() else None
        scores = S.token_scores(feats, self.cfg, None, const)
        return scores, S.select_topk(scores, self.cfg.k, self.priority)


def _export(module: nn.Module, dummy: torch.Tensor, path: Path, names: list[str]) -> Path:
    axes = {n: {0: "batch_size"} for n in names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), str(path), dynamo=False, opset_version=18,
            input_names=names[:1], output_names=names[1:], dynamic_axes=axes,
        )  # fmt: skip
    return path


@pytest.fixture(scope="session")
def graphs(tmp_path_factory) -> dict[str, tuple[PruneGraph, ort.InferenceSession]]:
    """Each method's pruning module and its ORT session, exported once per test session."""
    root = tmp_path_factory.mktemp("prune-onnx")
    out = {}
    for method in METHODS:
        module = PruneGraph(method).eval()
        path = _export(module, torch.zeros(2, N, D), root / f"{method}.onnx", ["f", "s", "k"])
        out[method] = (module, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    return out


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30])
KINDS = ["as-is", "zeros", "all-equal", "rank-deficient", "huge-norm", "tiny-norm", "nan-rows"]


@st.composite
def features(draw) -> np.ndarray:
    """(B, N, D) float32 features of one adversarial kind."""
    b = draw(st.integers(1, 3))
    x = draw(arrays(np.float32, (b, N, D), elements=st.one_of(finite, finite, finite, special)))
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "zeros":
        x[:] = 0
    elif kind == "all-equal":
        x[:] = x[:, :1]
    elif kind == "rank-deficient":  # rank 1..3 < RANK: most directions are absent
        r = draw(st.integers(1, 3))
        x = (rng.normal(size=(b, N, r)) @ rng.normal(size=(b, r, D))).astype(np.float32)
    elif kind == "huge-norm":
        x = rng.normal(size=(b, N, D)).astype(np.float32)
        x[:, draw(st.integers(0, N - 1))] *= 1e30  # overflows float32 squares, not the graph
    elif kind == "tiny-norm":  # subnormal range: must not divide by zero
        x = (rng.normal(size=(b, N, D)) * 1e-40).astype(np.float32)
    elif kind == "nan-rows":
        x = rng.normal(size=(b, N, D)).astype(np.float32)
        x[:, : draw(st.integers(1, N))] = np.nan
    return x


def check_indices(idx: np.ndarray, batch: int) -> None:
    assert idx.dtype == np.int64 and idx.shape == (batch, K)
    for row in idx.tolist():
        assert row == sorted(set(row)) and len(row) == K, row  # ascending, unique
        assert all(0 <= i < N for i in row), row


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=features(), method=st.sampled_from(METHODS))
def test_ort_pruning_edge_cases(graphs, x: np.ndarray, method: str) -> None:
    module, sess = graphs[method]
    scores, idx = sess.run(None, {"f": x})
    check_indices(idx, len(x))
    assert np.isfinite(scores).all(), "scores must be finite whatever the features"
    again = sess.run(None, {"f": x})
    assert np.array_equal(again[1], idx) and np.array_equal(again[0], scores), "deterministic"
    with torch.no_grad():
        ref_scores, ref_idx = module(torch.from_numpy(x))
    assert np.array_equal(idx, ref_idx.numpy()), "ORT and PyTorch must keep the same tokens"
    assert np.isfinite(ref_scores.numpy()).all()


@pytest.mark.parametrize("method", LEVERAGE)
def test_degenerate_features_keep_the_uniform_grid_in_ort(graphs, method: str) -> None:
    """All-zero, all-NaN and all-equal features: every score ties -> the spatial grid."""
    _, uniform = graphs[S.NORM]
    grid = uniform.run(None, {"f": np.zeros((1, N, D), np.float32)})[1]
    _, sess = graphs[method]
    for x in (np.zeros((1, N, D)), np.full((1, N, D), np.nan), np.ones((1, N, D))):
        assert np.array_equal(sess.run(None, {"f": x.astype(np.float32)})[1], grid)


# --- rank-deficient features (blank page, flat sky, outlier tokens) vs exact leverage --------


def _rank_deficient_in_ort(module: PruneGraph, sess, grid, d: int, converged: bool) -> None:
    """Ranks 1..p (p = r + oversample) of three kinds, one batch through ORT: the scores are
    exact leverage where rank <= r, and the kept tokens carry exact's leverage mass (the checks
    of tests/test_leverage.py, there in PyTorch)."""
    cfg = module.cfg
    p = lev.block_width(lev.GRAM, cfg.rank, cfg.oversample, cfg.n)
    ranks = [rk for rk in range(1, p + 1) for _ in RANK_KINDS]
    X = torch.stack([rank_k(kind, rk, cfg.n, d) for rk in range(1, p + 1) for kind in RANK_KINDS])
    for x, rk in zip(X, ranks, strict=True):
        well_defined(x, rk)
    scores, kept = sess.run(None, {"f": X.numpy()})
    check_indices_k(kept, cfg.k, cfg.n, batch=len(X))
    with torch.no_grad():
        ref_scores, _ = module(X)
    assert np.abs(scores - ref_scores.numpy()).max() <= 1e-4, "ORT vs PyTorch (leverage <= 1)"
    exact = lev.leverage(X, cfg.rank, lev.EXACT)
    scores_t, kept_t = torch.from_numpy(scores), torch.from_numpy(kept)
    check_rank_deficient(scores_t, kept_t, exact, ranks, cfg.rank, cfg.method, grid, converged)


@pytest.mark.parametrize("method", LEVERAGE)
def test_rank_deficient_features_in_ort(graphs, method: str) -> None:
    """The small graphs (r = 4, 4 iterations): exact up to rank r, no noise column beyond."""
    _rank_deficient_in_ort(*graphs[method], GRID, D, converged=False)


@pytest.mark.parametrize("method", ["purify", "gram"])
def test_rank_deficient_features_in_ort_at_defaults(tmp_path, method: str) -> None:
    """The shipped rank / iterations (r = 8; gram: p = 12, 16 iterations; purify: 24 steps) on
    a 12x12 grid: also close to exact for r < rank <= 12."""
    n, grid, d = 144, (12, 12), 32  # d >= p, so every rank up to p exists
    module = PruneGraph(method, S.PruneConfig(k=16, n=n, method=method), grid).eval()
    path = _export(module, torch.zeros(2, n, d), tmp_path / f"{method}.onnx", ["f", "s", "k"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _rank_deficient_in_ort(module, sess, grid, d, converged=True)


# --- NaN/Inf/huge pixels through a tiny full vision graph -----------------------------------

PIXEL_CASES = ["zeros", "constant", "nan-patch", "nan-all", "inf-patch", "-inf-all", "1e30-all",
               "1e30-patch", "1e4-scaled"]  # fmt: skip


def _pixels(case: str) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(1, 3, 336, 336)).astype(np.float32)
    patch = (..., slice(98, 112), slice(98, 112))  # one 14 x 14 patch
    fill = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "1e30": 1e30}
    head, _, where = case.partition("-")
    if case == "zeros":
        x[:] = 0
    elif case == "constant":
        x[:] = 5.0
    elif case == "1e4-scaled":
        x *= 1e4
    elif where == "patch":
        x[patch] = fill[head]
    else:  # "-inf-all" partitions as ("", "inf-all"): the sign is in the case name
        x[:] = -np.inf if case == "-inf-all" else fill[head]
    return x


@pytest.fixture(scope="module")
def vision_graph(tiny_clip: Path, tmp_path_factory):
    from export.load import load_llava
    from export.vision import export_vision
    from svdprune_onnx.vision import PrunedVision

    module = PrunedVision(load_llava(tiny_clip), S.PruneConfig(k=16, n=576, rank=4, iterations=4))
    path = tmp_path_factory.mktemp("vision-edge") / "vision.onnx"
    export_vision(module.eval(), path, (336, 336))
    return module, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case", PIXEL_CASES)
def test_bad_pixels_in_vision_graph(vision_graph, case: str) -> None:
    """Non-finite pixels count as 0 and |pixels| are capped inside the graph: finite features,
    valid indices, and the same in PyTorch and ORT (torch alone overflows LayerNorm at 1e30)."""
    module, sess = vision_graph
    pixels = _pixels(case)
    feats, idx = sess.run(None, {"pixel_values": pixels})
    check_indices_k(idx, 16)
    assert np.isfinite(feats).all(), case
    with torch.no_grad():
        ref_feats, ref_idx = module(torch.from_numpy(pixels))
    assert np.array_equal(idx, ref_idx.numpy()), case
    assert np.abs(feats - ref_feats.numpy()).max() <= 1e-4, case


def check_indices_k(idx: np.ndarray, k: int, n: int = 576, batch: int = 1) -> None:
    assert idx.dtype == np.int64 and idx.shape == (batch, k)
    for row in idx.tolist():
        assert row == sorted(set(row)) and len(row) == k and row[0] >= 0 and row[-1] < n
