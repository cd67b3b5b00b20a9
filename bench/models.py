"""Benchmark models: a random-weight LLaVA-1.5-7B-shaped vision path, built offline from a config.

Only the shapes that pruning sees are real: a CLIP ViT-L/14-336 tower (576 patch tokens of width
1024 at the penultimate layer) and a 1024 -> 4096 -> 4096 projector. The language model is tiny in
everything but its hidden size (1 layer, 1 head), so the whole thing fits in memory on a laptop.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from runtime.preprocess import load_image
from svdprune_onnx.tiny import llava15_image_processor

IMAGE_SIZE = 336
PATCH_SIZE = 14
N_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
GRID = (IMAGE_SIZE // PATCH_SIZE, IMAGE_SIZE // PATCH_SIZE)  # (24, 24)
VISION_HIDDEN = 1024
TEXT_VOCAB = 1000

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
BENCH_DIR = REPO_ROOT / "build" / "bench"


def clip_l_llava(
    seed: int = 0, text_hidden: int = 4096, vision_layers: int = 24
) -> LlavaForConditionalGeneration:
    """Random-weight LLaVA with a CLIP ViT-L/14-336 tower, layer -2, "default" strategy.

    `vision_layers` < 24 gives a shallower tower of the same width (quick runs only).
    """
    vision = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4096,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
        projection_dim=768,
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=TEXT_VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=TEXT_VOCAB - 1,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=N_TOKENS,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.to(torch.float32).eval()


def clip_l_processor() -> CLIPImageProcessor:
    """LLaVA-1.5's preprocessing (the same object the tiny checkpoint ships)."""
    return llava15_image_processor()


def photo_paths(n: int) -> list[Path]:
    """The 3 shared demo photos, then COCO-128 train images, `n` in all (sorted, deterministic)."""
    images, coco = SHARED_DATA / "images", SHARED_DATA / "coco128" / "images" / "train"
    demo = sorted([*images.glob("*.jpg"), *images.glob("*.png")])
    if not demo or not coco.is_dir():
        raise FileNotFoundError(
            f"benchmark photos missing: expected {images}/*.jpg|png and {coco}/*.jpg "
            "(the shared data folder beside the repo root, see shared/data/README.md)"
        )
    paths = (demo + sorted(coco.glob("*.jpg")))[:n]
    if len(paths) < n:
        raise FileNotFoundError(
            f"asked for {n} photos but only {len(paths)} exist under {SHARED_DATA}"
        )
    return paths


def pixel_values(paths: list[Path]) -> np.ndarray:
    """Preprocessed photos: (B, 3, 336, 336) float32."""
    images = [load_image(p) for p in paths]
    out = clip_l_processor()(images=images, return_tensors="np")["pixel_values"]
    return out.astype(np.float32)


def build_logged(seed: int = 0, vision_layers: int = 24) -> LlavaForConditionalGeneration:
    """clip_l_llava with a console line, since building 300M random weights takes a while."""
    t0 = time.perf_counter()
    print(f"building random-weight CLIP-L/336 LLaVA ({vision_layers} layers) ...", flush=True)
    model = clip_l_llava(seed, vision_layers=vision_layers)
    print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    return model
