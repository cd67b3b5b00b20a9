"""Selector invariants for every method, on adversarial features (property-based)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from svdprune_onnx import select as S

N, GRID = 64, (8, 8)  # a small 8x8 patch grid keeps hypothesis fast; the logic is size-free
SCORED = [m for m in S.METHODS if m != S.NONE]

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30])
values = st.one_of(finite, finite, finite, special)


@st.composite
def features(draw) -> np.ndarray:
    """(B, N, d) float32 features with NaN/Inf, zeros, duplicate rows and huge-norm outliers."""
    b, d = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    x = draw(arrays(np.float32, (b, N, d), elements=values))
    kind = draw(st.sampled_from(["as-is", "zeros", "duplicates", "outliers", "all-equal"]))
    if kind == "zeros":
        x[:] = 0
    elif kind == "duplicates":
        x[:, N // 2 :] = x[:, : N // 2]
    elif kind == "outliers":
        x[:, draw(st.integers(0, N - 1))] *= 1e6
    elif kind == "all-equal":
        x[:] = x[:, :1]
    return x


def pick(x: np.ndarray, method: str, k: int, rank: int = 4) -> torch.Tensor:
    cfg = S.PruneConfig(k=k, n=N, method=method, rank=rank, iterations=4)
    feats = torch.from_numpy(x)
    attn = torch.from_numpy(np.abs(x).sum(-1)) if method == S.CLS_ATTN else None
    scores = S.token_scores(feats, cfg, attn)
    return S.select_topk(scores, k, S.spatial_priority(N, GRID, k))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=features(), k=st.integers(1, N), method=st.sampled_from(SCORED))
def test_invariants(x: np.ndarray, k: int, method: str) -> None:
    idx = pick(x, method, k)
    assert idx.dtype == torch.int64 and idx.shape == (x.shape[0], k)
    for row in idx.tolist():
        assert row == sorted(row), "kept indices must be ascending (spatial order)"
        assert len(set(row)) == k, "kept indices must be unique"
        assert all(0 <= i < N for i in row), "kept indices must be in range"
    assert torch.equal(idx, pick(x, method, k)), "selection must be deterministic"


# random and cls_attn scores do not come from the (degenerate) features, so they are not here.
@pytest.mark.parametrize("method", [S.UNIFORM, S.NORM, "exact", "power", "gram"])
def test_degenerate_input_keeps_uniform_grid(method: str) -> None:
    """Zero features: every score ties, so the spatial priority decides -> the uniform grid."""
    grid = pick(np.zeros((1, N, 8), np.float32), S.UNIFORM, 16)
    assert torch.equal(pick(np.zeros((1, N, 8), np.float32), method, 16), grid)
    assert grid[0].tolist() == [9, 11, 13, 15, 25, 27, 29, 31, 41, 43, 45, 47, 57, 59, 61, 63]


def test_nan_rows_never_win() -> None:
    x = np.random.default_rng(0).normal(size=(1, N, 8)).astype(np.float32)
    x[0, :5] = np.nan
    for method in (S.NORM, "power", "gram", "exact"):
        assert not set(pick(x, method, 8)[0].tolist()) & set(range(5)), method


def test_uniform_grid_for_square_and_rectangular_k() -> None:
    prio = S.spatial_priority(576, (24, 24), 16)
    top = sorted(prio.topk(16).indices.tolist())
    assert top == [r * 24 + c for r in (3, 9, 15, 21) for c in (3, 9, 15, 21)]
    prio32 = S.spatial_priority(576, (24, 24), 32)
    assert len(set(prio32.tolist())) == 576  # a strict order: no ties left to chance
    prio_cls = S.spatial_priority(577, (24, 24), 16)  # "full" strategy keeps [CLS] first
    assert prio_cls[0] == prio_cls.min()


def test_none_keeps_everything_in_order() -> None:
    x = np.random.default_rng(1).normal(size=(2, N, 4)).astype(np.float32)
    assert torch.equal(pick(x, S.NONE, N), torch.arange(N).expand(2, N))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"k": 0}, "K must be in"),
        ({"k": N + 1}, "K must be in"),
        ({"method": "svd"}, "unknown method"),
        ({"method": S.NONE, "k": 8}, "keeps all tokens"),
        ({"rank": 0}, "rank"),
        ({"iterations": 0}, "iterations"),
    ],
)
def test_bad_config_is_refused(kw: dict, match: str) -> None:
    args = {"k": 8, "n": N, "rank": 4} | kw
    with pytest.raises(S.PruneError, match=match):
        S.PruneConfig(**args)
