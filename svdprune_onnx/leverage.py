"""Rank-r leverage scores of token features, in torch ops that export to plain ONNX.

X (B, N, d) holds N token feature rows. With X = U S V^T, token i's rank-r leverage is
l_i = ||U_r[i, :]||^2 (0 <= l_i <= 1, sum_i l_i = r). The scores depend only on the top-r left
singular *subspace*, so any orthonormal basis Q of it gives the same l_i = ||Q[i, :]||^2.

`exact` uses float64 torch.linalg.svd (the reference, not exportable). The exportable methods use
only MatMul, elementwise, reduction and concat ops with Python-unrolled fixed iteration counts, so
the ONNX graph has no Loop/If/Scan and no SVD/QR/inverse (ONNX has none):

  purify  the rank-r spectral projector of G = X X^T by trace-correcting purification (SP2):
          one (N, N) MatMul per step, no basis and no orthonormalisation, so the graph has
          ~10 nodes per step whatever r is (263 nodes in all at the defaults)
  power   subspace iteration on G = X X^T, orthonormalised (CGS2) after every step
  gram    oversampled subspace iteration with a degree-2 Chebyshev filter whose cut-off is
          re-estimated every step from the Rayleigh quotient of the last oversampling column;
          converges ~2x faster per G-product than `power` when s_r / s_{r+1} is close to 1.
          On rank-deficient X (numerical rank k < p) columns without a resolvable direction
          are zeroed and the cut-off comes from the live ones: exact scores for k <= r, and
          still oversampled for r < k < p (see cheb_basis).

power and gram never form G: G @ Q = X @ (X^T @ Q) costs 4·N·d·p flops instead of 2·N²·d.
Their graphs unroll Gram-Schmidt over the p columns, so they grow with r x iterations.
"""

from __future__ import annotations

import torch

EXACT = "exact"
PURIFY = "purify"
POWER = "power"
GRAM = "gram"
APPROX_METHODS = (PURIFY, POWER, GRAM)
SUBSPACE_METHODS = (POWER, GRAM)  # iterate an (N, p) block from a fixed-seed start
LEVERAGE_METHODS = (EXACT, *APPROX_METHODS)

# A column whose norm falls below this fraction of its norm before orthogonalisation is
# numerically dependent on the previous ones (float32 rounding leaves ~1e-6 of noise); it is
# dropped (zeroed) instead of being normalised into a random direction.
DROP_TOL = 1e-5
# A column of the `gram` block whose Rayleigh quotient is at most this fraction of the largest
# carries no direction that float32 resolves: it is numerically in the null space of G (k < p).
# Such noise columns measure rho / rho_max <= ~1.2e-7 on rank-deficient inputs, genuine columns
# of real CLIP-L features >= ~9e-5 (r = 64, no centring): 1e-6 sits between, with margin both ways.
LIVE_TOL = 1e-6
_TINY = 1e-30
# Iterations when none are given (`make bench-fidelity` picked them: README). purify counts
# (N, N) products, power and gram products with G (each two (N, d) x (d, p) MatMuls).
DEFAULT_ITERATIONS = {PURIFY: 24, POWER: 16, GRAM: 16}
# purify: at most this many doublings in a row; then P is held (see purify_scores).
# 2^-16 ~ 1.5e-5: directions with lambda below that fraction of ||G||_F are numerically absent
# (float32 noise in G sits at ~1e-7, genuine directions of real CLIP-L features >= ~9e-5).
MAX_LIFT = 16
# purify squares only when trace(P) > r + TRACE_SLACK: with exactly r directions at 1, rounding
# puts them at 1 + eps (TF32 matmuls on Ampere GPUs: eps ~ 5e-4), trace(P) > r, and squaring
# again and again would blow them up; doubling pulls 1 + eps back to 1 - eps^2. What the slack
# leaves on lambda_{r+1} (<= 0.01) the McWeeny steps take to ~1e-7.
TRACE_SLACK = 0.01
# purify: McWeeny steps 3P^2 - 2P^3 that finish it (they round eigenvalues to 0 or 1).
N_MCWEENY = 2


