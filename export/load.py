"""Load a local LLaVA-family checkpoint (never from a hub) and its image processor."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor, LlavaForConditionalGeneration

from svdprune_onnx.families import FAMILIES, VISION_TOWERS
from svdprune_onnx.vision import UnsupportedModelError


class CheckpointError(ValueError):
    """The --model path is not a usable local checkpoint; the message says why."""


def read_config(path: Path) -> dict:
    """config.json of a local checkpoint folder, checked against the supported families."""
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a folder; pass a local HF checkpoint dir")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; pass a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{cfg_file} is not valid JSON ({e}); re-download the checkpoint"
        ) from e
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"{path}: model_type {family!r} is not supported; "
            f"supported families: {', '.join(FAMILIES)} (e.g. llava-hf/llava-1.5-7b-hf)"
        )
    tower = cfg.get("vision_config", {}).get("model_type", "clip_vision_model")
    if tower not in VISION_TOWERS:
        raise UnsupportedModelError(
            f"{path}: vision tower {tower!r} is not supported; "
            f"supported: {', '.join(VISION_TOWERS)}"
        )
    return cfg


def load_llava(path: Path) -> LlavaForConditionalGeneration:
    """The model in float32 eval mode, local files only, eager attention (plain ONNX ops)."""
    read_config(path)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            path, torch_dtype=torch.float32, attn_implementation="eager", local_files_only=True
        )
    except OSError as e:
        raise CheckpointError(f"cannot load weights from {path}: {e}") from e
    return model.eval()


def load_image_processor(path: Path):
    """The checkpoint's own image processor (the reference the runtime must match)."""
    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
    except OSError as e:
        raise CheckpointError(
            f"{path} has no usable preprocessor_config.json ({e}); the bundle needs it"
        ) from e
