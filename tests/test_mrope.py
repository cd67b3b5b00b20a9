"""runtime/mrope.py vs transformers' Qwen2_5_VLModel.get_rope_index: unpruned prompts exactly,
pruned ones against a reference built from the unpruned positions, decode steps, refusals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from runtime import contract as C
from runtime.mrope import PositionError, decode_positions, grid_positions, rope_index

IMAGE, START, END = 1010, 1007, 1008  # the tiny Qwen2.5-VL checkpoint's ids
MERGE = 2
CFG = Qwen2_5_VLConfig(
    vision_config={"spatial_merge_size": MERGE, "tokens_per_second": 2},
    image_token_id=IMAGE,
    vision_start_token_id=START,
    vision_end_token_id=END,
    video_token_id=1011,
)
# (t, h, w) in patches: merged 16x16, 17x23, 1x1, 2x4
GRIDS = [(1, 32, 32), (1, 34, 46), (1, 2, 2), (1, 4, 8)]


def _hf(ids: np.ndarray, grids, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """transformers' get_rope_index (it reads only .config)."""
    pos, deltas = Qwen2_5_VLModel.get_rope_index(
        SimpleNamespace(config=CFG),
        torch.from_numpy(ids),
        image_grid_thw=None if grids is None else torch.tensor(grids),
        attention_mask=None if mask is None else torch.from_numpy(mask),
    )
    return pos.numpy(), deltas.numpy()


def _same(got: tuple, want: tuple) -> None:
    """(positions, deltas) pairs equal."""
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def _prompt(rng, before: int, image_tokens: int | None, after: int) -> list[int]:
    text = [int(t) for t in rng.integers(0, 1000, before + after)]
    if image_tokens is None:
        return text
    return [*text[:before], START, *[IMAGE] * image_tokens, END, *text[before:]]


def _batch(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (B, S) ids (pad 0) and mask."""
    s = max(map(len, rows))
    ids = np.zeros((len(rows), s), np.int64)
    mask = np.zeros((len(rows), s), np.int64)
    for b, r in enumerate(rows):
        ids[b, s - len(r) :], mask[b, s - len(r) :] = r, 1
    return ids, mask


def _tokens(grid) -> int:
    t, h, w = grid
    return t * (h // MERGE) * (w // MERGE)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("before", "after"), [(5, 7), (0, 3), (9, 0)])
def test_unpruned_equals_transformers(grid, before: int, after: int) -> None:
    ids = np.array([_prompt(np.random.default_rng(0), before, _tokens(grid), after)])
    pos, deltas = rope_index(ids, IMAGE, [grid], merge_size=MERGE)
    want_pos, want_deltas = _hf(ids, [grid], None)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(deltas, want_deltas)


def test_batch_left_padding_equals_transformers() -> None:
    rng = np.random.default_rng(1)
    grids = [GRIDS[1], GRIDS[3]]  # one image per row, different sizes: different padding
    ids, mask = _batch([_prompt(rng, 4, _tokens(g), 6 + 3 * i) for i, g in enumerate(grids)])
    assert (mask == 0).any()
    pos, deltas = rope_index(ids, IMAGE, grids, merge_size=MERGE, attention_mask=mask)
    want_pos, want_deltas = _hf(ids, grids, mask)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(deltas, want_deltas)


def test_text_only_and_mixed_batch_equal_transformers() -> None:
    rng = np.random.default_rng(2)
    ids, mask = _batch([_prompt(rng, 7, None, 0), _prompt(rng, 3, None, 0)])
    _same(rope_index(ids, IMAGE, attention_mask=mask), _hf(ids, None, mask))
    # a batch where only the second row has an image (the first consumes no grid row)
    grid = GRIDS[3]
    ids, mask = _batch([_prompt(rng, 12, None, 0), _prompt(rng, 2, _tokens(grid), 3)])
    got = rope_index(ids, IMAGE, [grid], merge_size=MERGE, attention_mask=mask)
    _same(got, _hf(ids, [grid], mask))


def test_decode_continues_like_appended_text() -> None:
    """The positions of n tokens generated after the prompt are those transformers gives n text
    tokens appended to it: previous max + 1, + 2, ... on all three rows."""
    rng = np.random.default_rng(3)
    grids, n = [GRIDS[0], GRIDS[3]], 4
    prompts = [_prompt(rng, 3, _tokens(g), 2 + i) for i, g in enumerate(grids)]
    ids, mask = _batch(prompts)
    _, deltas = rope_index(ids, IMAGE, grids, merge_size=MERGE, attention_mask=mask)
    longer, longer_mask = _batch([p + [5] * n for p in prompts])
    want, _ = _hf(longer, grids, longer_mask)
    got = np.concatenate([decode_positions(deltas, ids.shape[1] + i) for i in range(n)], axis=2)
    np.testing.assert_array_equal(got, want[:, :, -n:])
    np.testing.assert_array_equal(decode_positions(deltas, ids.shape[1], n), want[:, :, -n:])


def _kept(rng, n: int, k: int) -> np.ndarray:
    return np.sort(rng.choice(n, k, replace=False))


def _reference_original(rows, grids, kept) -> tuple[np.ndarray, np.ndarray]:
    """Unpruned positions from transformers, the pruned image tokens' columns dropped."""
    full_ids, full_mask = _batch([_prompt(np.random.default_rng(r), *row) for r, row in rows])
    full_pos, full_deltas = _hf(full_ids, grids, full_mask)
    cols = []
    for b, ((_, (before, n, _)), keep) in enumerate(zip(rows, kept, strict=True)):
        valid = full_pos[:, b, full_mask[b] == 1]  # (3, unpadded length)
        first = before + 1  # after the text and <|vision_start|>
        drop = np.setdiff1d(np.arange(n), keep) + first
        cols.append(np.delete(valid, drop, axis=1))
    s = max(c.shape[1] for c in cols)
    pos = np.full((3, len(cols), s), 1, np.int64)
    for b, c in enumerate(cols):
        pos[:, b, s - c.shape[1] :] = c
    # the next position is the unpruned one: delta grows by the dropped length
    return pos, full_deltas + full_ids.shape[1] - s


@pytest.mark.parametrize("k", [1, 37, 64])
def test_pruned_original_keeps_unpruned_positions(k: int) -> None:
    rng = np.random.default_rng(k)
    grids = [GRIDS[1], GRIDS[0]]
    ns = [_tokens(g) for g in grids]
    rows = [(10, (4, ns[0], 5)), (11, (2, ns[1], 9))]  # (seed, (before, image tokens, after))
    kept = np.stack([_kept(rng, n, k) for n in ns])
    ids, mask = _batch([_prompt(np.random.default_rng(r), b, k, a) for r, (b, _, a) in rows])
    pos, deltas = rope_index(
        ids, IMAGE, grids, merge_size=MERGE, attention_mask=mask, kept_indices=kept
    )
    want_pos, want_deltas = _reference_original(rows, grids, kept)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(deltas, want_deltas)
    # kept tokens carry their grid (h, w): here row 0's image starts after 4 text + vision_start
    img = pos[:, 0, mask[0] == 1][:, 5 : 5 + k]
    np.testing.assert_array_equal(img - 5, grid_positions(grids[0], MERGE)[:, kept[0]])


def test_pruned_original_image_last_decodes_after_unpruned_max() -> None:
    grid, keep = GRIDS[3], np.array([0, 3])  # (h, w) (0, 0) and (0, 3) of a 2x4 grid
    ids = np.array([[7, 8, START, IMAGE, IMAGE]])
    pos, deltas = rope_index(ids, IMAGE, grid, merge_size=MERGE, kept_indices=keep)
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 3, 3], [0, 1, 2, 3, 3], [0, 1, 2, 3, 6]])
    assert decode_positions(deltas, 5)[:, 0, 0].tolist() == [3 + 3 + 1] * 3  # unpruned max 6


