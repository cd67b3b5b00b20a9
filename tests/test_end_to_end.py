"""The three graphs in ONNX Runtime give the same greedy tokens as transformers' generate.

A plain numpy greedy loop over the bundle (the runtime's job, written out here as the reference)
against `LlavaForConditionalGeneration.generate(inputs_embeds=...)` fed the same pruned
features at the same K image-token positions, on the real photos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tokenizers import Tokenizer

from export.__main__ import cli
from export.load import load_image_processor, load_llava
from export.photos import validation_batches
from export.text_graphs import empty_past
from runtime import contract as C
from svdprune_onnx.select import PruneConfig
from svdprune_onnx.vision import PrunedVision

K, NEW_TOKENS = 16, 8
QUESTION = "What is in the image? Describe it."


def sessions(bundle: Path) -> dict[str, ort.InferenceSession]:
    opts = {"providers": ["CPUExecutionProvider"]}
    return {
        f: ort.InferenceSession(str(bundle / f), **opts)
        for f in (C.VISION_ONNX, C.EMBED_ONNX, C.DECODER_ONNX)
    }


def prompt_ids(bundle: Path, manifest: dict) -> np.ndarray:
    """Template -> text with exactly K image placeholders -> ids, with the bundle's tokenizer."""
    p = manifest[C.KEY_PROMPT]
    text = p[C.PR_TEMPLATE].replace(p[C.PR_MARKER], QUESTION)
    text = text.replace(p[C.PR_IMAGE], p[C.PR_IMAGE] * manifest[C.KEY_TEXT][C.T_IMAGE_TOKENS])
    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text).ids
    return np.array([ids], dtype=np.int64)


def positions(ids: np.ndarray, kept: np.ndarray, mode: str, image_id: int, n: int) -> np.ndarray:
    """(1, S) position ids: compact 0..S-1, or kept image tokens at their original slots."""
    if mode == C.POSITIONS_COMPACT:
        return np.arange(ids.shape[1])[None]
    is_img = ids[0] == image_id
    first = int(np.argmax(is_img))
    pos = np.arange(ids.shape[1])
    pos[is_img] = first + kept[0]
    after = np.arange(ids.shape[1]) > np.nonzero(is_img)[0][-1]
    pos[after] += n - K  # text after the image starts at offset N
    return pos[None]


def ort_greedy(bundle: Path, pixels: np.ndarray, mode: str = C.POSITIONS_COMPACT) -> list[int]:
    """vision -> embed -> scatter -> prefill -> greedy decode, numpy only."""
    m = json.loads((bundle / C.MANIFEST_FILE).read_text())
    t, s = m[C.KEY_TEXT], sessions(bundle)
    feats, kept = s[C.VISION_ONNX].run(None, {C.PIXEL_VALUES: pixels})  # (1,K,D), (1,K)
    ids = prompt_ids(bundle, m)
    (embeds,) = s[C.EMBED_ONNX].run(None, {C.INPUT_IDS: ids})  # (1,S,D)
    is_img = ids[0] == t[C.T_IMAGE_TOKEN_ID]
    assert is_img.sum() == K, "the prompt must carry exactly K image tokens"
    embeds[0, is_img] = feats[0]
    pos = positions(ids, kept, mode, t[C.T_IMAGE_TOKEN_ID], m[C.KEY_PRUNING][C.P_N])
    feed = empty_past(t[C.T_LAYERS], 1, t[C.T_KV_HEADS], t[C.T_HEAD_DIM])
    mask = np.ones_like(ids)
    out: list[int] = []
    for _ in range(NEW_TOKENS):
        feed |= {C.INPUTS_EMBEDS: embeds, C.ATTENTION_MASK: mask, C.POSITION_IDS: pos}
        logits, *present = s[C.DECODER_ONNX].run(None, feed)
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in t[C.T_EOS]:
            break
        names = [n for i in range(t[C.T_LAYERS]) for n in C.past_names(i)]
        feed |= dict(zip(names, present, strict=True))
        (embeds,) = s[C.EMBED_ONNX].run(None, {C.INPUT_IDS: np.array([[token]])})
        mask = np.concatenate([mask, [[1]]], axis=1)
        pos = pos[:, -1:] + 1
    return out


