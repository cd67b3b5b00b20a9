"""The pruned vision side of a Qwen2.5-VL checkpoint: what its vision_encoder.onnx holds.

One image at its own resolution in, K merged tokens out:

    pixel_values (P, C*T*ps*ps), image_grid_thw (1, 3) = (1, h, w): P = h*w patches, rows in
    (h/2, w/2, 2, 2) order, so rows 4j..4j+3 are merged token j
      ├─ positions(grid) ─► per patch (row, col) ─► rotary cos/sin (P, hd)
      ├─ window_slots(grid) ─► gather (W*64,), valid (W, 64), back (P,)
      └─ patch_embed (Conv3d = MatMul) ─► blocks (attention inside 64-slot windows; per-head
                                          full attention in the fullatt blocks)
           └─ merger.ln_q ─► z (N, 4d): the 2x2 patches the merger concatenates, N = P/4
                └─ merger MLP ─► (N, D_text) ─► leverage (N,) ─► select_tokens(K, morton_rank)
                     └─ Gather K rows ─► image_features (K, D_text), kept_indices (K,) int64
    (site merger_input / patches: z / ln_q'd patches are scored, the MLP runs on the K rows)

Dynamic resolution without Loop/If: transformers computes the window order, cu_seqlens and the
rotary position ids in Python from grid_thw. Here they are arithmetic on arange and the grid's
(h, w) inside the graph (Range, Div, Mod, Less): every window gets win^2 * merge^2 = 64 patch
slots (a partial window at the right or bottom edge pads its slots, as get_window_index pads
the grid), q/k/v are gathered into (windows, heads, 64, hd), attention runs inside each window
with padded keys masked, and the rows are gathered back (window_slots). The window blocks cost
P x 64 scores, as transformers' per-window attention; the full-attention blocks compute one
(P, P) score matrix per head in turn (P^2 x 4 bytes: 4 MiB at 448x448, P = 1024; 413 MiB at
2 MP, P = 10168), never all heads' (heads, P, P) at once (6.6 GB for the 3B's 16 heads at 2 MP).
Every other op is per token. A fixed-size graph holds the tables as constants. Still images
only (t = 1).

Scoring site (SCORE_SITE = "merged", measured by `python -m export.qwen_sites`: the
three real photos at 448x448 and 640x480 (smart-resized to 644x476), rank 8, purify vs float64
SVD, tiny checkpoint seed 0 [seed 1 in brackets]; means, min in parentheses):

    exact picks at the site vs exact picks on the merged features (agreement; merged mass):
      K=16  merger_input 0.31 / 0.54 [0.35 / 0.29] (min 0.19); mass 0.69 / 0.80 (min 0.62)
            patches      0.35 / 0.31 [0.25 / 0.31] (min 0.00); mass 0.68 / 0.61 (min 0.40)
      K=64  merger_input 0.70 / 0.67 [0.70 / 0.65] (min 0.55); mass 0.88 / 0.90 (min 0.80)
            patches      0.62 / 0.50 [0.57 / 0.57] (min 0.38); mass 0.84 / 0.79 (min 0.66)
    purify vs exact at its own site: 1.000 everywhere, except merger_input at 644x476 [seed 1]:
      agreement 0.92 (min 0.75) at K=16, 0.98 (min 0.95) at K=64
    merged-feature energy spanned by the K=16 kept tokens (448 / 644x476): merged 0.75 / 0.65,
      merger_input 0.69 / 0.66, patches 0.66 / 0.65 (uniform 0.83, random 0.83-0.85: leverage
      keeps the unusual tokens, not the bulk; BACKGROUND.md on random baselines)

So the sites are not interchangeable (K=16: a third to a half of the kept tokens differ) and
neither pre-merge site is a proxy for leverage on what the language model receives. "merged"
scores exactly that (SVD-Prune's "projected" option), its approximation was exact on every
image, and it is the cheapest Gram: D_text (3B: 2048) columns against 4d = 5120 for
merger_input, and P = 4N rows for patches (purify's (P, P) products: 64x the flops). Its extra
cost, the merger MLP on all N tokens instead of K, is ~1.4 % of the 3B tower's flops. Random
weights cannot tell which choice answers better: re-measure on a real checkpoint with
`python -m export.qwen_sites CHECKPOINT`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from runtime.qwen_vision_inputs import GridError, check_grid
from svdprune_onnx import leverage as lev
from svdprune_onnx.select import NONE, PruneConfig, PruneError, score_constant, token_scores

# Where the leverage is computed; every site yields one score per merged (LLM) token:
MERGED = "merged"  # the merger's output (N, D_text), what the language model receives
MERGER_INPUT = "merger_input"  # ln_q'd 2x2 patches concatenated (N, 4 d): the merger's input
PATCHES = "patches"  # per-patch (P, d) leverage summed over each 2x2 group (P^3 = 64 N^3 work)
SCORE_SITES = (MERGED, MERGER_INPUT, PATCHES)
SCORE_SITE = MERGED  # the default, chosen by measurement (module docstring)
# What the manifest records about that choice (pruning.score_site and its evidence).
SITE_CHOICE = {
    "site": SCORE_SITE,
    "measured_on": "tiny-qwen2.5-vl seeds 0 and 1, 3 real photos at 448x448 and 644x476, r=8",
    "agreement_with_merged_exact": {
        "k16": {MERGER_INPUT: [0.31, 0.54, 0.35, 0.29], PATCHES: [0.35, 0.31, 0.25, 0.31]},
        "k64": {MERGER_INPUT: [0.70, 0.67, 0.70, 0.65], PATCHES: [0.62, 0.50, 0.57, 0.57]},
    },
    "purify_vs_exact_agreement_min": {MERGED: 1.0, MERGER_INPUT: 0.75, PATCHES: 1.0},
    "why": "scores what the language model receives; its approximation was exact on every "
    "image; the smallest Gram; the merger on all N costs ~1.4 % of the tower",
}

# The leverage method a Qwen bundle gets unless --method says otherwise. purify (LLaVA's default,
# N = 576) multiplies (N, N) matrices: O(N^3), 6.6 s at 2 MP (N = 2542) in PyTorch on 2 cores,
# more than the tiny tower itself. gram works on the (D, D) Gram matrix: O(N D^2), 16 ms there.
# Against float64 SVD on the merged features (tiny checkpoint, the 3 photos at their own size +
# 1008x1008 + 2 MP, K = 16 / 64, r = 8): gram agreement >= 0.969, leverage mass >= 0.9992;
# purify 1.000 / 1.0000; power >= 0.688 / 0.915 (`python -m bench.qwen_methods`).
DEFAULT_METHOD = "gram"

# A dynamic graph's token cap: Qwen2.5-VL's max_pixels 12845056 / 28^2. It sizes the fixed-seed
# constants (power / gram start block, random scores) that the graph slices to each image's N.
N_MAX = 16384
# Merged-grid sides below 2^MORTON_BITS (Qwen's max_pixels at its 200:1 aspect limit: 1810).
MORTON_BITS = 11
EXACT_INT = 2**24  # float32 holds every integer below it exactly (as svdprune_onnx/select.py)
PIXEL_LIMIT = 1e4  # |pixel| cap inside the graph, as svdprune_onnx/vision.py


class UnsupportedQwenError(ValueError):
    """The checkpoint is not a Qwen2.5-VL this exporter supports."""


def qwen_visual(model: nn.Module) -> nn.Module:
    """The Qwen2_5_VisionTransformerPretrainedModel of a Qwen2_5_VLForConditionalGeneration."""
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is None or type(visual).__name__ != "Qwen2_5_VisionTransformerPretrainedModel":
        raise UnsupportedQwenError(
            f"{type(model).__name__} has no Qwen2.5-VL vision tower (model.visual); "
            "pass a Qwen2_5_VLForConditionalGeneration checkpoint"
        )
    return visual


def token_count(model: nn.Module, fixed_size: tuple[int, int] | None = None) -> int:
    """N for PruneConfig: merged tokens of a fixed (H, W) in pixels, or N_MAX (dynamic)."""
    if fixed_size is None:
        return N_MAX
    step = qwen_visual(model).config.patch_size * qwen_visual(model).config.spatial_merge_size
    H, W = fixed_size
    if min(H, W) < step or H % step or W % step:
        raise GridError(f"fixed size {H}x{W} must be multiples of {step} px; e.g. 448x448")
    return (H // step) * (W // step)


def _count(x: torch.Tensor) -> torch.Tensor:
    # (R, ...) -> 0-d int64 R, read from the shape (Shape-ConstantOfShape-ReduceSum when traced:
    # stays dynamic, and ignores the values, which may be anything).
    return torch.ones_like(x.reshape(x.shape[0], -1)[:, 0], dtype=torch.int64).sum()


def _arange(n: torch.Tensor) -> torch.Tensor:
    # 0-d int64 n -> (n,) int64: a Range node with a data-dependent end.
    return torch.arange(n, dtype=torch.int64)


def morton_rank(gh, gw, n) -> torch.Tensor:
    """Tie-break rank per merged token, (N,) int64, distinct in 1..N, higher = kept first.

    The order reverses the bits of each token's Morton (Z-order) code: tokens on every 2^k-th
    row and column come before the finer lattice, so the first K spread over the whole image
    at any resolution (uniform method and degenerate inputs: a K-point lattice). Elementwise
    ops and two TopK sorts of N: computable in the graph, unlike select.spatial_priority's
    greedy farthest-point order (LLaVA's graphs bake that in for their fixed 24 x 24 grid).
    """
    j = _arange(torch.as_tensor(n))  # (N,); gh, gw, n: 0-d int64 tensors or ints
    y, x = j // gw, j % gw
    code = torch.zeros_like(j)
    for b in range(MORTON_BITS):  # (N,) -> (N,): bit b of y and x to bits 2(B-1-b)+1, 2(B-1-b)
        shift = 2 * (MORTON_BITS - 1 - b)
        code = code + (y // 2**b % 2) * 2 ** (shift + 1) + (x // 2**b % 2) * 2**shift
    order = torch.argsort(code.float())  # codes < 2^22: exact in float32, all distinct
    pos = torch.argsort(order)  # (N,) place of each token in that order
    return n - pos


def select_tokens(scores: torch.Tensor, k: int, rank: torch.Tensor) -> torch.Tensor:
    """Top-K indices ascending, (N,) scores, (N,) distinct int rank in 0..N -> (K,) int64.

    select.select_topk's rule (same keys, same answer: tests/test_qwen_vision.py) with N
    known only at run time: its score levels L (the largest power of two with
    (2L + 1)(N + 1) < 2^24, select.score_levels) are computed in the graph from N.

        scores ─► NaN/Inf -> 0 ─► / max|s| ─► round(s L) ─┐
        rank (N,) ─────────────────────────────────────────┴─► key = level (N+1) + rank ─► TopK
    """
    n = _count(rank)  # 0-d int64 N
    j = torch.arange(24)
    m = ((4 * 2**j + 1) * (n + 1) < EXACT_INT).sum()  # select.score_levels' loop count
    levels = torch.tensor([2.0**i for i in range(25)])[m]  # 0-d float32, exact
    s = scores.float()
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
    s = s / s.abs().amax().clamp_min(1e-30)  # (N,) in [-1, 1]
    key = torch.round(s * levels) * (n + 1).float() + rank.float()  # (N,) distinct integers
    return torch.sort(torch.topk(key, k).indices).values  # (K,) spatial order


class PrunedQwenVision(nn.Module):
    """pixel_values (P, C*T*ps*ps) [+ image_grid_thw (1, 3)] -> image_features (K, D_text),
    kept_indices (K,) int64. `fixed_size` (H, W) px: a static graph without the grid input."""

    def __init__(
        self,
        model: nn.Module,
        prune: PruneConfig,
        site: str = SCORE_SITE,
        fixed_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.visual = v = qwen_visual(model)
        cfg = v.config
        if site not in SCORE_SITES:
            raise PruneError(f"unknown score site {site!r}; choose one of {', '.join(SCORE_SITES)}")
        n = token_count(model, fixed_size)
        if prune.n != n:
            raise PruneError(
                f"PruneConfig n={prune.n}, but this graph takes N={n}: build it with "
                "n=token_count(model, fixed_size)"
            )
        self.prune, self.site, self.fixed = prune, site, fixed_size is not None
        self.merge = cfg.spatial_merge_size
        self.win = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # merged/side
        self.full_blocks = frozenset(cfg.fullatt_block_indexes)
        self.heads = cfg.num_heads
        self.out_dim = cfg.out_hidden_size
        hw = (
            [fixed_size[0] // cfg.patch_size, fixed_size[1] // cfg.patch_size] if self.fixed else []
        )
        self.register_buffer("grid", torch.tensor([[1, *hw]] if hw else [[1, 1, 1]]))
        self.n_max = n if self.fixed else N_MAX
        # Fixed-seed constants (power / gram start block, random scores) over the most rows the
        # site can score; the graph slices them to the image's rows.
        rows = n * self.merge**2 if site == PATCHES else n
        const = score_constant(replace(prune, n=rows)) if prune.method != NONE else None
        self.register_buffer("const", const if const is not None else torch.zeros(0))
        # A fixed-size graph gets its position tables as constants (TensorRT builds no index
        # arithmetic); a dynamic one computes the same tables from image_grid_thw.
        if self.fixed:
            p = torch.tensor(int(self.grid.prod()))
            rot = self.positions(self.grid, p)
            gather, valid, back = self.window_slots(self.grid, p)
            rank = morton_rank(self.grid[0, 1] // self.merge, self.grid[0, 2] // self.merge, n)
            tables = {"rot": rot, "gather": gather, "valid": valid, "back": back, "rank": rank}
            for name, t in tables.items():
                self.register_buffer(f"fixed_{name}", t, persistent=False)

    @property
    def min_tokens(self) -> int:
        """Fewest merged tokens an image must give: K (and the rank r for leverage)."""
        if self.prune.method == NONE:
            return 1
        r = self.prune.rank if self.prune.method in lev.LEVERAGE_METHODS else 1
        return max(self.prune.k, r)

    def positions(self, grid: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Rotary angles (P, hd/2): transformers' rot_pos_emb(grid), from arithmetic on each
        patch's (row, col) in patches (tests/test_qwen_vision.py)."""
        m = self.merge
        j, sub = _arange(p) // (m * m), _arange(p) % (m * m)  # merged token, place in 2x2
        gw = grid[0, 2] // m
        row, col = (j // gw) * m + sub // m, (j % gw) * m + sub % m
        inv_freq = self.visual.rotary_pos_emb.inv_freq  # (hd/4,)
        return torch.cat([row[:, None].float() * inv_freq, col[:, None].float() * inv_freq], -1)

    def window_slots(self, grid: torch.Tensor, p: torch.Tensor):
        """Window attention as dense blocks: (gather (W*S,), valid (W, S) bool, back (P,)).

        The merged grid is cut into win x win windows (the last row / column of windows may
        be partial, as transformers' get_window_index pads them); each window has S = win^2 *
        merge^2 patch slots. gather[slot] is the patch in that slot (0 where the slot is
        padding, `valid` False); back[patch] is its slot. The block gathers q, k, v into
        (W, heads, S, hd), attends within each window with padding keys masked, and gathers
        the rows back: (P * S) scores instead of (P, P), nothing data-dependent but indices.
        """
        m, v = self.merge, self.win
        gh, gw = grid[0, 1] // m, grid[0, 2] // m  # merged grid (0-d)
        nww = (gw + v - 1) // v  # windows per row
        per = v * v * m * m  # patch slots per window
        slot = _arange((gh + v - 1) // v * nww * per)  # (W*S,)
        w, q = slot // per, slot % per
        u, sub = q // (m * m), q % (m * m)  # merged token in the window, patch in the 2x2
        my, mx = (w // nww) * v + u // v, (w % nww) * v + u % v
        valid = (my < gh) & (mx < gw)
        gather = torch.where(valid, (my * gw + mx) * (m * m) + sub, torch.zeros_like(slot))
        j, sub = _arange(p) // (m * m), _arange(p) % (m * m)  # (P,) merged token, 2x2 place
        my, mx = j // gw, j % gw
        back = ((my // v) * nww + mx // v) * per + ((my % v) * v + mx % v) * (m * m) + sub
        return gather, valid.reshape(-1, per), back

    def _block(self, blk: nn.Module, h: torch.Tensor, cos, sin, slots) -> torch.Tensor:
        # One Qwen2_5_VLVisionBlock: (P, d) -> (P, d); slots: window_slots(), None = full.
        d = h.shape[1]
        qkv = blk.attn.qkv(blk.norm1(h)).reshape(-1, 3, self.heads, d // self.heads)
        qkv = qkv.permute(1, 0, 2, 3)  # (3, P, nh, hd)
        q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)  # (P, nh, hd) each
        v = qkv[2]
        if slots is None:
            a = self._full_attention(q, k, v, blk.attn.scaling)
        else:
            a = self._window_attention(q, k, v, blk.attn.scaling, slots)
        h = h + blk.attn.proj(a.reshape(-1, d))
        return h + blk.mlp(blk.norm2(h))

    def _full_attention(self, q, k, v, scaling: float) -> torch.Tensor:
        # (P, nh, hd) each -> (P, nh, hd), one head at a time: a (P, P) score matrix per head
        # (413 MB at 2 MP, P = 10168) instead of (nh, P, P) at once (6.6 GB for the 3B's 16).
        out = []
        for i in range(self.heads):
            s = (q[:, i] @ k[:, i].T) * scaling  # (P, P)
            out.append(torch.softmax(s, dim=-1) @ v[:, i])  # (P, hd)
        return torch.stack(out, dim=1)

    def _window_attention(self, q, k, v, scaling: float, slots) -> torch.Tensor:
        # (P, nh, hd) each -> (P, nh, hd) with attention inside each window (window_slots)
        gather, valid, back = slots
        per = valid.shape[1]

        def windows(x: torch.Tensor) -> torch.Tensor:  # (P, nh, hd) -> (W, nh, S, hd)
            return x[gather].reshape(-1, per, self.heads, x.shape[-1]).transpose(1, 2)

        s = (windows(q) @ windows(k).transpose(2, 3)) * scaling  # (W, nh, S, S)
        s = torch.where(valid[:, None, None, :], s, torch.tensor(float("-inf")))
        a = torch.softmax(s, dim=-1) @ windows(v)  # (W, nh, S, hd)
        return a.transpose(1, 2).reshape(-1, self.heads, q.shape[-1])[back]  # (P, nh, hd)

    def merger_input(self, pixel_values: torch.Tensor, grid: torch.Tensor):
        """(tower output (P, d), z = ln_q'd 2x2 groups (N, 4 d))."""
        v = self.visual
        x = torch.where(torch.isfinite(pixel_values), pixel_values, 0.0)
        x = x.clamp(-PIXEL_LIMIT, PIXEL_LIMIT)
        w = v.patch_embed.proj.weight  # (d, C, T, ps, ps): stride = kernel, so a MatMul
        h = F.linear(x, w.reshape(w.shape[0], -1))  # (P, C*T*ps*ps) -> (P, d)
        if self.fixed:
            rot, slots = self.fixed_rot, (self.fixed_gather, self.fixed_valid, self.fixed_back)
        else:
            p = _count(x)
            rot, slots = self.positions(grid, p), self.window_slots(grid, p)  # (P, hd/2)
        emb = torch.cat([rot, rot], dim=-1)  # (P, hd)
        cos, sin = emb.cos(), emb.sin()
        for i, blk in enumerate(v.blocks):
            h = self._block(blk, h, cos, sin, None if i in self.full_blocks else slots)
        ln = v.merger.ln_q(h)  # (P, d)
        return ln, ln.reshape(-1, v.merger.hidden_size)  # (N, 4 d)

    def _grid(self, image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        if self.fixed:
            if image_grid_thw is not None and not torch.equal(image_grid_thw, self.grid):
                raise GridError(
                    f"this graph is fixed to grid {self.grid.tolist()}, got "
                    f"{image_grid_thw.tolist()}; preprocess with preprocess_qwen_fixed"
                )
            return self.grid
        if image_grid_thw is None:
            raise GridError("this graph is dynamic: pass image_grid_thw with pixel_values")
        if not torch.jit.is_tracing():
            check_grid(image_grid_thw.numpy(), self.merge, self.min_tokens, self.n_max)
        return image_grid_thw

    def _scores(self, ln, z, merged):
        """Selection scores (N,) at the site; `merged` (N, D) or None."""
        feats = {MERGED: merged, MERGER_INPUT: z, PATCHES: ln}[self.site][None]  # (1, rows, f)
        const = self.const[: feats.shape[1]] if self.const.numel() else None
        s = token_scores(feats, self.prune, None, const)[0]  # (rows,)
        return s.reshape(-1, self.merge**2).sum(-1) if self.site == PATCHES else s  # (N,)

    def outputs(self, pixel_values, image_grid_thw=None):
        """(image_features (K, D), kept_indices (K,), scores (N,): what the graph ranks, the
        reference for agreement / leverage mass; zeros for method none) from one tower pass."""
        grid = self._grid(image_grid_thw)
        ln, z = self.merger_input(pixel_values, grid)
        n = _count(z)  # 0-d N
        if self.prune.method == NONE:
            merged = self.visual.merger.mlp(z)  # (N, D)
            return merged, _arange(n), torch.zeros_like(merged[:, 0])
        merged = self.visual.merger.mlp(z) if self.site == MERGED else None
        scores = self._scores(ln, z, merged)  # (N,)
        m = self.merge
        rank = self.fixed_rank if self.fixed else morton_rank(grid[0, 1] // m, grid[0, 2] // m, n)
        idx = select_tokens(scores, self.prune.k, rank)  # (K,)
        if merged is not None:
            return merged[idx], idx, scores  # (N, D) -> (K, D)
        return self.visual.merger.mlp(z[idx]), idx, scores  # (K, 4 d) -> (K, D)

    def forward(self, pixel_values, image_grid_thw=None):
        feats, idx, _ = self.outputs(pixel_values, image_grid_thw)
        return feats, idx
