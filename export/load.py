"""Load a local LLaVA-family checkpoint (never from a hub) and its image processor.

Trust: local files only, `trust_remote_code=False` (a checkpoint's `auto_map` / custom .py files
are never imported), weights from safetensors or, for `.bin` checkpoints, `torch.load` with
`weights_only=True` (a pickle that tries to run code is refused), and a checkpoint missing some
weights is refused instead of silently exporting randomly initialised layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoImageProcessor, LlavaConfig, LlavaForConditionalGeneration

from runtime import contract as C
from svdprune_onnx.families import FAMILIES
from svdprune_onnx.vision import UnsupportedModelError, vision_token_count

# Where the built-in random-weight presets are built (once) when no --model is given.
MODELS = Path(__file__).resolve().parents[1] / "build" / "models"


class CheckpointError(ValueError):
    """The --model path is not a usable local checkpoint; the message says why."""


def read_config(path: Path) -> dict:
    """config.json of a local checkpoint folder, checked against the supported families."""
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a folder; pass a local HF checkpoint dir")
    cfg_file = path / C.HF_CONFIG
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
    towers = FAMILIES[family].towers
    if tower not in towers:
        raise UnsupportedModelError(
            f"{path}: vision tower {tower!r} is not supported in a {family} checkpoint; "
            f"supported: {', '.join(towers)}"
        )
    return cfg


def checkpoint(model: Path | None, preset: str = "tiny", family: str | None = None) -> Path:
    """The checkpoint folder: a local `--model`, else the built-in preset, built under MODELS if
    missing: tiny (CLIP + Llama, seconds), realistic (tiny with the activation statistics of
    real checkpoints) or medium (CLIP ViT-L/14-336 + Qwen2-0.5B shapes); family qwen2_5_vl:
    the tiny Qwen2.5-VL, or medium (Qwen2.5-VL-3B shapes)."""
    if model is not None:
        return Path(model).resolve()
    if family == C.FAMILY_QWEN25VL and preset == "medium":
        # 3.8 B random parameters: written tensor by tensor (the model never exists in memory)
        from bench.shaped import build

        return build("qwen2.5-vl-3b", MODELS).resolve()
    if family == C.FAMILY_QWEN25VL:
        from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl

        return ensure_tiny_qwen25vl(MODELS, preset=preset).resolve()
    from svdprune_onnx.tiny import ensure_tiny_llava

    if preset == "medium":
        return ensure_tiny_llava(MODELS, tower="clip", text="qwen2", preset="medium").resolve()
    return ensure_tiny_llava(MODELS, preset=preset).resolve()


def family_of(model: Path | None, family: str | None) -> str:
    """The family to export: the checkpoint's model_type (checked against --family), else
    --family, else LLaVA. A -m without a config.json is not judged here: the export's loading
    refuses it with the fix (and `--print-out` only names its bundle folder)."""
    if model is None or not (Path(model) / C.HF_CONFIG).is_file():
        return family or C.FAMILY_LLAVA
    found = read_config(Path(model))["model_type"]
    if family is not None and family != found:
        raise CheckpointError(
            f"{model} is a {found} checkpoint, not {family}; drop --family (it is read from "
            "config.json) or pass a matching checkpoint"
        )
    return found


def token_count(path: Path) -> int:
    """N, the vision tokens per image, from the config alone (a meta-device model: no weights)."""
    read_config(path)
    with torch.device("meta"):
        cfg = LlavaConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = LlavaForConditionalGeneration(cfg)
    return vision_token_count(model)


def load_llava(path: Path) -> LlavaForConditionalGeneration:
    """The model in float32 eval mode, local files only, eager attention (plain ONNX ops)."""
    read_config(path)
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            path,
            dtype=torch.float32,
            attn_implementation="eager",
            local_files_only=True,
            trust_remote_code=False,
            weights_only=True,
            output_loading_info=True,
        )
    except (OSError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot load weights from {path} ({e}); pass a complete checkpoint folder with "
            "model.safetensors (or weights-only pytorch_model.bin) shards"
        ) from e
    missing = info.get("missing_keys") or []
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} weights (e.g. {missing[0]}): a partial or foreign "
            "checkpoint; re-download it completely"
        )
    return model.eval()


def load_image_processor(path: Path):
    """The checkpoint's own image processor (the reference the runtime must match)."""
    if not (path / C.HF_PREPROCESSOR_CONFIG).is_file():
        # transformers would fall back to a default (224 px) processor: refuse instead.
        raise CheckpointError(
            f"{path} has no usable preprocessor_config.json (missing); copy it from the "
            "original checkpoint, the bundle needs it"
        )
    try:
        return AutoImageProcessor.from_pretrained(
            path, local_files_only=True, use_fast=False, trust_remote_code=False
        )
    except OSError as e:
        raise CheckpointError(
            f"{path} has no usable preprocessor_config.json ({e}); the bundle needs it"
        ) from e