def torch_reference(ckpt: Path, bundle: Path, pixels: np.ndarray, mode: str) -> list[int]:
    """transformers: the same pruned features in the same slots; generate() for compact ids."""
    m = json.loads((bundle / C.MANIFEST_FILE).read_text())
    model = load_llava(ckpt)
    module = PrunedVision(model, PruneConfig(k=K, n=576)).eval()
    ids = prompt_ids(bundle, m)
    with torch.no_grad():
        feats, kept = module(torch.from_numpy(pixels))
        embeds = model.get_input_embeddings()(torch.from_numpy(ids))
        embeds[0, torch.from_numpy(ids[0] == model.config.image_token_index)] = feats[0]
        if mode == C.POSITIONS_COMPACT:
            gen = model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(torch.from_numpy(ids)),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=m[C.KEY_TEXT][C.T_PAD],
            )
            return gen[0].tolist()
        # original slots: generate() derives positions from the mask, so loop by hand.
        pos = torch.from_numpy(
            positions(ids, kept.numpy(), mode, model.config.image_token_index, 576)
        )
        out, past = [], None
        for _ in range(NEW_TOKENS):
            r = model(inputs_embeds=embeds, position_ids=pos, past_key_values=past, use_cache=True)
            token = int(r.logits[0, -1].argmax())
            out.append(token)
            if token in m[C.KEY_TEXT][C.T_EOS]:
                break
            past, pos = r.past_key_values, pos[:, -1:] + 1
            embeds = model.get_input_embeddings()(torch.tensor([[token]]))
        return out


@pytest.fixture(scope="module")
def bundles(
    tiny_clip: Path,
    tiny_siglip: Path,
    realistic_clip: Path,
    realistic_siglip: Path,
    tmp_path_factory,
) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("e2e")
    out = {}
    for name, ckpt in (
        ("clip-llama", tiny_clip),
        ("siglip-qwen2", tiny_siglip),
        # outlier tokens in the tower, massive activations at BOS in the decoder
        ("realistic-clip-llama", realistic_clip),
        ("realistic-siglip-qwen2", realistic_siglip),
    ):
        assert cli(["-m", str(ckpt), "--k", str(K), "-o", str(root / name)]) == 0
        out[name] = (ckpt, root / name)
    return out


@pytest.mark.parametrize(
    "name", ["clip-llama", "siglip-qwen2", "realistic-clip-llama", "realistic-siglip-qwen2"]
)
def test_same_greedy_tokens_as_transformers(bundles, photo_paths, name: str) -> None:
    ckpt, bundle = bundles[name]
    pixels = validation_batches(load_image_processor(ckpt), photo_paths)[1]
    for i in range(len(pixels)):
        one = pixels[i : i + 1]
        expected = torch_reference(ckpt, bundle, one, C.POSITIONS_COMPACT)
        assert ort_greedy(bundle, one) == expected, f"photo {photo_paths[i].name}"
        assert len(expected) >= 1


def test_original_positions_match_torch(bundles, photo_paths) -> None:
    ckpt, bundle = bundles["clip-llama"]
    pixels = validation_batches(load_image_processor(ckpt), photo_paths)[0]
    expected = torch_reference(ckpt, bundle, pixels, C.POSITIONS_ORIGINAL)
    assert ort_greedy(bundle, pixels, C.POSITIONS_ORIGINAL) == expected


def test_bundle_tokenizer_matches_hf(bundles) -> None:
    from transformers import AutoTokenizer

    ckpt, bundle = bundles["clip-llama"]
    m = json.loads((bundle / C.MANIFEST_FILE).read_text())
    hf = AutoTokenizer.from_pretrained(ckpt)
    p = m[C.KEY_PROMPT]
    text = p[C.PR_TEMPLATE].replace(p[C.PR_MARKER], QUESTION).replace(p[C.PR_IMAGE], "<image>" * K)
    assert prompt_ids(bundle, m)[0].tolist() == hf(text)["input_ids"]
