"""Scale-relative comparisons and kept-token agreement: how export validation and the device
self-test judge "the same answer" (numpy only, so the runtime can use it on the device).

Absolute tolerances tuned on random weights fail (or pass vacuously) on real ones: real towers
have tokens 10-100x the median norm, real decoders residual units 100-1000x the rest. So every
tensor is compared relative to its own scale, max |a - ref| / max |ref|, and the pruning is
judged by two figures per image rather than by exact index equality (a token on the border of
the top-K may flip between kernels, providers or precisions):

    agreement  |kept ∩ kept_ref| / K
    mass       sum(score_ref[kept]) / sum(score_ref[kept_ref])   (share of the reference's
               leverage mass that the kept set captures; 1 when the scores carry no mass)
"""

from __future__ import annotations

import numpy as np

# float32 graphs vs PyTorch float32 (same algorithm, other kernels): relative to the tensor scale.
FEATURE_RTOL = 1e-4  # image_features, rows whose kept index agrees
DECODER_RTOL = 1e-4  # logits and every present key/value
# Floors below which the pruning no longer counts as the same: one flip in 8 kept tokens is
# allowed (K = 16: two flips), and the kept set must hold 98 % of the reference's score mass.
AGREEMENT_FLOOR = 0.875
MASS_FLOOR = 0.98


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref| (inf when a has NaN/Inf, or when ref is all zero and a is not)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {ref.shape}")
    if a.size == 0:
        return 0.0
    if not np.isfinite(a).all():
        return float("inf")
    diff = float(np.abs(a - ref).max())
    scale = float(np.abs(ref).max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def kept_agreement(kept: np.ndarray, ref_kept: np.ndarray) -> np.ndarray:
    """(B,) share of each image's kept indices that the reference kept too. Rows padded with -1
    (a batch of images with different counts) count their real indices only."""
    kept, ref_kept = np.asarray(kept), np.asarray(ref_kept)
    return np.array([
        len(np.intersect1d(a[a >= 0], b[b >= 0])) / max(int((b >= 0).sum()), 1)
        for a, b in zip(kept, ref_kept, strict=True)
    ])  # fmt: skip


def kept_mass(kept: np.ndarray, ref_kept: np.ndarray, ref_scores: np.ndarray) -> np.ndarray:
    """(B,) reference score mass on `kept` over the mass on `ref_kept` (1 where it is zero)."""
    s = np.clip(np.nan_to_num(np.asarray(ref_scores, np.float64)), 0.0, None)  # (B, N)
    kept, ref_kept = np.asarray(kept), np.asarray(ref_kept)

    def mass(idx: np.ndarray) -> np.ndarray:  # -1 padding carries no mass
        return np.where(idx >= 0, np.take_along_axis(s, np.maximum(idx, 0), axis=1), 0).sum(1)

    got, best = mass(kept), mass(ref_kept)
    return np.where(best > 0, got / np.where(best > 0, best, 1.0), 1.0)


def selection_figures(kept, ref_kept, ref_scores) -> dict[str, float]:
    """{agreement_min, agreement_mean, mass_min, mass_mean} over a batch of images."""
    agree = kept_agreement(kept, ref_kept)
    mass = kept_mass(kept, ref_kept, ref_scores)
    return {
        "agreement_min": float(agree.min()),
        "agreement_mean": float(agree.mean()),
        "mass_min": float(mass.min()),
        "mass_mean": float(mass.mean()),
    }


def below_floor(fig: dict[str, float]) -> str | None:
    """Why selection figures fail the floors, or None when they pass."""
    if fig["agreement_min"] < AGREEMENT_FLOOR:
        return f"kept-index agreement {fig['agreement_min']:.3f} < floor {AGREEMENT_FLOOR}"
    if fig["mass_min"] < MASS_FLOOR:
        return f"kept leverage mass {fig['mass_min']:.4f} < floor {MASS_FLOOR}"
    return None
