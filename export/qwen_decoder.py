"""Qwen2.5-VL's decoder_model_merged.onnx: the LLaVA decoder's contract with M-RoPE positions.

Same graph as export/decoder_torch.py (torch.onnx dynamo over FlatCacheDecoder, flat KV cache,
logits of the last position only, an empty past on the first step, no If/Loop) around Qwen's
language model + lm_head; only position_ids differs: three rows (temporal, height, width).

    inputs_embeds  (B, S, H) ------+
    attention_mask (B, P+S) -------+                          +--> logits (B, 1, V)
    position_ids   (3, B, S) ------+--> Qwen2_5_VLTextModel --+
                   (t, h, w rows)  |    rotary: row r drives  +--> present.{i}.key/value
    past_key_values.{i}.key/value -+    mrope_section[r] of        (B, kv, P+S, D)
                   (B, kv, P, D)        each head's pairs      lm_head on the last position

The rows come from runtime/mrope.py (text: three equal rows; decode: previous max + 1).
Axis names and the 3 are the contract's (C.MROPE_POSITION_AXES).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from export.decoder_torch import (
    TRACE_BATCH,
    TRACE_PAST,
    TRACE_SEQ,
    _dynamic_shapes,
    _io_spec,
    _trace_inputs,
    export_decoder_torch,
)
from export.lean import Weights
from export.text_graphs import reference_steps
from runtime import contract as C
from runtime.mrope import decode_positions, rope_index
from svdprune_onnx.vision import UnsupportedModelError

POSITIONS_ARG = 2  # position_ids' place in FlatCacheDecoder's arguments (embeds, mask, positions)
# qwen_decoder_refs' prompt: 3 text tokens, an image of merged grid 2 x 3 (patches (1, 4, 6)),
# 2 text tokens; IMAGE marks the image rows (their embeddings are random features).
IMAGE = -1
REF_GRID = (1, 4, 6)
REF_PROMPT = [0, 0, 0, *[IMAGE] * 6, 0, 0]


class QwenCausalLM(nn.Module):
    """Qwen2.5-VL's language model + lm_head (shared, not copied), called like a *ForCausalLM:
    what FlatCacheDecoder and the parity checks call. position_ids must be (3, B, S)."""

    def __init__(self, vlm: PreTrainedModel):
        super().__init__()
        text_cfg = getattr(vlm.config, "text_config", None)
        if getattr(text_cfg, "model_type", None) != "qwen2_5_vl_text":
            raise UnsupportedModelError(
                f"{type(vlm).__name__} is not a Qwen2.5-VL model: load the checkpoint with "
                "Qwen2_5_VLForConditionalGeneration (LLaVA: export.decoder_torch)"
            )
        self.model = vlm.model.language_model  # Qwen2_5_VLTextModel
        self.lm_head = vlm.lm_head
        self.config = text_cfg
        # Plain ONNX ops: eager attention (read at forward time, so setting it here suffices).
        self.config._attn_implementation = "eager"

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, H)
        attention_mask: torch.Tensor,  # (B, P+S) int64
        position_ids: torch.Tensor,  # (3, B, S) int64: t, h, w rows
        past_key_values=None,  # a Cache (DynamicCache) or None
        use_cache: bool = True,
        logits_to_keep: int = 0,  # 0: every position; n: the last n
    ) -> CausalLMOutputWithPast:
        if position_ids.ndim != 3 or position_ids.shape[0] != C.MROPE_ROWS:
            raise ValueError(
                f"position_ids has shape {tuple(position_ids.shape)}; Qwen2.5-VL needs "
                f"({C.MROPE_ROWS}, batch, seq): compute them with runtime.mrope.rope_index"
            )
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state[:, -logits_to_keep:]  # (B, 1, H) for logits_to_keep=1
        return CausalLMOutputWithPast(
            logits=self.lm_head(hidden), past_key_values=out.past_key_values
        )


def qwen_causal_lm(vlm: PreTrainedModel) -> QwenCausalLM:
    """The decoder half of a loaded Qwen2_5_VLForConditionalGeneration, in eval mode."""
    return QwenCausalLM(vlm).eval()


def qwen_io_spec(cfg) -> tuple[dict[str, list], dict[str, list]]:
    """decoder_torch's I/O shapes with position_ids (3, batch_size, sequence_length)."""
    inputs, outputs = _io_spec(cfg)
    inputs[C.POSITION_IDS] = list(C.MROPE_POSITION_AXES)  # same key: the input order is kept
    return inputs, outputs


