"""A Qwen2.5-VL bundle's image side in the runtime: preprocess, vision, M-RoPE rows (numpy only).

    images ─► preprocess_qwen (each at its own smart-resized size; K's floor on min_pixels)
           ─► [(pixel_values (P_i, C*T*ps*ps), image_grid_thw (1, 3)), ...]   one per row
           ─► vision_encoder, one image per call ─► image_features (K_i, D), kept_indices (K_i,)
           ─► padded to (B, K_max, D) / (B, K_max) with kept -1: a QwenImages
    prompt ids + QwenImages ─► runtime.mrope.rope_index ─► position_ids (3, B, S)

K_i = K for a pruned bundle; for method none every merged token (N_i, from the grid), so the
rows of one batch may hold different numbers of image tokens (the features are padded; the
prompt of row i holds exactly K_i image tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime import contract as C
from runtime.mrope import rope_index
from runtime.preprocess import ImageError
from runtime.preprocess_qwen import merged_tokens, preprocess_qwen
from runtime.qwen_vision_inputs import check_inputs

Sample = tuple[np.ndarray, np.ndarray]  # (pixel_values, image_grid_thw (1, 3))


@dataclass(frozen=True)
class QwenImages:
    """One batch's vision output: features (B, K_max, D) float32, kept (B, K_max) int64 (-1 =
    padding), grids (items, 3) int64, counts (B,) image tokens per row. One image per row, or
    (runtime.rows) `per_row` (B,) items per row, each with `item_tokens` tokens and a time step
    `t_steps` (videos), a video's kept indices counting over its whole (T, h, w) merged grid."""

    features: np.ndarray
    kept: np.ndarray
    grids: np.ndarray
    counts: np.ndarray
    per_row: np.ndarray | None = None
    item_tokens: np.ndarray | None = None
    t_steps: np.ndarray | None = None

    def items(self, b: int) -> range:
        """Indices into grids / item_tokens / t_steps of row b's items."""
        if self.per_row is None:
            return range(b, b + 1)
        start = int(self.per_row[:b].sum())
        return range(start, start + int(self.per_row[b]))

    def __getitem__(self, i: int) -> np.ndarray:  # (features, kept) like LLaVA's pair
        return (self.features, self.kept)[i]

    def row(self, i: int) -> QwenImages:
        """Image `i` alone (its padding dropped)."""
        n, its = int(self.counts[i]), self.items(i)
        sub = slice(its.start, its.stop)
        extra = {}
        if self.per_row is not None:
            extra = {"per_row": self.per_row[i : i + 1], "item_tokens": self.item_tokens[sub],
                     "t_steps": self.t_steps[sub]}  # fmt: skip
        return QwenImages(
            self.features[i : i + 1, :n], self.kept[i : i + 1, :n], self.grids[sub],
            self.counts[i : i + 1], **extra,
        )  # fmt: skip


def is_qwen(manifest: dict) -> bool:
    return manifest.get(C.KEY_MODEL, {}).get("family") == C.FAMILY_QWEN25VL


def preprocess(images: Sequence[Image.Image], manifest: dict) -> list[Sample]:
    """Each image at its own size (or the bundle's fixed size), as the processor computes it."""
    if len(images) == 0:
        raise ImageError("no images given; pass at least one image")
    floor = manifest[C.KEY_PRUNING].get(C.P_MIN_TOKENS, 1)
    try:
        return [preprocess_qwen(im, manifest[C.KEY_VISION], floor) for im in images]
    except ValueError as e:  # a manifest section the runtime cannot reproduce
        if isinstance(e, ImageError):
            raise
        raise ImageError(str(e)) from e


def image_tokens(samples: Sequence[Sample], manifest: dict) -> list[int]:
    """Image tokens each row's prompt must hold: K, or every merged token (method none)."""
    k = manifest[C.KEY_TEXT][C.T_IMAGE_TOKENS]
    if k is not None:
        return [int(k)] * len(samples)
    merge = manifest[C.KEY_VISION][C.V_MERGE_SIZE]
    return [int(merged_tokens(grid, merge)[0]) for _, grid in samples]


def run_vision(session, samples: Sequence[Sample], manifest: dict) -> QwenImages:
    """Every image through the vision graph (checked first: GridError names the fix)."""
    p, merge = manifest[C.KEY_PRUNING], manifest[C.KEY_VISION][C.V_MERGE_SIZE]
    takes_grid = C.IMAGE_GRID_THW in {i.name for i in session.get_inputs()}
    outs = []
    for pixels, grid in samples:
        check_inputs(pixels, grid, merge, p.get(C.P_MIN_TOKENS, 1), p.get(C.P_N_MAX, 2**31))
        feed = {C.PIXEL_VALUES: pixels} | ({C.IMAGE_GRID_THW: grid} if takes_grid else {})
        outs.append(session.run([C.IMAGE_FEATURES, C.KEPT_INDICES], feed))
    feats, kept = pad_rows([f for f, _ in outs], [idx for _, idx in outs])
    grids = np.concatenate([g for _, g in samples]).astype(np.int64)
    return QwenImages(feats, kept, grids, np.array([len(idx) for _, idx in outs], np.int64))


def pad_rows(feats: Sequence[np.ndarray], kept: Sequence[np.ndarray]) -> tuple:
    """Rows of different lengths, (T_b, D) and (T_b,) -> features (B, T_max, D) float32 padded
    with zeros, kept (B, T_max) int64 padded with -1."""
    width = max(len(k) for k in kept)
    out_f = np.zeros((len(kept), width, feats[0].shape[-1]), np.float32)
    out_k = np.full((len(kept), width), -1, np.int64)
    for b, (f, k) in enumerate(zip(feats, kept, strict=True)):
        out_f[b, : len(k)], out_k[b, : len(k)] = f, k
    return out_f, out_k


def positions(manifest: dict, ids: np.ndarray, mask: np.ndarray, image: QwenImages) -> np.ndarray:
    """(3, B, S) M-RoPE rows of the new tokens `ids` (B, S) (left-padded, `mask`), counted from
    0, the kept tokens at their original (t, h, w) or compact, as the manifest says."""
    from runtime.rows import media_ids

    mode = manifest[C.KEY_PRUNING].get(C.P_POSITIONS, C.POSITIONS_ORIGINAL)
    pruned = manifest[C.KEY_TEXT][C.T_IMAGE_TOKENS] is not None
    kept = []  # one (tokens,) array per item, in prompt order
    for b in range(len(ids)):
        its = image.items(b)
        sizes = [int(image.counts[b])] if image.item_tokens is None else image.item_tokens[its]
        kept += np.split(image.kept[b, : image.counts[b]], np.cumsum(sizes)[:-1])
    pos, _ = rope_index(
        ids, media_ids(manifest), image.grids, merge_size=manifest[C.KEY_VISION][C.V_MERGE_SIZE],
        attention_mask=mask, kept_indices=kept if pruned else None, mode=mode,
        t_steps=image.t_steps,
    )  # fmt: skip
    return pos