@pytest.mark.parametrize("k", [1, 20])
def test_pruned_compact_is_sequence_index(k: int) -> None:
    rng = np.random.default_rng(k)
    grids = [GRIDS[1], GRIDS[0]]
    kept = np.stack([_kept(rng, _tokens(g), k) for g in grids])
    ids, mask = _batch([_prompt(rng, 3, k, 4), _prompt(rng, 6, k, 8)])
    want = _hf(ids, None, mask)  # transformers' text-only positions of the pruned prompt
    for kw in ({"kept_indices": kept}, {}):
        grid = grids if kw else None
        got = rope_index(
            ids, IMAGE, grid, merge_size=MERGE, attention_mask=mask, mode="compact", **kw
        )
        _same(got, want)
    _, deltas = got
    np.testing.assert_array_equal(
        decode_positions(deltas, ids.shape[1])[:, :, 0], mask.sum(1)[None].repeat(3, 0)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid_thw": [GRIDS[3]], "kept_indices": [[0, 2, 5]]}, "image of 2 tokens"),
        ({"grid_thw": [GRIDS[3]]}, "needs 8"),
        ({"grid_thw": [GRIDS[3]], "kept_indices": [[3, 1]]}, "strictly ascending"),
        ({"grid_thw": [GRIDS[3]], "kept_indices": [[0, 8]]}, "strictly ascending"),
        ({"grid_thw": [GRIDS[3]], "kept_indices": [[0, 1]], "mode": "dense"}, "mode"),
        ({"grid_thw": [(1, 3, 4)]}, "merge size"),
        ({"grid_thw": [GRIDS[3]] * 2, "kept_indices": [[0, 1], [2, 3]]}, "fewer images"),
        ({"grid_thw": None}, "more images"),
        ({"grid_thw": [GRIDS[3]], "kept_indices": [[0, 1], [2, 3]]}, "one row per image"),
    ],
)
def test_refusals_name_the_fix(kwargs: dict, match: str) -> None:
    ids = np.array([5, START, IMAGE, IMAGE, END, 6])
    with pytest.raises(PositionError, match=match):
        rope_index(ids, IMAGE, merge_size=MERGE, **kwargs)


def test_constants() -> None:
    assert C.MROPE_ROWS == 3
    assert C.MROPE_POSITION_AXES == (C.MROPE_ROWS, C.AXIS_BATCH, C.AXIS_SEQ)
