"""Consistency and accuracy metrics, numpy only.

Per question the runner records the answer ("yes" / "no" / "other"), the first-token logits
(V,) and, for pruned runs, the same for the unpruned reference. From those:

    accuracy        mean(answer == label)
    yes_ratio       mean(answer == "yes")          (POPE's bias check: 0.5 on balanced data)
    flip_rate       mean(answer != reference answer)
    first_token_kl  mean KL(P_ref || P_pruned) over the first generated token, in nats
    top1_agreement  mean(argmax logits == argmax reference logits)

and per image, from the scored vision features X (N, d) with singular values s:

    ipr             sum_j p_j^2, p_j = s_j^2 / sum_k s_k^2   (LoFi's spectral signal)
    leverage_mass   sum_{i in kept} l_i / sum_i l_i          (l = exact rank-r leverage)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) -> (..., V) float64 log-probabilities (max-shifted, so huge logits are safe)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) in nats from logits, (..., V) x2 -> (...). 0 iff the softmaxes agree."""
    lp_ref, lp = log_softmax(ref_logits), log_softmax(logits)
    p_ref = np.exp(lp_ref)
    # 0 * log 0 = 0: tokens the reference gives no mass contribute nothing.
    terms = np.where(p_ref > 0, p_ref * (lp_ref - lp), 0.0)
    return np.maximum(terms.sum(axis=-1), 0.0)  # rounding can give -1e-17


def top1_agree(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Whether the greedy first token is the same, (..., V) x2 -> (...) bool."""
    return np.argmax(ref_logits, axis=-1) == np.argmax(logits, axis=-1)


def flip_rate(ref_answers: Sequence[str], answers: Sequence[str]) -> float:
    """Share of answers that differ from the reference model's answer to the same question."""
    if len(ref_answers) != len(answers):
        raise ValueError(f"{len(ref_answers)} reference answers vs {len(answers)} answers")
    if not answers:
        return float("nan")
    return float(np.mean([a != r for a, r in zip(answers, ref_answers, strict=True)]))


def accuracy(labels: Sequence[str], answers: Sequence[str]) -> float:
    """Share of answers equal to the ground-truth label ("other" is always wrong)."""
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels vs {len(answers)} answers")
    if not answers:
        return float("nan")
    return float(np.mean([a == y for a, y in zip(answers, labels, strict=True)]))


def yes_ratio(answers: Sequence[str]) -> float:
    """Share of "yes" answers."""
    return float(np.mean([a == "yes" for a in answers])) if answers else float("nan")


def ipr(singular_values: np.ndarray) -> float:
    """Inverse participation ratio of a singular-value spectrum s (any order, s >= 0).

    p_j = s_j^2 / sum_k s_k^2 (the share of the energy ||X||_F^2 in direction j) and
    IPR = sum_j p_j^2, in [1 / len(s), 1]: 1 when one direction holds all the energy (rank 1),
    1 / len(s) for a flat spectrum. 1 / IPR is the participation ratio, an effective rank.
    An all-zero spectrum has no distribution: NaN.
    """
    e = np.square(np.asarray(singular_values, dtype=np.float64))
    total = e.sum()
    if not total > 0:
        return float("nan")
    p = e / total
    return float(np.square(p).sum())


def spectrum_ipr(X: np.ndarray) -> float:
    """IPR of the singular values of a feature matrix X (N, d)."""
    return ipr(np.linalg.svd(np.asarray(X, dtype=np.float64), compute_uv=False))


def leverage_mass(lev: np.ndarray, kept: Sequence[int]) -> float:
    """Share of the leverage l (N,) on the kept token indices; NaN when sum(l) is 0."""
    lev = np.asarray(lev, dtype=np.float64)
    total = lev.sum()
    return float(lev[np.asarray(kept, dtype=np.int64)].sum() / total) if total > 0 else float("nan")


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in range(1, len(x) + 1):  # runs of equal values share the mean of their positions
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the tie-averaged ranks).

    Pairs with a NaN are dropped. NaN when fewer than 3 pairs remain or either side is
    constant (no ranking to correlate, e.g. a method that flips no answer at all).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equal lengths, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")
