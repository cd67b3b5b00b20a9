"""Qwen2.5-VL end to end: our runtime (ONNX Runtime, no torch) against transformers.

Unpruned (method none): the runtime's prompt ids equal transformers' own Qwen2_5_VLProcessor's
and its greedy tokens equal `Qwen2_5_VLForConditionalGeneration.generate(pixel_values,
image_grid_thw)` on the real photos at several resolutions, one by one and as one left-padded
batch of different sizes; every step's logits agree to LOGITS_RTOL of their scale.
Pruned (K = 16, 64; original and compact positions): the runtime's tokens equal a PyTorch
reference that scatters PyTorch's pruned features at the K image tokens and runs the same
language model with the same 3-row positions (runtime.mrope, checked against transformers'
get_rope_index in test_mrope.py), greedy, step by step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    DynamicCache,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)

from export.manifest import prune_config
from export.qwen_decoder import qwen_causal_lm
from runtime import contract as C
from runtime.generate import Pipeline, Sampling
from runtime.generator import Generator
from runtime.mrope import decode_positions, rope_index
from runtime.parity import rel_diff
from runtime.preprocess import load_image
from runtime.session import SessionConfig
from svdprune_onnx import qwen_vision as QV

NEW_TOKENS = 6
QUESTION = "What is in the image? Describe it."
LOGITS_RTOL = 1e-4  # every step's logits vs transformers, relative to their scale
# (W, H) PIL resizes besides each photo's own size: square, portrait, and a small image
SIZES = [(448, 448), (300, 500), (200, 120)]


@pytest.fixture(scope="module")
def processor(tiny_qwen: Path) -> Qwen2_5_VLProcessor:
    """transformers' own processor. Its __init__ wants a video processor, which needs torchvision
    (not installed: it would pull CUDA wheels); images never touch it, so it is left out and the
    image-side attributes are set as __init__ sets them. __call__ and the chat template are
    transformers' code, unchanged."""
    ckpt = tiny_qwen
    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    proc.image_processor = Qwen2VLImageProcessor.from_pretrained(ckpt, local_files_only=True)
    proc.tokenizer = tok
    proc.chat_template = json.loads((ckpt / "chat_template.json").read_text())["chat_template"]
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tok.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tok.convert_tokens_to_ids(proc.video_token)
    return proc