def prepare(X: torch.Tensor, center: bool) -> torch.Tensor:
    """Sanitise and scale features: (B, N, d) -> (B, N, d) float32.

    Non-finite entries (NaN, +-Inf) become 0, so one corrupt feature cannot poison the Gram
    matrix. Each image is divided by its largest |entry| (leverage is scale-invariant) so that
    X X^T cannot overflow float32 even for huge-norm outlier tokens. With `center`, the mean
    token is subtracted first (leverage then ranks tokens by how they differ from the mean).
    """
    X = X.float()
    X = torch.where(torch.isfinite(X), X, 0.0)  # a scalar: no (B, N, d) constant when traced
    if center:
        X = X - X.mean(dim=1, keepdim=True)
    scale = X.abs().amax(dim=(1, 2), keepdim=True).clamp_min(_TINY)
    return X / scale


def start_block(n: int, p: int, seed: int) -> torch.Tensor:
    """Fixed-seed Gaussian start block (n, p); stored as a constant in the exported graph."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=gen, dtype=torch.float32)


def _gram_apply(X: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    # (B, N, d), (B, N, p) -> (B, N, p): G Q without forming the N x N Gram matrix.
    return X @ (X.transpose(1, 2) @ Q)


def orthonormalize(Y: torch.Tensor, drop_tol: float = DROP_TOL) -> torch.Tensor:
    """Column-wise classical Gram-Schmidt, done twice per column (CGS2): (B, N, p) -> (B, N, p).

    "Twice is enough": the second pass restores orthogonality to float32 precision even when
    the first loses it to cancellation. Unrolled over the p columns (p is fixed at export).
    Columns that are numerically dependent come out as exact zeros.
    """
    cols: list[torch.Tensor] = []
    Q: torch.Tensor | None = None
    for j in range(Y.shape[-1]):
        v = Y[..., j : j + 1]  # (B, N, 1)
        n0 = v.square().sum(dim=1, keepdim=True).sqrt()
        if Q is not None:
            for _ in range(2):
                v = v - Q @ (Q.transpose(1, 2) @ v)
        n = v.square().sum(dim=1, keepdim=True).sqrt()
        keep = n > drop_tol * n0
        q = torch.where(keep, v / n.clamp_min(_TINY), torch.zeros_like(v))
        cols.append(q)
        Q = torch.cat(cols, dim=-1)
    assert Q is not None, "orthonormalize needs at least one column"
    return Q


def block_width(method: str, rank: int, oversample: int, n: int) -> int:
    """Columns p of the iterated block: r for `power`, r + oversample (at most N) for `gram`."""
    return rank if method == POWER else min(rank + max(oversample, 1), n)


def power_basis(X: torch.Tensor, start: torch.Tensor, iters: int) -> torch.Tensor:
    """Subspace iteration: Q <- orth(G Q), `iters` products with G. (B, N, d) -> (B, N, r).

    `start` (N, r) is the fixed-seed start block, a constant of the graph.
    """
    Q = start.to(X.dtype).expand(X.shape[0], -1, -1)
    for _ in range(iters):
        Q = orthonormalize(_gram_apply(X, Q))
    return Q


def _take_columns(Q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # (B, N, p), (B, m) -> (B, N, m): the same column subset for every row.
    return Q.gather(2, idx.unsqueeze(1).expand(-1, Q.shape[1], -1))


def _rayleigh(Q: torch.Tensor, GQ: torch.Tensor) -> torch.Tensor:
    # Rayleigh quotients of orthonormal columns, diag(Q^T G Q): (B, N, p) x2 -> (B, p).
    return (Q * GQ).sum(dim=1)


def cheb_basis(X: torch.Tensor, start: torch.Tensor, rank: int, iters: int) -> torch.Tensor:
    """Chebyshev-filtered oversampled subspace iteration. (B, N, d) -> (B, N, r).

    `iters` counts products with G, so cost compares with `power` at the same value: one builds
    the start basis, each filter step of degree 2 takes two, a last odd one is a plain power
    step, and one more gives the final Rayleigh quotients. With `start` (N, p), p = r + oversample:

        Q (B,N,p) ─► GQ = G Q ─► ρ = diag(Q^T G Q) ─► sort columns by ρ, descending
                          live = ρ > LIVE_TOL · ρ_1     dead columns of Q, GQ -> exact zeros
                          b = ρ_p (≈ λ_p <= λ_{r+1}: the cut-off)        if all p are live
                          b = Gershgorin lower bound of Q^T G Q (p, p)   if any column is dead
                          c = e = b / 2
        Y1 = (GQ - c Q) / e                 maps [0, b] onto [-1, 1]
        Y2 = 2 (G Y1 - c Y1) / e - Q        = T_2((G - c) / e) Q: |T_2| <= 1 on [0, b],
        Q  = orth(Y2)                       grows like cosh(2 acosh x) above it
        ... ─► ρ again, dead columns zeroed ─► keep the r columns with the largest ρ
               (a diagonal Rayleigh-Ritz step)

    Sorting by ρ lets two nearly equal eigenvalues at the r / r+1 boundary trade places instead
    of leaving the wrong one in the first r columns, which is where plain subspace iteration
    stalls. Degree 2 per orthonormalisation: degree 3 already lets λ_1^3 / λ_r^3 outgrow what
    float32 Gram-Schmidt resolves on features with huge-norm outlier tokens.

    Rank-deficient X (numerical rank k < p: a blank page, a flat sky, a screenshot): after the
    first product the block spans all of range(X), and its other p - k columns are dropped by
    `orthonormalize` (exact zeros, ρ = 0) or are float32 noise nearly orthogonal to range(X)
    (ρ ~ 1e-7 ρ_1). Both are dead:
      - noise is zeroed because T_2 maps λ = 0 to 1: the filter would carry a noise column
        along, and `topk` would keep it when k < r and add its random squares to the scores;
      - the cut-off ignores dead columns: ρ_p ~ 0 there, (G - c) / e overflows, every column
        drops and all scores are 0 (the selector then keeps its uniform grid);
      - the smallest *live* ρ is no safe cut-off either: while the columns are still mixed it
        overestimates λ_k, and T_2 has roots at 0.146 b and 0.854 b that can wipe out a wanted
        direction for good. Gershgorin's bound min_j (ρ_j - sum_{i != j} |(Q^T G Q)_ij|) over
        live j is <= the smallest Ritz value of the live block <= λ_{#live} (interlacing), so
        nothing the block holds is damped: with k <= r live columns the block is the answer
        already and the step keeps its span; with r < k < p the bound tightens towards λ_k as
        the columns converge and the filter still separates λ_r from λ_{r+1}. It is floored
        at LIVE_TOL · ρ_1 (mixed columns give a negative bound; the step then acts like G^2).
    A healthy full-rank block has no dead column and keeps b = ρ_p: its scores are bit for bit
    those of the filter without this fallback. All of it is tensor-valued (Where, ReduceMin,
    comparisons, one (p, p) MatMul per step): no data-dependent Python branch, so the graph
    stays Loop/If-free.
    """
    Q = start.to(X.dtype).expand(X.shape[0], -1, -1)
    Q = orthonormalize(_gram_apply(X, Q))
    n_filter, n_plain = divmod(max(iters - 2, 0), 2)
    for _ in range(n_filter):
        GQ = _gram_apply(X, Q)
        rho, order = _rayleigh(Q, GQ).sort(dim=-1, descending=True)  # (B, p) each
        floor = LIVE_TOL * rho[..., :1]  # (B, 1)
        live = rho > floor  # (B, p): a prefix of the order
        Q = torch.where(live.unsqueeze(1), _take_columns(Q, order), 0.0)  # (B, N, p)
        GQ = torch.where(live.unsqueeze(1), _take_columns(GQ, order), 0.0)
        # Gershgorin lower bound of the live block's eigenvalues. Dead rows/columns of the
        # compression H are zero; dead entries read as ρ_1 so that they never win the min.
        H = Q.transpose(1, 2) @ GQ  # (B, p, p) = Q^T G Q
        lower = 2 * rho - H.abs().sum(dim=1)  # (B, p): ρ_j - sum_{i != j} |H_ij|, ρ_j >= 0
        lower = torch.where(live, lower, rho[..., :1]).amin(dim=-1, keepdim=True)  # (B, 1)
        # All p live (the last is, as live is a prefix): ρ_p, recomputed from the last column
        # exactly as before this fallback existed, so full-rank results are bit for bit the
        # same; else the bound.
        rho_p = _rayleigh(Q[..., -1:], GQ[..., -1:])  # (B, 1)
        b = torch.where(live[..., -1:], rho_p, torch.maximum(lower, floor))
        b = b.clamp_min(_TINY).unsqueeze(-1)  # (B, 1, 1); X = 0 leaves b = 0 and Q = 0
        c = e = b / 2
        Y1 = (GQ - c * Q) / e
        Q = orthonormalize(2 * (_gram_apply(X, Y1) - c * Y1) / e - Q)
    for _ in range(n_plain):
        Q = orthonormalize(_gram_apply(X, Q))
    rho = _rayleigh(Q, _gram_apply(X, Q))  # (B, p)
    rho, keep = rho.topk(rank, dim=-1)  # (B, r), descending: rho[..., :1] is the largest
    live = (rho > LIVE_TOL * rho[..., :1]).unsqueeze(1)  # (B, 1, r)
    return torch.where(live, _take_columns(Q, keep), 0.0)


def _trace(P: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    # (B, N, N) -> (B, 1, 1): Mul + ReduceSum (TensorRT's Einsum has no diagonal).
    return (P * eye).sum(dim=(1, 2), keepdim=True)


def purify_scores(X: torch.Tensor, rank: int, iters: int) -> torch.Tensor:
    """Leverage as the diagonal of the rank-r spectral projector of G. (B, N, d) -> (B, N).

    l_i = (U_r U_r^T)_ii, and U_r U_r^T = step(G) with the step between lambda_r and
    lambda_{r+1}. SP2 purification (Niklasson 2002) builds it from polynomials of G without
    knowing where the step goes: both maps keep [0, 1] in [0, 1], x^2 lowers the trace and
    2x - x^2 raises it, so choosing by the trace moves the threshold until exactly r
    eigenvalues end at 1. Each step is one (N, N) MatMul, and its node count is independent of r:

        P = G / ||G||_F                     eigenvalues lambda_j / ||G||_F in [0, 1]
        repeat `iters` times:
            P2 = P @ P,  t = trace(P)
            w  = 0 if t > r + TRACE_SLACK     P <- P^2        (square: trace down)
                 2 otherwise                   P <- 2P - P^2   (double: trace up)
                 1 after MAX_LIFT doublings    P <- P          (held: see below)
            P  = P2 + w (P - P2)
        2 x  P = 3P^2 - 2P^3                  McWeeny: eigenvalues near 0 or 1 snap there
        l = diag(P)

    Both maps pull rounding errors back towards 0 or 1 on the next step of the other kind, so
    the iteration corrects itself: with matmul inputs rounded to TF32 (10-bit mantissa, the
    default for float32 GEMMs on Ampere GPUs; emulated on the CPU) the kept tokens of the
    real-photo features do not change.

    Rank-deficient X (numerical rank k < r: a blank page, a flat sky) can never reach trace r:
    every step doubles, and doubling also doubles the float32 noise that stands in for G's
    zero eigenvalues (~1e-7 ||G||), so after ~23 steps the noise would fill the missing trace
    with random directions. So after MAX_LIFT doublings in a row P is held instead: by then
    every direction with lambda >= 2^-MAX_LIFT ||G||_F sits near 1 and the noise below 0.01,
    and McWeeny sends the two to exactly 1 and 0: the scores are the exact rank-k leverage and
    sum to k. (k = r reaches the trace r only from below, and noise can trigger one squaring:
    the limit counts doublings since the last squaring, not since the start.) A full-rank X
    squares within the first ~12 steps and then alternates, so it is never held. X = 0 gives
    P = 0 and all scores 0. Eigenvalues that tie at the threshold (lambda_r ~ lambda_r+1) may
    end between 0 and 1: the scores then share that direction, as any basis of a tied
    subspace would.
    """
    n = X.shape[1]
    # Constants made once, so the traced graph holds one node per value, not one per use.
    eye = torch.eye(n, dtype=X.dtype, device=X.device)  # (N, N)
    zero, one, two, three = (torch.tensor(v, dtype=X.dtype, device=X.device) for v in (0, 1, 2, 3))
    target = torch.tensor(rank + TRACE_SLACK, dtype=X.dtype, device=X.device)
    G = X @ X.transpose(1, 2)  # (B, N, N)
    P = G / G.square().sum(dim=(1, 2), keepdim=True).sqrt().clamp_min(_TINY)  # ||G||_F >= lambda_1
    # Step of the last squaring, (B, 1, 1); -1: none yet. Doublings in a row before step s
    # = s - 1 - last, so a step may double while last > s - 1 - MAX_LIFT.
    last = torch.full_like(P[:, :1, :1], -1.0)
    for step in range(iters):
        P2 = P @ P
        sq = _trace(P, eye) > target  # trace(P) > r + slack: (B, 1, 1)
        lift = two
        if step >= MAX_LIFT:
            lift = torch.where(last > step - 1 - MAX_LIFT, two, one)
        P = P2 + torch.where(sq, zero, lift) * (P - P2)
        if iters > MAX_LIFT and step < iters - 1:  # read only by steps >= MAX_LIFT
            last = torch.where(sq, torch.tensor(float(step), dtype=X.dtype, device=X.device), last)
    for _ in range(N_MCWEENY):
        P2 = P @ P
        P = three * P2 - two * (P2 @ P)
    return (P * eye).sum(dim=-1)  # diag(P): (B, N)


def exact_leverage(X: torch.Tensor, rank: int) -> torch.Tensor:
    """Reference rank-r leverage from float64 SVD: (B, N, d) -> (B, N) float64.

    Singular directions with s_j <= 1e-7 s_1 (or s_1 = 0) are numerically absent and dropped,
    as the approximations drop dependent columns: a zero matrix scores 0 everywhere.
    """
    U, s, _ = torch.linalg.svd(X.double(), full_matrices=False)
    present = (s > 1e-7 * s[..., :1]) & (s > 0)  # (B, min(N, d))
    return (U[..., :rank].square() * present[..., None, :rank]).sum(dim=-1)


def leverage(
    X: torch.Tensor,
    rank: int,
    method: str = GRAM,
    iters: int = 16,
    center: bool = False,
    oversample: int = 4,
    seed: int = 0,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank-r leverage scores: (B, N, d) -> (B, N).

    `start` is the (N, p) start block; built from `seed` when omitted (pass it in when tracing:
    a module buffer becomes a graph constant, a generator call cannot be exported).

    NaN/Inf features are zeroed (see `prepare`). Degenerate inputs do not crash: a zero matrix,
    all-equal tokens (zero after centring) or rank(X) < r give zero columns in the basis, so the
    scores sum to the numerical rank (possibly 0, every score equal); the selector then breaks
    ties by its fixed spatial priority, so the result is still K valid, unique indices. With
    rank(X) <= r the basis spans range(X), so both approximations return exact leverage.
    """
    if not 1 <= rank <= X.shape[1]:
        raise ValueError(f"rank must be in 1..N={X.shape[1]}, got {rank}; pass --rank in range")
    if iters < 1:
        raise ValueError(f"iterations must be >= 1, got {iters}")
    Xp = prepare(X, center)
    if method == EXACT:
        return exact_leverage(Xp, rank)
    if method not in APPROX_METHODS:
        raise ValueError(f"unknown leverage method {method!r}; choose from {LEVERAGE_METHODS}")
    if method == PURIFY:
        return purify_scores(Xp, rank, iters)
    if start is None:
        start = start_block(X.shape[1], block_width(method, rank, oversample, X.shape[1]), seed)
    Q = power_basis(Xp, start, iters) if method == POWER else cheb_basis(Xp, start, rank, iters)
    return Q.square().sum(dim=-1)