def _qwen_trace_inputs(cfg, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """decoder_torch's dummies, positions as three different rows (t, h, w)."""
    args = list(_trace_inputs(cfg, dtype))
    b, s, p = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    rows = torch.arange(p, p + s) + torch.arange(C.MROPE_ROWS)[:, None]  # (3, S)
    args[POSITIONS_ARG] = rows[:, None, :].expand(C.MROPE_ROWS, b, s).clone()  # (3, B, S)
    return tuple(args)


def _qwen_dynamic_shapes(num_layers: int) -> tuple:
    """decoder_torch's dynamic axes, position_ids' batch and sequence moved to axes 1 and 2."""
    shapes = list(_dynamic_shapes(num_layers))
    embeds = shapes[0]  # {0: batch, 1: seq}: the same Dim objects
    shapes[POSITIONS_ARG] = {1: embeds[0], 2: embeds[1]}  # axis 0: the static 3
    return tuple(shapes)


def export_qwen_decoder(
    lm: PreTrainedModel | QwenCausalLM,
    path: Path,
    opset: int = 18,
    weights: Weights | None = None,
    deferred: bool = False,
) -> None:
    """Export Qwen2.5-VL's decoder (`lm`: a QwenCausalLM, or the VLM itself) at `path`.

    `weights` / `deferred` as export_decoder_torch (the lean export: `lm` holds stand-ins).
    Raises ExportValidationError when the graph has control flow or an axis came out wrong.
    """
    lm = lm if isinstance(lm, QwenCausalLM) else qwen_causal_lm(lm)
    cfg = lm.config
    family = (
        qwen_io_spec(cfg),
        _qwen_trace_inputs(cfg, lm.dtype),
        _qwen_dynamic_shapes(cfg.num_hidden_layers),
    )
    export_decoder_torch(lm, Path(path), opset, weights, deferred, family)


def qwen_decoder_refs(
    lm: QwenCausalLM, embed: Callable | None = None, steps: int = 3, seed: int = 0
) -> list[tuple[dict, list]]:
    """text_graphs.decoder_refs for Qwen: prefill + `steps` decode steps, batch 1 and 2 (the
    second left-padded by 2), position_ids (3, B, S) of a prompt with an image (runtime.mrope),
    in PyTorch: [(step inputs, [last-position logits, *present]), ...] for
    text_graphs.decoder_parity, unchanged. `embed(ids) -> (..., H)` as decoder_refs."""

    cfg = lm.config
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    if embed is None:
        embed = lm.get_input_embeddings().weight.detach().numpy().__getitem__  # (V, H) table
    rng = np.random.default_rng(seed)
    scale = float(embed(rng.integers(0, vocab, size=(1, 256))).std())
    out = []
    for batch in (1, 2):
        ids = np.array([REF_PROMPT] * batch)  # (B, S)
        mask = np.ones(ids.shape, np.int64)
        mask[1:, :2] = 0  # left padding in the second row
        pos, deltas = rope_index(ids, IMAGE, [REF_GRID] * batch, attention_mask=mask)  # (3, B, S)
        image = ids == IMAGE
        emb = np.array(embed(rng.integers(0, vocab, size=ids.shape)))  # (B, S, H)
        emb[image] = rng.standard_normal((int(image.sum()), hidden)) * scale

        def positions(mask: np.ndarray, n: int, step: int, pos=pos, deltas=deltas) -> np.ndarray:
            # prefill: the rope index; then (3, B, 1) = previous max + 1 on all rows
            return pos if step == 0 else decode_positions(deltas, mask.shape[1] - n)

        out += reference_steps(lm, emb.astype(np.float32), mask, embed, rng, steps, positions)
    return out