@pytest.fixture(scope="module")
def images(photo_paths: list[Path]) -> list[Image.Image]:
    photos = [load_image(p) for p in photo_paths]
    return photos + [photos[i % len(photos)].resize(size) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def bundles(qwen_bundle) -> dict:
    """{name: bundle}: unpruned, K=16 / K=64 (original positions), K=16 compact."""
    return {name: qwen_bundle(str(name)) for name in ("all", 16, 64, "16c")}


def _pipe(bundle: Path) -> Pipeline:
    return Pipeline(bundle, SessionConfig(provider="cpu"))


def _hf_generate(model, processor, image: Image.Image) -> tuple[list[int], list, np.ndarray]:
    """(prompt ids, greedy new tokens, per-step logits (T, V)) from transformers' generate."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None,
        )  # fmt: skip
    prompt = inputs["input_ids"][0].tolist()
    logits = torch.stack(out.logits, 1)[0].numpy()  # (T, V)
    return prompt, out.sequences[0, len(prompt) :].tolist(), logits


def _ours(pipe: Pipeline, images: list[Image.Image]) -> tuple[list, list, list]:
    """Our runtime on a batch: (prompt ids per row, tokens per row, logits (B, T, V))."""
    pixels = pipe.preprocess(images)
    prompts = [pipe.prompt_ids(QUESTION, k) for k in pipe.image_tokens(pixels)]
    image = pipe.run_vision(pixels)
    gen = Generator(pipe, Sampling(NEW_TOKENS), len(images))
    gen.append_tokens(prompts, image=image)
    gen.eos = set()  # as eos_token_id=None: always NEW_TOKENS steps
    logits = []
    while not gen.is_done():
        gen.generate_next_token()  # feeds the last token, then picks from these logits
        logits.append(gen.logits)
    return prompts, gen.new_tokens, np.stack(logits, 1)


def test_unpruned_equals_transformers_generate(bundles, qwen_model, processor, images) -> None:
    """Prompt ids, greedy tokens and every step's logits, image by image and as one batch of
    six images at six resolutions (left-padded, 16 to 1224 image tokens per row)."""
    pipe = _pipe(bundles["all"])
    refs = [_hf_generate(qwen_model, processor, im) for im in images]
    batch = _ours(pipe, images)
    for i, (im, (prompt, tokens, logits)) in enumerate(zip(images, refs, strict=True)):
        for ours in (_ours(pipe, [im]), tuple(x[i : i + 1] for x in batch)):
            assert ours[0][0] == prompt, f"prompt ids differ on {im.size}"
            assert ours[1][0] == tokens, f"greedy tokens differ on {im.size}"
            assert rel_diff(ours[2][0], logits) <= LOGITS_RTOL, im.size


def _torch_pruned(model, pipe: Pipeline, image: Image.Image, k: int, mode: str) -> tuple:
    """The PyTorch reference for a pruned bundle: (kept indices, greedy tokens)."""
    m = pipe.m
    (pixels, grid) = pipe.preprocess([image])[0]
    cfg = prune_config(m[C.KEY_PRUNING])  # what the bundle was exported with
    assert (cfg.k, cfg.n) == (k, QV.N_MAX)
    vision = QV.PrunedQwenVision(model, cfg, site=m[C.KEY_PRUNING][C.P_SCORE_SITE]).eval()
    lm = qwen_causal_lm(model)
    with torch.no_grad():
        feats, kept = vision(torch.from_numpy(pixels), torch.from_numpy(grid))
        ids = np.array([pipe.prompt_ids(QUESTION)])
        emb = lm.get_input_embeddings()(torch.from_numpy(ids))
        emb[0, ids[0] == m[C.KEY_TEXT][C.T_IMAGE_TOKEN_ID]] = feats
        image_id = m[C.KEY_TEXT][C.T_IMAGE_TOKEN_ID]
        pos, deltas = rope_index(ids, image_id, grid, kept_indices=kept.numpy(), mode=mode)
        cache, mask, tokens = DynamicCache(), np.ones_like(ids), []
        step_in, step_pos = emb, pos
        for _ in range(NEW_TOKENS):
            out = lm(step_in, torch.from_numpy(mask), torch.from_numpy(step_pos), cache,
                     logits_to_keep=1)  # fmt: skip
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(token)
            step_in = lm.get_input_embeddings()(torch.tensor([[token]]))
            step_pos = decode_positions(deltas, mask.shape[1])
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
    return kept.numpy(), tokens


@pytest.mark.parametrize("name", [16, 64, "16c"])
def test_pruned_equals_torch_reference(bundles, qwen_model, images, name) -> None:
    """K image tokens per image, each at its original (t, h, w) (or compact): the same kept
    tokens and greedy tokens as PyTorch, on every image (row by row and as a batch)."""
    pipe = _pipe(bundles[name])
    k, mode = pipe.k, pipe.m[C.KEY_PRUNING][C.P_POSITIONS]
    batch = _ours(pipe, images)
    image = pipe.run_vision(pipe.preprocess(images))
    for i, im in enumerate(images):
        kept, tokens = _torch_pruned(qwen_model, pipe, im, k, mode)
        np.testing.assert_array_equal(image.kept[i], kept, err_msg=str(im.size))
        assert batch[1][i] == tokens, f"greedy tokens differ on {im.size} ({mode})"


def test_positions_follow_the_unpruned_image(bundles, images) -> None:
    """Original positions: the text after a pruned image starts where the unpruned image's does
    (its max + 1), so the answer's positions match the unpruned prompt's exactly."""
    pruned, full = _pipe(bundles[16]), _pipe(bundles["all"])
    for im in images[:3]:
        rows = []
        for pipe in (pruned, full):
            pixels = pipe.preprocess([im])
            gen = Generator(pipe, Sampling(1), 1)
            gen.append_tokens([pipe.prompt_ids(QUESTION, pipe.image_tokens(pixels)[0])],
                              image=pipe.run_vision(pixels))  # fmt: skip
            rows.append(gen.positions)
        assert rows[0].max() == rows[1].max()  # the last prompt token's position
        text_after = rows[0][:, 0, -5:]
        np.testing.assert_array_equal(text_after, rows[1][:, 0, -5:])
