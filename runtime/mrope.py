"""Qwen2.5-VL's M-RoPE position rows (t, h, w) for the decoder's position_ids, numpy only.

The Qwen decoder graph (export/qwen_decoder.py) takes position_ids (3, batch, seq): one row per
rotary section (temporal, height, width). Text tokens carry the same index on all three rows;
an image's tokens carry their place in the merged grid, offset by the text before them:

    tokens:   T  T  T  I  I  I  I  I  I  T  T        image: merged grid 1 x 2 x 3 (t, h, w)
    t row:    0  1  2  3  3  3  3  3  3  6  7        t: frame * second_per_grid_t (0 for an
    h row:    0  1  2  3  3  3  4  4  4  6  7           image) * tokens_per_second = 0
    w row:    0  1  2  3  4  5  3  4  5  6  7
                       '--- 3 + offset ---'  '-- max + 1 onwards

`rope_index` equals transformers' Qwen2_5_VLModel.get_rope_index (4.57) for prompts of text
and images; padding (attention_mask 0) gets position 1 there and here (masked: any value works).
Its second result, deltas (B, 1) = next position - padded length, gives every later step's
positions as transformers' generate does: `decode_positions` = cache length + delta on all
three rows, i.e. the previous maximum + 1, + 2, ...

Pruned images (the prompt holds K image tokens per image, `kept_indices` (K,) ascending into
the merged grid, row-major over (t, h / merge, w / merge)):
  POSITIONS_ORIGINAL: each kept token keeps its unpruned (t, h, w); the text after the image,
    and the decode steps, continue from the unpruned image's max + 1, exactly as if the whole
    image were there. The rotary phases the model sees are those of the unpruned prompt.
  POSITIONS_COMPACT: positions are the sequence index 0..S-1 (of the unpadded prompt) on all
    three rows, image tokens included: the contract's meaning of "compact" for every family
    (LLaVA's too). It needs no grid (grid_thw and kept_indices, when given, are only checked
    against the prompt) and no K has to factor into a grid; the image loses its 2-D layout
    (the model sees it as a run of text positions).
Differences from transformers: images are found as runs of image_token_id (transformers counts
vision_start tokens followed by one; equal for the chat template's prompts); a row of one valid
token with padding and no grid gets delta 1 - S here, 2 - S there (its text-only branch counts
the padding's 1 in the maximum); videos (grids with t > 1, their t_steps) are handled as
transformers does with second_per_grid_ts.
"""

from __future__ import annotations

import numpy as np

from runtime import contract as C


class PositionError(ValueError):
    """The prompt, grid or kept indices do not describe a valid M-RoPE layout."""


PAD_POSITION = 1  # what transformers writes at padding (attention_mask 0)


def grid_positions(grid_thw, merge_size: int, t_step: int = 0) -> np.ndarray:
    """(3, N) int64: (t, h, w) of each token of an unpruned image, N = t * h/m * w/m, row-major.

    `grid_thw` is (t, h, w) in patches (the vision graph's image_grid_thw row); h and w must be
    multiples of `merge_size`. The t row is slice * t_step: 0 for an image (t = 1), a video's
    int(second_per_grid_t) * tokens_per_second (runtime.rows.t_step), as transformers computes.
    """
    t, h, w = (int(v) for v in np.asarray(grid_thw).reshape(-1))
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise PositionError(
            f"grid (t, h, w) = {(t, h, w)} is not an image grid of merge size {merge_size}: "
            "pass the image's image_grid_thw row (patches, h and w multiples of the merge size)"
        )
    gh, gw = h // merge_size, w // merge_size
    # t index = slice * second_per_grid_t * tokens_per_second (t_step; images: slice 0 only)
    t_idx = np.repeat(np.arange(t, dtype=np.int64) * int(t_step), gh * gw)
    h_idx = np.broadcast_to(np.arange(gh)[None, :, None], (t, gh, gw)).reshape(-1)
    w_idx = np.broadcast_to(np.arange(gw)[None, None, :], (t, gh, gw)).reshape(-1)
    return np.stack([t_idx, h_idx, w_idx]).astype(np.int64)


def _kept(kept_indices, n_images: int) -> np.ndarray | list | None:
    """kept_indices as (num_images, K) int64 (or a list of one 1-D array per image), or None."""
    if kept_indices is None:
        return None
    if isinstance(kept_indices, list) and kept_indices and np.ndim(kept_indices[0]) == 1:
        if len(kept_indices) != n_images:
            raise PositionError(
                f"kept_indices has {len(kept_indices)} arrays for {n_images} images in grid_thw; "
                "pass one row per image (a 1-D array each), in prompt order"
            )
        return [np.asarray(k, dtype=np.int64) for k in kept_indices]
    kept = np.asarray(kept_indices, dtype=np.int64)
    kept = kept[None] if kept.ndim == 1 else kept
    if kept.ndim != 2 or kept.shape[0] != n_images:
        raise PositionError(
            f"kept_indices has shape {np.shape(kept_indices)}; pass (K,) for one image or "
            f"(num_images, K) with one row per image ({n_images} images in grid_thw)"
        )
    return kept


def _image_block(grid, merge_size: int, kept, mode: str, t_step: int) -> tuple[np.ndarray, int]:
    """One image's (or video's) position offsets (3, count) from its first token, and the
    offset of the position after it (text after the image starts there)."""
    full = grid_positions(grid, merge_size, t_step)  # (3, N)
    n = full.shape[1]
    if kept is not None:
        if kept.size and (kept[0] < 0 or kept[-1] >= n or np.any(np.diff(kept) <= 0)):
            raise PositionError(
                f"kept_indices must be strictly ascending in [0, {n}) for grid "
                f"{[int(v) for v in grid]}: "
                "pass the vision graph's kept_indices row for this image"
            )
        count = kept.size
    else:
        count = n
    if mode == C.POSITIONS_COMPACT:  # a run of sequence indices on all three rows
        return np.broadcast_to(np.arange(count), (3, count)).astype(np.int64), count
    block = full if kept is None else full[:, kept]
    return block, int(full.max()) + 1  # original: continue after the *unpruned* image


