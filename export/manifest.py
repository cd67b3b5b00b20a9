"""The resolved manifest (svdprune.json): everything the runtime needs, so it never asks again."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from runtime import contract as C
from svdprune_onnx.select import PruneConfig
from svdprune_onnx.vision import llava_parts

# PruneConfig field -> manifest key under "pruning" (both directions go through this table).
PRUNING_KEYS = {
    "k": C.P_K,
    "n": C.P_N,
    "method": C.P_METHOD,
    "rank": C.P_RANK,
    "iterations": C.P_ITERS,
    "oversample": C.P_OVERSAMPLE,
    "center": C.P_CENTER,
    "scored_features": C.P_SCORED,
    "seed": C.P_SEED,
}


def prune_config(pruning: dict) -> PruneConfig:
    """A bundle manifest's pruning section back as the PruneConfig it was exported with."""
    return PruneConfig(**{name: pruning[key] for name, key in PRUNING_KEYS.items()})


PROMPT_MARKER = "{prompt}"
# LLaVA-1.5's conversation format, for checkpoints that ship no chat template.
LLAVA15_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def prompt_section(src: Path) -> dict:
    """One user turn with the image, rendered by the checkpoint's own chat template.

    The runtime replaces PROMPT_MARKER with the user's text and the image placeholder with
    exactly K image tokens; it never renders a template for single-turn use.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(src, local_files_only=True, use_fast=False)
    image = getattr(processor, "image_token", "<image>")
    chat = getattr(processor, "chat_template", None)
    if chat:
        turn = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": PROMPT_MARKER}],
            }
        ]
        template = processor.apply_chat_template(turn, add_generation_prompt=True)
    else:
        template = LLAVA15_TEMPLATE.replace("<image>", image)
    return {C.PR_TEMPLATE: template, C.PR_MARKER: PROMPT_MARKER, C.PR_IMAGE: image, C.PR_CHAT: chat}


def vision_section(model, processor) -> dict:
    """Preprocessing and feature-selection facts, read from the checkpoint's own objects.

    The preprocessing keys come from export.processor, which refuses (ImageProcessorError) any
    image processor class, option or value the runtime does not reproduce exactly.
    """
    from export.processor import preprocessing_facts

    _, _, cfg = llava_parts(model)
    vcfg = cfg.vision_config
    side = vcfg.image_size
    tower_size = [int(s) for s in side] if isinstance(side, list | tuple) else [side, side]
    return {
        C.V_TOWER: vcfg.model_type,
        C.V_FEATURE_LAYER: cfg.vision_feature_layer,
        C.V_SELECT_STRATEGY: cfg.vision_feature_select_strategy,
        **preprocessing_facts(processor, tower_size),
        "patch_size": vcfg.patch_size,
    }


def build_manifest(model, processor, prune: PruneConfig, src: Path, validation: dict) -> dict:
    """Manifest without the `files` and `exporter` sections (added by the writer)."""
    _, _, cfg = llava_parts(model)
    pruning = asdict(prune)
    return {
        C.KEY_SCHEMA: C.SCHEMA_VERSION,
        C.KEY_MODEL: {
            "family": cfg.model_type,
            "source": str(Path(src).resolve()),
            "name": Path(src).name,
        },
        C.KEY_PRUNING: {key: pruning[name] for name, key in PRUNING_KEYS.items()},
        C.KEY_VISION: vision_section(model, processor),
        C.KEY_TEXT: {
            C.T_IMAGE_TOKEN_ID: int(cfg.image_token_index),
            C.T_IMAGE_TOKENS: prune.k,
            **text_facts(model),
        },
        C.KEY_VALIDATION: validation,
    }


def text_facts(llava) -> dict:
    """Shapes the runtime needs for the KV cache and the prompt, read off the text config."""
    cfg = llava.config.text_config
    heads = cfg.num_attention_heads
    gen = getattr(llava, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = eos if eos is not None else cfg.eos_token_id
    pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    return {
        C.T_MODEL_TYPE: cfg.model_type,
        C.T_HIDDEN: cfg.hidden_size,
        C.T_LAYERS: cfg.num_hidden_layers,
        C.T_HEADS: heads,
        C.T_KV_HEADS: getattr(cfg, "num_key_value_heads", None) or heads,
        C.T_HEAD_DIM: getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        C.T_VOCAB: cfg.vocab_size,
        C.T_EOS: eos if isinstance(eos, list) else [eos] if eos is not None else [],
        C.T_PAD: pad if pad is not None else cfg.pad_token_id,
        C.T_BOS: cfg.bos_token_id,
        C.T_MAX_POS: cfg.max_position_embeddings,
        C.T_DTYPE: "float32",
        C.T_LOGITS: C.LOGITS_LAST,  # both decoder routes: logits (batch_size, 1, vocab)
    }


def graphs_section(root: Path, plan: dict[str, str]) -> dict:
    """{graph path: {dtype, bytes}} for the graphs in bundle folder `root` (external data counted).

    `plan` maps each graph to its format (export.dtypes.PLANS[--dtype]).
    """
    from export.dtypes import graph_bytes

    return {g: {C.G_DTYPE: dtype, C.G_BYTES: graph_bytes(root / g)} for g, dtype in plan.items()}
