"""The language half of a LLaVA checkpoint as a plain *ForCausalLM that shares its weights."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from svdprune_onnx.families import FAMILIES
from svdprune_onnx.vision import UnsupportedModelError


def causal_lm(llava: PreTrainedModel) -> PreTrainedModel:
    """LLaVA's text model + lm_head as an AutoModelForCausalLM, without copying any weight.

    The shell is built on the meta device (no memory), then LLaVA's own modules are put in it, so
    a 7B export never holds two copies of the weights.
    """
    cfg = llava.config.text_config
    allowed = FAMILIES[llava.config.model_type].text_models
    if cfg.model_type not in allowed:
        raise UnsupportedModelError(
            f"text model {cfg.model_type!r} is not supported; supported: {', '.join(allowed)}"
        )
    inner = getattr(llava, "model", llava)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    lm.model = inner.language_model
    lm.lm_head = llava.lm_head
    lm.config._attn_implementation = "eager"
    return lm.eval()
