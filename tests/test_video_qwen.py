"""Several images and a video in one prompt, tiny Qwen2.5-VL: our runtime against transformers.

Unpruned bundle: `Qwen2_5_VLForConditionalGeneration.generate(pixel_values, image_grid_thw,
pixel_values_videos, video_grid_thw, second_per_grid_ts)` on transformers' own pixels (its slow
image processor; videos through its `videos=` path with the video processor's min/max pixels)
and its own prompt (the chat template, each placeholder expanded as Qwen2_5_VLProcessor does):
the same prompt ids, greedy tokens, and every step's logits within LOGITS_RTOL. The runtime runs
a video as one vision call per temporal slice of 2 frames; transformers runs the whole clip.
Pruned (K = 16 per image / per slice): the reference takes transformers' features at the
runtime's kept indices, transformers' get_rope_index positions of the unpruned prompt at the
kept tokens, and runs the same language model greedily step by step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, DynamicCache, Qwen2VLImageProcessor

from bench.video_profile import pan_clip
from export.qwen_decoder import qwen_causal_lm
from runtime import contract as C
from runtime import rows
from runtime.generate import Pipeline, Sampling
from runtime.generator import Generator
from runtime.media import load_video
from runtime.parity import rel_diff
from runtime.preprocess import load_image
from runtime.session import SessionConfig

NEW_TOKENS = 5
LOGITS_RTOL = 1e-4
TEXT = "What happens, and what is in the picture?"


@pytest.fixture(scope="module")
def hf(tiny_qwen: Path, qwen_model):
    tok = AutoTokenizer.from_pretrained(tiny_qwen, local_files_only=True)
    ip = Qwen2VLImageProcessor.from_pretrained(tiny_qwen, local_files_only=True)
    chat = json.loads((tiny_qwen / "chat_template.json").read_text())["chat_template"]
    return qwen_model, tok, ip, chat


@pytest.fixture(scope="module")
def clip(photo_paths, tmp_path_factory) -> Path:
    # 6 frames, 2 MP photo panned at 448x336: 3 slices of 12x16 merged tokens each
    return pan_clip(tmp_path_factory.mktemp("qclip") / "pan", 6, (448, 336), photo_paths[1])


@pytest.fixture(scope="module")
def pipes(qwen_bundle) -> dict[str, Pipeline]:
    """Each bundle opened once for the module (a gram vision graph takes seconds to open)."""
    return {n: Pipeline(qwen_bundle(n), SessionConfig(provider="cpu")) for n in ("all", "16")}


def hf_inputs(hf, pipe: Pipeline, media: list) -> tuple[list[int], dict]:
    """transformers' prompt ids and model inputs for one user turn: media in order, then TEXT."""
    _, tok, ip, chat = hf
    v = pipe.m[C.KEY_VISION]
    parts = [{"type": "video" if hasattr(m, "fps") else "image"} for m in media]
    turn = [{"role": "user", "content": [*parts, {"type": "text", "text": TEXT}]}]
    text = tok.apply_chat_template(turn, chat_template=chat, tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    inputs: dict = {}
    images = [m for m in media if not hasattr(m, "fps")]
    videos = [m for m in media if hasattr(m, "fps")]
    if images:
        out = ip(images=images, return_tensors="pt")
        inputs |= {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
    if videos:
        size = {"shortest_edge": v[C.V_VIDEO_MIN_PIXELS], "longest_edge": v[C.V_VIDEO_MAX_PIXELS]}
        out = ip(images=None, videos=[list(x.frames) for x in videos], size=size,
                 return_tensors="pt")  # fmt: skip
        inputs |= {"pixel_values_videos": out["pixel_values_videos"],
                   "video_grid_thw": out["video_grid_thw"],
                   "second_per_grid_ts": torch.tensor([2 / x.fps for x in videos])}  # fmt: skip
    # Qwen2_5_VLProcessor's expansion: each placeholder -> t*h*w / merge^2 tokens, in order
    for key, token in (("image_grid_thw", "<|image_pad|>"), ("video_grid_thw", "<|video_pad|>")):
        for grid in inputs.get(key, []):
            text = text.replace(token, "<|placeholder|>" * int(grid.prod() // 4), 1)
        text = text.replace("<|placeholder|>", token)
    ids = tok(text)["input_ids"]
    return ids, inputs | {"input_ids": torch.tensor([ids])}


def ours(pipe: Pipeline, media: list):
    """(prompt ids, tokens, logits (T, V), vision output) of one row through the runtime."""
    (row,) = rows.prepare(pipe, [media])
    ids = rows.prompt_ids(pipe, TEXT, row)
    image = rows.run(pipe, [row])
    gen = Generator(pipe, Sampling(NEW_TOKENS), 1)
    gen.append_tokens([ids], image=image)
    gen.eos = set()
    logits = []
    while not gen.is_done():
        gen.generate_next_token()
        logits.append(gen.logits[0])
    return ids, gen.new_tokens[0], np.stack(logits), image


def media_sets(photo_paths, clip) -> dict[str, list]:
    photos = [load_image(p).resize((448, 336)) for p in photo_paths]  # 192 tokens each
    video = load_video(clip, 6)
    return {
        "two photos": [photos[0], photos[2]],
        "video": [video],
        "photo + video": [photos[2], video],
    }


@pytest.mark.parametrize("case", ["two photos", "video", "photo + video"])
def test_unpruned_equals_transformers_generate(hf, pipes, photo_paths, clip, case) -> None:
    pipe = pipes["all"]
    media = media_sets(photo_paths, clip)[case]
    ref_ids, inputs = hf_inputs(hf, pipe, media)
    with torch.no_grad():
        out = hf[0].generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None)  # fmt: skip
    ids, tokens, logits, _ = ours(pipe, media)
    assert ids == ref_ids, "prompt ids differ from transformers' expansion"
    assert tokens == out.sequences[0, len(ref_ids) :].tolist()
    assert rel_diff(logits, torch.stack(out.logits, 1)[0].numpy()) <= LOGITS_RTOL


def _torch_pruned(hf, pipe: Pipeline, media: list, image) -> tuple[list[int], list, np.ndarray]:
    """transformers' features and positions at the runtime's kept tokens -> (prompt ids,
    greedy tokens, every step's logits (T, V))."""
    model = hf[0]
    full_ids, inputs = hf_inputs(hf, pipe, media)
    grids, feats = [], []
    with torch.no_grad():
        if "pixel_values" in inputs:
            feats += list(model.model.get_image_features(inputs["pixel_values"],
                                                         inputs["image_grid_thw"]))  # fmt: skip
            grids += list(inputs["image_grid_thw"])
        if "pixel_values_videos" in inputs:
            feats += list(model.model.get_video_features(inputs["pixel_values_videos"],
                                                         inputs["video_grid_thw"]))  # fmt: skip
            grids += list(inputs["video_grid_thw"])
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
            inputs.get("second_per_grid_ts"), torch.ones_like(inputs["input_ids"]),
        )  # fmt: skip
    # items in prompt order: our media order is the prompt's (images first here, then videos)
    sizes = image.item_tokens.tolist()
    kept = np.split(image.kept[0, : image.counts[0]], np.cumsum(sizes)[:-1])
    ids = np.array(full_ids)
    media_ids = list(rows.media_ids(pipe.m))
    starts = [
        i
        for i in range(len(ids))
        if ids[i] in media_ids and (i == 0 or ids[i - 1] not in media_ids)
    ]
    keep = ~np.isin(ids, media_ids)
    picked = []
    for start, k, f in zip(starts, kept, feats, strict=True):
        keep[start + k] = True
        picked.append(f[torch.as_tensor(k)])
    lm = qwen_causal_lm(model)
    with torch.no_grad():
        pruned = torch.as_tensor(ids[keep])[None]
        emb = lm.get_input_embeddings()(pruned)
        emb[0, torch.as_tensor(np.isin(ids[keep], media_ids))] = torch.cat(picked)
        step_in, step_pos = emb, pos[:, :, torch.as_tensor(keep)]
        nxt = int(pos.max()) + 1  # original positions: continue after the unpruned prompt
        cache, n, tokens, logits = DynamicCache(), int(keep.sum()), [], []
        for i in range(NEW_TOKENS):
            mask = torch.ones(1, n + i, dtype=torch.long)
            out = lm(step_in, mask, step_pos, cache, logits_to_keep=1)
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(token)
            logits.append(out.logits[0, -1].numpy())
            step_in = lm.get_input_embeddings()(torch.tensor([[token]]))
            step_pos = torch.full((3, 1, 1), nxt + i, dtype=torch.long)
    return ids[keep].tolist(), tokens, np.stack(logits)


@pytest.mark.parametrize("case", ["two photos", "video", "photo + video"])
def test_pruned_equals_transformers_reference(hf, pipes, photo_paths, clip, case) -> None:
    """K per image and per slice of 2 frames, kept tokens at their original (t, h, w)."""
    pipe = pipes["16"]
    media = media_sets(photo_paths, clip)[case]
    ids, tokens, logits, image = ours(pipe, media)
    ref_ids, ref_tokens, ref_logits = _torch_pruned(hf, pipe, media, image)
    assert ids == ref_ids
    assert tokens == ref_tokens
    assert rel_diff(logits, ref_logits) <= LOGITS_RTOL
    slices = sum(3 if hasattr(m, "fps") else 1 for m in media)
    assert image.counts[0] == 16 * slices


def test_video_time_positions(pipes, clip) -> None:
    """fps 2, temporal patch 2, tokens_per_second 2: slice s of a video sits at t = 2 s."""
    pipe = pipes["all"]
    (row,) = rows.prepare(pipe, [[load_video(clip, 6)]])
    assert rows.t_step(pipe, 2.0) == 2 and rows.t_step(pipe, 4.0) == 0  # transformers' int()
    video = row[0]
    assert video.grid == (3, 24, 32) and video.t_step == int(2 / (6 / 6 * 2.0)) * 2


@pytest.mark.parametrize("name", ["all", "16"])
def test_rows_of_different_media_batch_like_singles(pipes, photo_paths, clip, name) -> None:
    """A batch of rows [2 photos], [video], [photo + video]: each row equals itself alone."""
    pipe = pipes[name]
    sets = list(media_sets(photo_paths, clip).values())
    items = rows.prepare(pipe, sets)
    ids = [rows.prompt_ids(pipe, TEXT, r) for r in items]
    batch = pipe.generate(None, ids, Sampling(NEW_TOKENS), vision_out=rows.run(pipe, items))
    for i, row in enumerate(items):
        (one,) = pipe.generate(
            None, [ids[i]], Sampling(NEW_TOKENS), vision_out=rows.run(pipe, [row])
        )
        assert batch[i].token_ids == one.token_ids
        assert rel_diff(batch[i].first_logits, one.first_logits) <= LOGITS_RTOL
