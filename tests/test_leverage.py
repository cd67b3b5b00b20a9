"""Leverage approximations against float64 SVD: spectra with a clear gap, real photos, and
rank-deficient features (ranks 1..r + oversample, synthetic and real photos projected)."""

from __future__ import annotations

import pytest
import torch

from svdprune_onnx import leverage as lev
from svdprune_onnx.select import PruneConfig, score_levels, select_topk, spatial_priority

GRID = (24, 24)


def gapped(
    n: int = 576, d: int = 256, r: int = 16, gap: float = 1.2, seed: int = 0
) -> torch.Tensor:
    """(1, n, d) with singular values decaying slowly and s_r / s_{r+1} = gap exactly."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, 64, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, 64, generator=g, dtype=torch.float64))
    s = torch.cat([torch.linspace(3.0, 2.0, r), torch.linspace(2.0 / gap, 0.5, 64 - r)])
    return ((U * s.double()) @ V.T)[None].float()


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    prio = spatial_priority(a.shape[-1], GRID, k)
    x, y = select_topk(a, k, prio)[0].tolist(), select_topk(b.float(), k, prio)[0].tolist()
    return len(set(x) & set(y)) / k


@pytest.mark.parametrize("method", lev.APPROX_METHODS)
@pytest.mark.parametrize("gap", [1.2, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approximation_matches_exact_with_gap(method: str, gap: float, seed: int) -> None:
    X = gapped(gap=gap, seed=seed)
    ref = lev.leverage(X, 16, lev.EXACT, center=False)
    approx = lev.leverage(X, 16, method, iters=16, center=False)
    for k in (16, 32, 64):
        assert overlap(approx, ref, k) >= 0.95, (method, gap, seed, k)


@pytest.mark.parametrize("method", lev.APPROX_METHODS)
def test_scores_are_valid_leverage(method: str) -> None:
    X = gapped(seed=3)
    # power / gram: any iteration count gives r orthonormal columns; purify: its default steps
    iters = lev.DEFAULT_ITERATIONS[lev.PURIFY] if method == lev.PURIFY else 8
    scores = lev.leverage(X, 16, method, iters=iters)
    assert torch.isfinite(scores).all()
    assert scores.min() >= -1e-6 and scores.max() <= 1 + 1e-5  # 0 <= l_i <= 1
    assert scores.sum().item() == pytest.approx(16, abs=1e-3)  # sum_i l_i = r


def test_exact_float32_vs_float64() -> None:
    X = gapped(gap=1.5)
    U32, _, _ = torch.linalg.svd(X[0].float(), full_matrices=False)
    l32 = U32[:, :16].square().sum(-1)
    l64 = lev.exact_leverage(X, 16)[0]
    assert torch.allclose(l32.double(), l64, atol=1e-5)
    assert overlap(l32[None], l64[None], 16) == 1.0


def test_scale_invariant_and_batched() -> None:
    X = torch.cat([gapped(seed=4), gapped(seed=5)])  # (2, N, d)
    both = lev.leverage(X, 16, lev.GRAM, iters=8)
    scaled = lev.leverage(X * 1e4, 16, lev.GRAM, iters=8)
    one = lev.leverage(X[1:], 16, lev.GRAM, iters=8)
    assert torch.allclose(both, scaled, atol=1e-5)
    assert torch.allclose(both[1:], one, atol=1e-6)  # images do not interact


def test_orthonormalize_drops_dependent_columns() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(1, 100, 3, generator=g)
    Y = torch.cat([A, A[..., :1] * 2 + A[..., 1:2]], dim=-1)  # 4th column dependent
    Q = lev.orthonormalize(Y)
    assert torch.allclose(Q[..., 3], torch.zeros(1, 100))
    gram = Q[0, :, :3].T @ Q[0, :, :3]
    assert torch.allclose(gram, torch.eye(3), atol=1e-5)


def test_start_block_is_fixed() -> None:
    assert torch.equal(lev.start_block(576, 20, 0), lev.start_block(576, 20, 0))
    assert not torch.equal(lev.start_block(576, 20, 0), lev.start_block(576, 20, 1))


def test_bad_parameters_are_refused() -> None:
    X = gapped()
    with pytest.raises(ValueError, match="rank"):
        lev.leverage(X, 0)
    with pytest.raises(ValueError, match="iterations"):
        lev.leverage(X, 4, iters=0)
    with pytest.raises(ValueError, match="unknown"):
        lev.leverage(X, 4, method="svd")


@pytest.fixture(scope="module")
def photo_features(tiny_clip, clip_pixels) -> tuple[torch.Tensor, PruneConfig]:
    """The tiny CLIP's select-layer features of the 3 real photos, (3, 576, 64), and the
    default pruning config they are scored with."""
    from export.load import load_llava
    from svdprune_onnx.vision import PrunedVision

    module = PrunedVision(load_llava(tiny_clip), PruneConfig(k=16, n=576)).eval()
    with torch.no_grad():
        feats, _ = module.features(torch.from_numpy(clip_pixels))  # (3, 576, 64)
    return feats, module.prune


def test_real_photo_features_close_to_exact(photo_features) -> None:
    """On the tiny CLIP's features of the real photos, the default method tracks exact SVD."""
    feats, cfg = photo_features
    ref = lev.leverage(feats, cfg.rank, lev.EXACT, center=cfg.center)
    approx = lev.leverage(feats, cfg.rank, cfg.method, cfg.iterations, cfg.center)
    mass = [
        ref[b, approx[b].topk(16).indices].sum() / ref[b].topk(16).values.sum() for b in range(3)
    ]
    assert min(mass) >= 0.98, mass


