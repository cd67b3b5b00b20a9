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
}
