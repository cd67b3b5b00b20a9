"""Several images and videos in one prompt row: preprocess, vision, prompt ids (numpy only).

    row = [Image, Video, Image ...] (prompt order)
      ─► items: LLaVA  image -> 1 frame, video -> F frames, each frame K tokens (an image block)
                Qwen   image -> 1 slice,  video -> ceil(F / 2) slices (2 frames each), K per slice
      ─► vision: LLaVA every frame of every row in one batch; Qwen one call per slice
      ─► per row: features (B, T_max, D) and kept (B, T_max), -1 padded, items in prompt order
             (a video's kept indices count over its whole merged grid: slice s adds s * h * w)
    text + items ─► chat template (placeholders in order) ─► ids, each placeholder K (or N) long

The row's vision output feeds Generator.append_tokens like one image's: the scatter fills the
row's media tokens in order; positions (LLaVA original, Qwen M-RoPE) walk the items in order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime import contract as C
from runtime.media import IMAGE_MARKER, Video
from runtime.preprocess import ImageError, preprocess_batch
from runtime.preprocess_qwen import merged_tokens, preprocess_qwen, preprocess_qwen_video
from runtime.qwen_images import QwenImages, pad_rows, run_vision

IMAGE, VIDEO = "image", "video"


class MediaPromptError(ValueError):
    """Media and prompt text that do not fit together; the message names the fix."""


@dataclass(frozen=True)
class Item:
    """One image or video of a row, preprocessed. `inputs`: LLaVA (F, 3, H, W) pixels; Qwen a
    list of (pixel_values, image_grid_thw) slices. `grid` (T, H, W) patches and `t_step` (the
    M-RoPE time step per slice) for Qwen; `tokens`: its image tokens in the prompt."""

    kind: str
    inputs: object
    tokens: int
    grid: tuple[int, int, int] | None = None
    t_step: int = 0


def t_step(pipe, fps: float) -> int:
    """Qwen2.5-VL's time step per slice: int(temporal_patch / fps) * tokens_per_second. The
    int() is transformers' (4.57 get_rope_index casts second_per_grid_t to the int64 range's
    dtype), kept so positions equal its own; fps above temporal_patch gives every slice t = 0."""
    v = pipe.m[C.KEY_VISION]
    return int(v[C.V_TEMPORAL_PATCH] / fps) * int(v[C.V_TOKENS_PER_SECOND])


def prepare(pipe, rows: Sequence[Sequence[Image.Image | Video]]) -> list[list[Item]]:
    """Each row's images and videos -> Items (the bundle's own preprocessing)."""
    out = []
    for row in rows:
        if not row:
            raise ImageError("a prompt row holds no image or video; pass at least one")
        out.append([_item(pipe, m) for m in row])
    return out


def _item(pipe, media: Image.Image | Video) -> Item:
    m = pipe.m
    if not pipe.qwen:
        frames = list(media.frames) if isinstance(media, Video) else [media]
        pixels = preprocess_batch(frames, m[C.KEY_VISION])
        return Item(VIDEO if isinstance(media, Video) else IMAGE, pixels, pipe.k * len(frames))
    floor = m[C.KEY_PRUNING].get(C.P_MIN_TOKENS, 1)
    if isinstance(media, Video):
        if C.T_VIDEO_TOKEN_ID not in m[C.KEY_TEXT]:
            raise ImageError(f"{pipe.bundle.name} predates video support; re-export it")
        slices = preprocess_qwen_video(media.frames, m[C.KEY_VISION], floor)
        _, h, w = (int(v) for v in slices[0][1][0])
        step = t_step(pipe, media.fps)
        return Item(VIDEO, slices, _slice_tokens(pipe, slices), (len(slices), h, w), step)
    sample = preprocess_qwen(media, m[C.KEY_VISION], floor)
    _, h, w = (int(v) for v in sample[1][0])
    return Item(IMAGE, [sample], _slice_tokens(pipe, [sample]), (1, h, w))


def _slice_tokens(pipe, slices: list) -> int:
    if pipe.k is not None:
        return pipe.k * len(slices)
    merge = pipe.m[C.KEY_VISION][C.V_MERGE_SIZE]
    return sum(int(merged_tokens(g, merge)[0]) for _, g in slices)


def run(pipe, rows: list[list[Item]]):
    """The rows' vision output: LLaVA (features (B, T, D), kept (B, T)) -1 padded; Qwen a
    QwenImages with one grid per item."""
    if pipe.qwen:
        return _run_qwen(pipe, rows)
    frames = np.concatenate([it.inputs for row in rows for it in row])
    feats, kept = _llava_vision(pipe, frames)  # (frames, K, D), (frames, K)
    ends = np.cumsum([sum(len(it.inputs) for it in row) for row in rows])
    return pad_rows(
        [f.reshape(-1, f.shape[-1]) for f in np.split(feats, ends[:-1])],
        [k.reshape(-1) for k in np.split(kept, ends[:-1])],
    )


def _llava_vision(pipe, frames: np.ndarray):
    """All frames through the vision graph: one batch (or static-batch chunks)."""
    step = pipe.static_batch or len(frames)
    parts = []
    for i in range(0, len(frames), step):
        chunk = frames[i : i + step]
        if len(chunk) < step:  # a static graph: pad the last chunk with copies, drop them after
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), 0)])
        f, k = pipe.vision.run(None, {C.PIXEL_VALUES: chunk})
        parts.append((f[: len(frames) - i], k[: len(frames) - i]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _run_qwen(pipe, rows: list[list[Item]]) -> QwenImages:
    slices = [s for row in rows for it in row for s in it.inputs]
    per = run_vision(pipe.vision, slices, pipe.m)  # one call per slice
    feats, kept, at = [], [], 0
    for row in rows:
        f_row, k_row = [], []
        for it in row:
            merged = int(merged_tokens(it.inputs[0][1], pipe.m[C.KEY_VISION][C.V_MERGE_SIZE])[0])
            for s in range(len(it.inputs)):  # slice s's indices count after s slices
                n = int(per.counts[at])
                f_row.append(per.features[at, :n])
                k_row.append(per.kept[at, :n] + s * merged)
                at += 1
        feats.append(np.concatenate(f_row))
        kept.append(np.concatenate(k_row))
    counts = np.array([len(k) for k in kept], np.int64)
    items = [it for row in rows for it in row]
    return QwenImages(
        *pad_rows(feats, kept), np.array([it.grid for it in items], np.int64), counts,
        per_row=np.array([len(r) for r in rows], np.int64),
        item_tokens=np.array([it.tokens for it in items], np.int64),
        t_steps=np.array([it.t_step for it in items], np.int64),
    )  # fmt: skip


# --- prompt ---------------------------------------------------------------------------------
def content(pipe, text: str, row: Sequence[Item]) -> list[dict]:
    """HF chat content parts for one user turn: `text` with IMAGE_MARKER where the items go
    (then exactly one marker per item), or the items first and then the text."""
    parts = text.split(IMAGE_MARKER)
    if len(parts) > 1 and len(parts) - 1 != len(row):
        raise MediaPromptError(
            f"the prompt places {len(parts) - 1} {IMAGE_MARKER} markers for {len(row)} images/"
            f"videos; put one marker per -i/--video (in order), or none (all go first)"
        )

    def media(it: Item) -> list[dict]:  # LLaVA: a video is one image block per frame
        if it.kind == VIDEO and not pipe.qwen:
            return [{"type": IMAGE}] * len(it.inputs)
        return [{"type": it.kind}]

    if len(parts) == 1:
        return [p for it in row for p in media(it)] + [{"type": "text", "text": text}]
    out: list[dict] = []
    for i, piece in enumerate(parts):
        if piece:
            out.append({"type": "text", "text": piece})
        if i < len(row):
            out += media(row[i])
    return out


def slots(pipe, row: Sequence[Item]) -> list[tuple[str, int]]:
    """(placeholder, tokens) per placeholder the row's rendered prompt holds, in order."""
    p = pipe.prompt_cfg
    out = []
    for it in row:
        if it.kind == VIDEO and pipe.qwen:
            out.append((p[C.PR_VIDEO], it.tokens))
        else:  # an image, or one LLaVA frame each
            n = 1 if it.kind == IMAGE else len(it.inputs)
            out += [(p[C.PR_IMAGE], it.tokens // n)] * n
    return out


def encode(pipe, text: str, row_slots: Sequence[tuple[str, int]]) -> list[int]:
    """Rendered `text` whose placeholders are `row_slots`' in order -> ids, each placeholder
    expanded to its count; checked against the media token ids the tokenizer gives."""
    names = sorted({s for s, _ in row_slots}, key=len, reverse=True)
    pieces = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
    found = [x for x in pieces[1::2]]
    if found != [s for s, _ in row_slots]:
        raise MediaPromptError(
            f"the rendered prompt holds the placeholders {found}, the images/videos need "
            f"{[s for s, _ in row_slots]}; check the chat template"
        )
    counts = iter(n for _, n in row_slots)
    expanded = "".join(x if i % 2 == 0 else x * next(counts) for i, x in enumerate(pieces))
    ids = pipe.tokenizer.encode(expanded).ids
    media = media_ids(pipe.m)
    got = sum(1 for i in ids if i in media)
    if got != sum(n for _, n in row_slots):
        raise MediaPromptError(f"prompt holds {got} media tokens, the row needs "
                               f"{sum(n for _, n in row_slots)}")  # fmt: skip
    return ids


def media_ids(manifest: dict) -> set[int]:
    """Token ids the image features replace: the image token (and Qwen's video token)."""
    t = manifest[C.KEY_TEXT]
    return {t[C.T_IMAGE_TOKEN_ID]} | ({t[C.T_VIDEO_TOKEN_ID]} if C.T_VIDEO_TOKEN_ID in t else set())


def prompt_ids(pipe, text: str, row: Sequence[Item]) -> list[int]:
    """One user turn: `text` (IMAGE_MARKER placing the items, or none) with the row's media,
    in the checkpoint's chat template, as ids."""
    from runtime.chat import render

    turn = {"role": "user", "content": content(pipe, text, row)}
    return encode(pipe, render(pipe, [turn]), slots(pipe, row))


# --- context --------------------------------------------------------------------------------
def positions_needed(pipe, ids: Sequence[int], row: Sequence[Item]) -> int:
    """Positions the prompt `ids` takes (its last position + 1), before any vision run: compact
    positions count tokens; original ones give each image (frame, video) its unpruned span."""
    original = pipe.m[C.KEY_PRUNING].get(C.P_POSITIONS) == C.POSITIONS_ORIGINAL
    if not original and pipe.k is not None:  # compact: one position per token
        return len(ids)
    media = media_ids(pipe.m)
    text = sum(1 for i in ids if i not in media)
    if not pipe.qwen:  # each frame: N positions for its K tokens
        frames = sum(len(it.inputs) for it in row)
        return text + frames * pipe.m[C.KEY_PRUNING][C.P_N]
    merge = pipe.m[C.KEY_VISION][C.V_MERGE_SIZE]
    spans = [max((t - 1) * it.t_step, h // merge - 1, w // merge - 1) + 1
             for it in row for t, h, w in [it.grid]]  # fmt: skip
    return text + sum(spans)


def shortened(pipe, row: Sequence[Item], frames: int) -> list[Item]:
    """`row` with each video cut to its first `frames` frames' worth of tokens (for sizing
    prompts only: the items' inputs are not usable for vision)."""
    from dataclasses import replace

    out = []
    for it in row:
        if it.kind != VIDEO:
            out.append(it)
        elif not pipe.qwen:
            n = min(frames, len(it.inputs))
            out.append(replace(it, inputs=it.inputs[:n], tokens=it.tokens // len(it.inputs) * n))
        else:
            t = -(-frames // pipe.m[C.KEY_VISION][C.V_TEMPORAL_PATCH])
            n = min(t, len(it.inputs))
            per = it.tokens // len(it.inputs)
            out.append(replace(it, inputs=it.inputs[:n], tokens=per * n, grid=(n, *it.grid[1:])))
    return out


def check_context(pipe, text: str, row: Sequence[Item], new_tokens: int, frames: int) -> None:
    """PromptError unless the prompt and `new_tokens` fit the model's positions; with a video,
    the message names the largest --frames that fits."""
    from runtime.generate import PromptError

    limit = pipe.text[C.T_MAX_POS]
    need = positions_needed(pipe, prompt_ids(pipe, text, row), row) + new_tokens
    if need <= limit:
        return
    msg = f"the prompt needs {need} positions with {new_tokens} new tokens, the model has {limit}"
    if any(it.kind == VIDEO for it in row):
        fit = 0
        for f in range(frames - 1, 0, -1):
            cut = shortened(pipe, row, f)
            if positions_needed(pipe, prompt_ids(pipe, text, cut), cut) + new_tokens <= limit:
                fit = f
                break
        hint = f"--frames {fit} fits" if fit else "not even 1 frame fits: shorten the prompt"
        per = "frame" if not pipe.qwen else f"{pipe.m[C.KEY_VISION][C.V_TEMPORAL_PATCH]} frames"
        tokens = pipe.k if pipe.k is not None else "N"
        raise PromptError(f"{msg} ({frames} frames, {tokens} image tokens per {per}); {hint}")
    raise PromptError(f"{msg}; pass fewer images, shorten the prompt or lower --max-new-tokens")