# --- rank-deficient features: a blank page, a flat sky, a screenshot ----------------------------
#
# Exact leverage of a rank-k matrix (k < r) is well defined only if the float32 input is rank k
# to well past exact_leverage's cut-off (s_j <= 1e-7 s_1): the matrices are built in float64
# and rounded once, which leaves s_{k+1} ~ 1e-8 s_1, and every present direction stays
# resolvable by float32 Gram products (s_k >= 1e-2 s_1). `well_defined` checks both.

RANK_KINDS = ("gauss", "outliers", "sky")


def rank_k(kind: str, k: int, n: int = 576, d: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, d) float32 of numerical rank k.

    gauss: A (n, k) @ B (k, d) with the last n / 8 tokens exactly zero (blank patches);
    outliers: the same without zero rows, 3 tokens scaled 30x (huge-norm outlier tokens);
    sky: a large mean token plus a small rank k - 1 variation (near-constant tokens).
    """
    g = torch.Generator().manual_seed(1000 * seed + k)
    A = torch.randn(n, k, generator=g, dtype=torch.float64)
    B = torch.randn(k, d, generator=g, dtype=torch.float64)
    if kind == "gauss":
        A[-n // 8 :] = 0
    elif kind == "outliers":
        A[torch.randperm(n, generator=g)[:3]] *= 30
    elif kind == "sky":
        A = torch.cat([torch.full((n, 1), 10.0, dtype=torch.float64), 0.5 * A[:, 1:]], dim=1)
    return (A @ B).float()


def project(X: torch.Tensor, k: int, outliers: bool = False) -> torch.Tensor:
    """Real features (n, d) projected onto their top-k singular directions, rounded once."""
    U, s, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    Xk = (U[:, :k] * s[:k]) @ Vh[:k]
    if outliers:  # scaling rows keeps the rank
        Xk[torch.randperm(len(Xk), generator=torch.Generator().manual_seed(k))[:3]] *= 30
    return Xk.float()


def well_defined(X: torch.Tensor, k: int) -> None:
    s = torch.linalg.svdvals(X.double())  # (..., min(n, d))
    assert (s[..., k - 1] > 1e-2 * s[..., 0]).all(), "a present direction is unresolvable"
    if k < s.shape[-1]:
        assert (s[..., k] < 5e-8 * s[..., 0]).all(), "rounding noise near exact's cut-off"


def agreement(picks: torch.Tensor, ref: torch.Tensor, k: int, grid=GRID) -> tuple[list, list]:
    """Kept indices (B, K) vs exact's top-K, per matrix: overlaps (None where exact ties at its
    K-th score at the selector's resolution, e.g. rank < K: any of the tied picks is right) and
    leverage-mass shares sum_{picks} l / sum_{exact picks} l, with exact scores l (B, N).
    """
    best = select_topk(ref.float(), k, spatial_priority(ref.shape[-1], grid, k))
    top = ref.sort(dim=-1, descending=True).values  # (B, N)
    tied = top[:, k - 1] - top[:, k] <= 4 / score_levels(ref.shape[-1]) * top[:, 0]
    overlaps = [
        None if t else len(set(a.tolist()) & set(e.tolist())) / k
        for a, e, t in zip(picks, best, tied, strict=True)
    ]
    mass = (ref.gather(1, picks).sum(1) / ref.gather(1, best).sum(1).clamp_min(1e-30)).tolist()
    return overlaps, mass


def check_rank_deficient(
    approx: torch.Tensor,
    picks: torch.Tensor,
    ref: torch.Tensor,
    ranks: list[int],
    r: int,
    method: str,
    grid: tuple[int, int] = GRID,
    converged: bool = True,
) -> None:
    """Scores (B, N) and kept indices (B, K) of matrices of numerical ranks `ranks` against
    exact leverage `ref` (B, N): exact when rank <= r, close when r < rank <= p (gram, with
    `converged`: the default 16 iterations, not a short test run)."""
    overlaps, mass = agreement(picks, ref, picks.shape[1], grid)
    ranks_t = torch.tensor(ranks)
    low = ranks_t <= r
    # Sum of scores = number of directions kept: a noise column would add ~1. purify with
    # r < rank: lambda_r / lambda_r+1 down to 1.02 here, and such near-ties may end shared
    # between two directions (fractional eigenvalues) after the default steps.
    sums = (approx.sum(1).double() - ranks_t.clamp_max(r)).abs()
    err = sums[low].max().item() if method == lev.PURIFY else sums.max().item()
    assert err <= 1e-3, f"{method}: scores sum to min(rank, r) +- {err:.2f}"
    assert sums.max().item() <= 1.0, f"{method}: scores sum to min(rank, r) +- {sums.max():.2f}"
    # rank <= r: the basis spans range(X), so the scores are exact (l_i <= 1: absolute tol).
    err = (approx[low] - ref[low]).abs().max().item()
    assert err <= 1e-4, f"{method}: rank <= r scores off exact by {err:.2e}"
    for ov, ms, rk in zip(overlaps, mass, ranks, strict=True):
        if rk <= r:
            assert ms >= 0.9999 and ov in (None, 1.0), (method, rk, ov, ms)
    # r < rank <= p: gram's block holds every direction; purify has no block
    if method in (lev.GRAM, lev.PURIFY) and converged:
        hi = [i for i, rk in enumerate(ranks) if rk > r]
        assert min(mass[i] for i in hi) >= 0.95, [mass[i] for i in hi]
        defined = [overlaps[i] for i in hi if overlaps[i] is not None]
        assert sum(defined) / len(defined) >= 0.9, defined


def score_and_check(X: torch.Tensor, ranks: list[int], r: int, k: int, method: str) -> None:
    """Score X (B, N, d) at the default iterations / oversampling and check against exact."""
    for x, rk in zip(X, ranks, strict=True):
        well_defined(x, rk)
    cfg = PruneConfig(k=k, n=X.shape[1], method=method, rank=r)
    approx = lev.leverage(X, r, method, cfg.iterations, cfg.center, cfg.oversample)
    picks = select_topk(approx, k, spatial_priority(X.shape[1], GRID, k))
    check_rank_deficient(approx, picks, lev.leverage(X, r, lev.EXACT), ranks, r, method)


@pytest.mark.parametrize("method", lev.APPROX_METHODS)
@pytest.mark.parametrize(("r", "k"), [(8, 16), (4, 8)])
def test_rank_deficient_features_match_exact(method: str, r: int, k: int) -> None:
    """Every rank 1..p (p = r + 4, gram's block width) on three synthetic kinds."""
    p = lev.block_width(lev.GRAM, r, 4, 576)
    ranks = [rk for rk in range(1, p + 1) for _ in RANK_KINDS]
    X = torch.stack([rank_k(kind, rk) for rk in range(1, p + 1) for kind in RANK_KINDS])
    score_and_check(X, ranks, r, k, method)


@pytest.mark.parametrize("method", lev.APPROX_METHODS)
def test_rank_deficient_photo_features_match_exact(photo_features, method: str) -> None:
    """Real-photo features projected onto rank 1..p (with and without 3 outlier tokens), scored
    at the default rank / iterations / oversampling."""
    feats, cfg = photo_features
    p = lev.block_width(lev.GRAM, cfg.rank, cfg.oversample, cfg.n)
    cases = [(x, rk, out) for x in feats for rk in range(1, p + 1) for out in (False, True)]
    X = torch.stack([project(x, rk, out) for x, rk, out in cases])
    score_and_check(X, [rk for _, rk, _ in cases], cfg.rank, cfg.k, method)


# --- TF32: Ampere GPUs run float32 GEMMs with 10-bit-mantissa inputs by default ---------------


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32's 10-bit mantissa (to nearest), as tensor cores read GEMM inputs."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.fixture
def tf32_matmuls(monkeypatch):
    matmul = torch.Tensor.__matmul__

    def tf32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype == b.dtype == torch.float32:
            return matmul(_tf32(a), _tf32(b))
        return matmul(a, b)  # float64 (the exact reference, test inputs) as it is

    monkeypatch.setattr(torch.Tensor, "__matmul__", tf32_matmul)


def test_purify_under_tf32(photo_features, tf32_matmuls) -> None:
    """purify corrects its own rounding: TF32 keeps exact's picks on photo features, and at
    rank = r (where r directions sit at 1 + eps and repeated squaring would blow them up) the
    scores stay exact to TF32's precision."""
    feats, cfg = photo_features
    ref = lev.leverage(feats, cfg.rank, lev.EXACT)
    got = lev.leverage(feats, cfg.rank, lev.PURIFY, cfg.iterations)
    assert all(overlap(got[b : b + 1], ref[b : b + 1], 16) == 1.0 for b in range(len(feats)))
    X = torch.stack([rank_k(kind, 8) for kind in RANK_KINDS])  # rank 8 = r
    ref = lev.leverage(X.double(), 8, lev.EXACT)  # float64: no TF32 in the reference
    got = lev.leverage(X, 8, lev.PURIFY, cfg.iterations)
    assert (got - ref).abs().max() <= 5e-3 and (got.sum(1) - 8).abs().max() <= 5e-3
