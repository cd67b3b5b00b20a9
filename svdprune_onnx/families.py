"""Supported model families: frozen dataclasses in plain dicts (no registry, no inheritance)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionTower:
    """A vision tower LLaVA can carry; `has_cls` says whether token 0 is a [CLS] token."""

    model_type: str
    has_cls: bool


@dataclass(frozen=True)
class Family:
    """A VLM family: its transformers class and which towers / text models it may carry."""

    model_type: str
    hf_class: str
    towers: tuple[str, ...]
    text_models: tuple[str, ...]


VISION_TOWERS: dict[str, VisionTower] = {
    "clip_vision_model": VisionTower("clip_vision_model", has_cls=True),
    "siglip_vision_model": VisionTower("siglip_vision_model", has_cls=False),
}

FAMILIES: dict[str, Family] = {
    "llava": Family(
        model_type="llava",
        hf_class="LlavaForConditionalGeneration",
        towers=tuple(VISION_TOWERS),
        text_models=("llama", "qwen2", "mistral"),
    ),
    # Qwen2.5-VL's tower is its own (native-resolution patching, window attention, 2x2 patch
    # merger), saved with vision_config.model_type "qwen2_5_vl"; it is not one of the towers a
    # LLaVA can carry, so it is not in VISION_TOWERS. Built-in tiny: svdprune_onnx/tiny_qwen.py.
    "qwen2_5_vl": Family(
        model_type="qwen2_5_vl",
        hf_class="Qwen2_5_VLForConditionalGeneration",
        towers=("qwen2_5_vl",),
        text_models=("qwen2_5_vl_text",),
    ),
}
