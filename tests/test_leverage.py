"""Leverage approximations against float64 SVD, on spectra with a clear gap and on real photos."""

from __future__ import annotations

import pytest
import torch

from svdprune_onnx import leverage as lev
from svdprune_onnx.select import select_topk, spatial_priority

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
    scores = lev.leverage(X, 16, method, iters=8)
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


def test_real_photo_features_close_to_exact(tiny_clip, clip_pixels) -> None:
    """On the tiny CLIP's features of the real photos, the default method tracks exact SVD."""
    from export.load import load_llava
    from svdprune_onnx.select import PruneConfig
    from svdprune_onnx.vision import PrunedVision

    module = PrunedVision(load_llava(tiny_clip), PruneConfig(k=16, n=576)).eval()
    with torch.no_grad():
        feats, _ = module.features(torch.from_numpy(clip_pixels))  # (3, 576, 64)
    cfg = module.prune
    ref = lev.leverage(feats, cfg.rank, lev.EXACT, center=cfg.center)
    approx = lev.leverage(feats, cfg.rank, cfg.method, cfg.iterations, cfg.center)
    mass = [
        ref[b, approx[b].topk(16).indices].sum() / ref[b].topk(16).values.sum() for b in range(3)
    ]
    assert min(mass) >= 0.98, mass
