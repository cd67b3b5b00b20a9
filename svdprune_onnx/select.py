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
# float32 holds every integer below 2**24 exactly: the selection key (score level, priority
# rank) is packed into one such integer, so ties are broken exactly (see select_topk).
EXACT_INT = 2**24


def score_levels(n: int) -> int:
    """Levels per unit of normalised score: the largest power of two with
    (2 * levels + 1) * (n + 1) < 2**24 (8192 for N = 576), so the packed key stays exact."""
    levels = 1
    while (4 * levels + 1) * (n + 1) < EXACT_INT:
        levels *= 2
    return levels


class PruneError(ValueError):
    """Bad pruning parameters; the message says which flag to change."""


@dataclass(frozen=True)
class PruneConfig:
    """Resolved pruning parameters (what the manifest records)."""

    k: int
    n: int
    # Defaults picked by `make bench-fidelity` (README): overlap >= 0.98 and leverage-mass
    # share >= 0.995 against exact SVD at K = 16, 32 and 64, from a pruning subgraph of 263
    # nodes (`purify`: its node count does not grow with r, unlike power / gram).
    method: str = lev.PURIFY
    rank: int = 8
    iterations: int | None = None  # None: the method's own default (lev.DEFAULT_ITERATIONS)
    center: bool = False
    oversample: int = 4
    scored_features: str = "vision"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PruneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.iterations is None:  # resolved here, so the manifest records the number
            object.__setattr__(self, "iterations", lev.DEFAULT_ITERATIONS.get(self.method, 16))
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
    """The method's fixed-seed constant: power / gram start block (N, p) or random scores (N,)."""
    if cfg.method in lev.SUBSPACE_METHODS:
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

        scores ─► NaN/Inf -> 0 ─► / max|score| ─► round to 1/L ─┐
        priority (N,) ─► rank 0..N (higher = first) ────────────┴─► key = level * (N+1) + rank
        key (B, N), all distinct, exact in float32 ─► TopK ─► sort ascending

    NaN/Inf scores count as 0 (below any positive one), so a corrupt score never wins. Scores
    within 1/L (~1e-4) of each other tie on purpose: float32 noise (which differs between
    PyTorch and ORT kernels) must not pick between equal scores (all-equal tokens each score
    1/N); the spatial priority does. Distinct keys make TopK's answer unique in every runtime.
    """
    n = priority.shape[0]
    levels = score_levels(int(n))
    s = scores.float()
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    s = s / s.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # (B, N) in [-1, 1]
    rank = torch.round(priority.to(s.device) * (n + 1))  # (N,) distinct integers in 0..N
    key = torch.round(s * levels) * (n + 1) + rank  # (B, N) integers, |key| < 2**24
    idx = torch.topk(key, k, dim=1).indices  # (B, K), by key
    return torch.sort(idx, dim=1).values  # (B, K), spatial order
