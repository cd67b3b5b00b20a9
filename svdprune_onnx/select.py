"""Token scorers and the fixed-K selector, behind one interface.

    features (B, N, d) ─► score (B, N) ─► + tie-break priority ─► TopK ─► sort ascending
                                                                   └─► kept indices (B, K) int64

Every method (leverage approximations and baselines) yields scores; the selector is shared, so
the invariants hold for all of them: K indices per image, unique, in range, ascending (original
spatial order), deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from svdprune_onnx import leverage as lev

NONE, RANDOM, UNIFORM, NORM, CLS_ATTN = "none", "random", "uniform", "norm", "cls_attn"
BASELINES = (NONE, RANDOM, UNIFORM, NORM, CLS_ATTN)
METHODS = (*lev.LEVERAGE_METHODS, *BASELINES)
EXPORTABLE_METHODS = tuple(m for m in METHODS if m != lev.EXACT)
# Scores are divided by their per-image max |score| (ranking is scale-invariant), then this much
# of the spatial priority is added: it only decides between scores equal to ~1e-6.
TIE_BREAK = 1e-6


class PruneError(ValueError):
    """Bad pruning parameters; the message says which flag to change."""


@dataclass(frozen=True)
class PruneConfig:
    """Resolved pruning parameters (what the manifest records)."""

    k: int
    n: int
    # Defaults picked by `make bench-fidelity` (README): the cheapest setting that meets
    # overlap >= 0.98 and leverage-mass share >= 0.995 against exact SVD at K = 16, 32 and 64.
    method: str = lev.GRAM
    rank: int = 8
    iterations: int = 16
    center: bool = False
    oversample: int = 4
    scored_features: str = "vision"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == NONE and self.k != self.n:
            raise PruneError(f"method 'none' keeps all tokens: use --k {self.n} (N), not {self.k}")
        if not 1 <= self.k <= self.n:
            raise PruneError(f"K must be in 1..{self.n} (tokens per image), got {self.k}; fix --k")
        if self.method in lev.LEVERAGE_METHODS and not 1 <= self.rank <= self.n:
            raise PruneError(f"rank must be in 1..{self.n}, got {self.rank}; fix --rank")
        if self.iterations < 1:
            raise PruneError(f"iterations must be >= 1, got {self.iterations}; fix --iters")


def _grid_points(h: int, w: int, k: int) -> list[int] | None:
    """Row-major token indices of an a x b grid of cell centres with a*b = K, or None.

    The factor pair closest to the image's aspect ratio wins; none within 2x of it -> None
    (K prime, say), and the caller falls back to farthest-point order.
    """
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= h and k // a <= w]
    if not pairs:
        return None
    a, b = min(pairs, key=lambda p: abs(math.log((p[0] / p[1]) / (h / w))))
    if abs(math.log((a / b) / (h / w))) > math.log(2):
        return None
    rows = [int((i + 0.5) * h / a) for i in range(a)]
    cols = [int((j + 0.5) * w / b) for j in range(b)]
    return [r * w + c for r in rows for c in cols]


def spatial_priority(n: int, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Priority in [0, 1) per token, (N,): the K-point uniform grid first, then farthest-point.

    Used as the `uniform` baseline's score and as every method's tie-break, so a degenerate
    input (all scores equal) keeps the uniform grid. Tokens outside the h x w grid (a leading
    [CLS] under the "full" strategy) come last.
    """
    h, w = grid
    extra = n - h * w
    if extra < 0:
        raise PruneError(f"{n} tokens cannot hold a {h}x{w} patch grid")
    yx = np.stack(np.divmod(np.arange(h * w), w), axis=1).astype(np.float64)
    order = _grid_points(h, w, min(k, h * w)) or [(h // 2) * w + w // 2]
    dist = np.min(((yx[:, None, :] - yx[order][None, :, :]) ** 2).sum(-1), axis=1)
    dist[order] = -1.0
    while len(order) < h * w:  # greedy farthest-point: ties -> lowest index (argmax)
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, ((yx - yx[nxt]) ** 2).sum(-1))
        dist[order] = -1.0
    prio = np.empty(n, dtype=np.float32)
    prio[[extra + i for i in order]] = 1.0 - (np.arange(h * w) + 1) / (n + 1)
    prio[:extra] = 1.0 - (np.arange(h * w, n) + 1) / (n + 1)
    return torch.from_numpy(prio)


def random_scores(n: int, seed: int) -> torch.Tensor:
    """Fixed-seed random scores (N,), stored as a constant in the graph."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def score_constant(cfg: PruneConfig) -> torch.Tensor | None:
    """The method's fixed-seed constant: leverage start block (N, p) or random scores (N,)."""
    if cfg.method in lev.APPROX_METHODS:
        p = lev.block_width(cfg.method, cfg.rank, cfg.oversample, cfg.n)
        return lev.start_block(cfg.n, p, cfg.seed)
    if cfg.method == RANDOM:
        return random_scores(cfg.n, cfg.seed)
    return None


def token_scores(
    feats: torch.Tensor,
    cfg: PruneConfig,
    cls_attn: torch.Tensor | None = None,
    const: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score tokens: (B, N, d) -> (B, N). Higher = keep.

    `cls_attn` (B, N) feeds that baseline; `const` is `score_constant(cfg)` (built here when
    omitted; pass it as a module buffer when tracing).
    """
    B, N, _ = feats.shape
    if const is None:
        const = score_constant(cfg)
    if cfg.method in lev.LEVERAGE_METHODS:
        return lev.leverage(
            feats, cfg.rank, cfg.method, cfg.iterations, cfg.center, cfg.oversample, start=const
        )
    if cfg.method == NORM:
        return lev.prepare(feats, center=False).square().sum(dim=-1)
    if cfg.method == CLS_ATTN:
        if cls_attn is None:
            raise PruneError("method 'cls_attn' needs the select layer's attention map")
        return cls_attn
    if cfg.method == RANDOM:
        return const.to(feats.device).expand(B, N)
    # uniform and none: no data-dependent score; the priority alone orders the tokens.
    return torch.zeros(B, N, dtype=torch.float32, device=feats.device)


def select_topk(scores: torch.Tensor, k: int, priority: torch.Tensor) -> torch.Tensor:
    """Top-K token indices, ascending: (B, N) scores, (N,) priority -> (B, K) int64.

    NaN/Inf scores count as the lowest score (0 after normalisation, below any positive one),
    so a corrupt score never wins and the output is always K valid, unique indices.
    """
    s = scores.float()
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    s = s / s.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # (B, N) in [-1, 1]
    s = s + TIE_BREAK * priority.to(s.device)
    idx = torch.topk(s, k, dim=1).indices  # (B, K), by score
    return torch.sort(idx, dim=1).values  # (B, K), spatial order