def _row(ids: np.ndarray, media: list[int], grids, kept, steps, merge_size: int, mode: str,
         row: int):  # fmt: skip
    """Positions (3, len(ids)) of one unpadded row and the next position; consumes grids/kept/
    steps (iterators over images and videos in prompt order)."""
    parts: list[np.ndarray] = []
    nxt, st = 0, 0
    is_image = np.isin(ids, media)
    while st < len(ids):
        hits = np.flatnonzero(is_image[st:])
        if hits.size == 0:
            break
        ed = st + int(hits[0])
        parts.append(np.broadcast_to(nxt + np.arange(ed - st), (3, ed - st)))  # text before
        grid = next(grids, None)
        if grid is None:
            raise PositionError(
                f"row {row} holds more images than grid_thw has rows: pass one (t, h, w) row "
                "per image, in prompt order"
            )
        block, after = _image_block(grid, merge_size, next(kept, None), mode, next(steps, 0))
        count = block.shape[1]
        run = ed + int(np.argmin(np.append(is_image[ed:], False)))  # end of this token run
        if run - ed != count:
            raise PositionError(
                f"row {row}: an image of {run - ed} tokens where grid {[int(v) for v in grid]} "
                f"(merge {merge_size}, kept_indices if given) needs {count}: expand the image "
                "placeholder to exactly that many image tokens"
            )
        base = nxt + (ed - st)
        parts.append(block + base)
        nxt, st = base + after, ed + count
    parts.append(np.broadcast_to(nxt + np.arange(len(ids) - st), (3, len(ids) - st)))
    nxt += len(ids) - st
    return np.concatenate(parts, axis=1), nxt


def rope_index(
    input_ids: np.ndarray,
    image_token_id: int | set[int],
    grid_thw: np.ndarray | None = None,
    *,
    merge_size: int = 2,
    attention_mask: np.ndarray | None = None,
    kept_indices: np.ndarray | list | None = None,
    mode: str = C.POSITIONS_ORIGINAL,
    t_steps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The prompt's position rows: (position_ids (3, B, S) int64, deltas (B, 1) int64).

    input_ids (B, S) (or (S,)): each image a run of image_token_id tokens, t*h*w/merge^2 of them
    (K with kept_indices); grid_thw (num_images, 3) (or (3,)): each image's (t, h, w) in patches,
    images in prompt order, row 0 first; attention_mask (B, S), 0 = padding (left or right);
    kept_indices (num_images, K) (or (K,)): ascending indices into each merged grid, None =
    unpruned, or a list of one 1-D array per image (videos: indices over the whole grid);
    mode: C.POSITIONS_ORIGINAL or C.POSITIONS_COMPACT (module docstring); image_token_id may be
    a set (Qwen's image and video tokens: each run of them is the next grid's); t_steps
    (num_images,): each grid's time step per slice (0 for images; None: all 0).
    Raises PositionError when the tokens, grids and indices disagree.
    """
    if mode not in C.POSITIONS_CHOICES:
        raise PositionError(f"mode {mode!r} is not one of {C.POSITIONS_CHOICES}")
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2:
        raise PositionError(f"input_ids has shape {np.shape(input_ids)}; pass (B, S) or (S,)")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) == 1
    mask = mask[None] if mask.ndim == 1 else mask
    if mask.shape != ids.shape:
        raise PositionError(f"attention_mask {mask.shape} must match input_ids {ids.shape}")
    grids_arr = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw)
    grids_arr = grids_arr.reshape(-1, 3)
    kept_arr = _kept(kept_indices, len(grids_arr))
    grids, kept = iter(grids_arr), iter(() if kept_arr is None else kept_arr)
    steps = iter(() if t_steps is None else np.asarray(t_steps).reshape(-1).tolist())
    media = sorted(image_token_id) if isinstance(image_token_id, set) else [image_token_id]
    if grid_thw is None and mode == C.POSITIONS_COMPACT:
        media = []  # nothing to check: image tokens count as sequence positions
    positions = np.full((3, *ids.shape), PAD_POSITION, np.int64)
    deltas = np.zeros((ids.shape[0], 1), np.int64)
    for b in range(ids.shape[0]):
        if not mask[b].any():
            raise PositionError(f"row {b} has no tokens (attention_mask all 0): drop the row")
        pos, nxt = _row(ids[b, mask[b]], media, grids, kept, steps, merge_size, mode, b)
        positions[:, b, mask[b]] = pos
        deltas[b, 0] = nxt - ids.shape[1]  # next position - padded length
    if next(grids, None) is not None:
        raise PositionError(
            f"grid_thw has {len(grids_arr)} rows but the prompt holds fewer images: pass one "
            "row per image run of image_token_id"
        )
    return positions, deltas


def decode_positions(deltas: np.ndarray, past_length: int, steps: int = 1) -> np.ndarray:
    """(3, B, steps) int64: the positions of the `steps` tokens fed after a cache of
    `past_length` (padded prompt + tokens so far): past_length + i + delta on all three rows,
    i.e. the previous maximum + 1, + 2, ... (transformers' cache_position + rope_deltas)."""
    deltas = np.asarray(deltas, np.int64).reshape(-1, 1)  # (B, 1)
    pos = past_length + np.arange(steps, dtype=np.int64)[None, :] + deltas  # (B, steps)
    return np.broadcast_to(pos, (3, *pos.shape)).copy()
