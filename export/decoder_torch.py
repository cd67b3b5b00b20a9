"""decoder_model_merged.onnx via torch.export (`--decoder-exporter torch`), not optimum.

The causal LM is wrapped so the KV cache crosses the graph boundary as plain tensors:

    inputs_embeds  (B, S, H) ---+
    attention_mask (B, P+S) ----+                  +--> logits (B, 1, V): last position only
    position_ids   (B, S) ------+--> *ForCausalLM -+
                                |    (eager attn)  +--> present.{i}.key/value (B, kv, P+S, D)
    past_key_values.{i}.key  ---+         ^
    past_key_values.{i}.value --+--> DynamicCache (one DynamicLayer per layer; P may be 0)

One graph serves prefill (P = 0) and decode (S = 1) with no If node: an empty past is a length-0
tensor, and the cache's Concat passes it through.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn
from torch.export import Dim
from transformers import DynamicCache, PreTrainedModel

from export.bundle import EXTERNAL_DATA_BYTES
from export.lean import Weights
from export.lean_ir import defer, export_program, save_ir
from export.vision import FORBIDDEN_OPS, ExportValidationError
from runtime import contract as C

# Trace sizes: all >= 2 (torch.export specialises 0 and 1) and pairwise different, so no axis is
# unified with another by accident. Runtime sizes 0 (past) and 1 (batch, sequence) still work.
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 3, 4, 5


class FlatCacheDecoder(nn.Module):
    """The causal LM with its KV cache as flat tensors: k0, v0, k1, v1, ... in and out."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        self.num_layers = lm.config.num_hidden_layers

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, H) float
        attention_mask: torch.Tensor,  # (B, P+S) int64, 0 = padding
        position_ids: torch.Tensor,  # (B, S) int64
        *past: torch.Tensor,  # 2 * layers tensors, each (B, kv, P, D)
    ) -> tuple[torch.Tensor, ...]:
        if len(past) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past tensors, got {len(past)}")
        # No config on purpose: DynamicCache(config=...) gives sliding-window layers (Mistral)
        # that crop with Python-side counters; the sliding mask alone gives the same attention.
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)  # cat onto an empty layer: a no-op
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=C.LOGITS_POSITIONS,  # lm_head on the last position: (B, 1, V)
        )
        # Each layer now holds cat(past, new) along the sequence axis: (B, kv, P+S, D).
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)  # logits (B, 1, V)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _io_spec(cfg) -> tuple[dict[str, list], dict[str, list]]:
    """Expected input and output shapes, contract axis names for the dynamic axes."""
    head_dim = _head_dim(cfg)
    past_shape = [C.AXIS_BATCH, cfg.num_key_value_heads, C.AXIS_PAST, head_dim]
    present_shape = [C.AXIS_BATCH, cfg.num_key_value_heads, C.AXIS_TOTAL, head_dim]
    layers = range(cfg.num_hidden_layers)
    inputs = {
        C.INPUTS_EMBEDS: [C.AXIS_BATCH, C.AXIS_SEQ, cfg.hidden_size],
        C.ATTENTION_MASK: [C.AXIS_BATCH, C.AXIS_TOTAL],
        C.POSITION_IDS: [C.AXIS_BATCH, C.AXIS_SEQ],
        **{name: past_shape for i in layers for name in C.past_names(i)},
    }
    outputs = {
        C.LOGITS: [C.AXIS_BATCH, C.LOGITS_POSITIONS, cfg.vocab_size],
        **{name: present_shape for i in layers for name in C.present_names(i)},
    }
    return inputs, outputs


def _trace_inputs(cfg, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Dummy (embeds, mask, positions, *past) at the trace sizes."""
    head_dim = _head_dim(cfg)
    b, s, p, n = TRACE_BATCH, TRACE_SEQ, TRACE_PAST, 2 * cfg.num_hidden_layers
    return (
        torch.zeros(b, s, cfg.hidden_size, dtype=dtype),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.arange(p, p + s).expand(b, s).clone(),
        # Distinct tensors: one object passed twice could be treated as one aliased input.
        *(torch.zeros(b, cfg.num_key_value_heads, p, head_dim, dtype=dtype) for _ in range(n)),
    )


def _dynamic_shapes(num_layers: int) -> tuple:
    # Named dims fail loudly if torch.export specialises them. The mask length is left to
    # torch (Dim.DYNAMIC): the model only gathers from it, so torch never learns it is P+S.
    batch, seq, past = Dim(C.AXIS_BATCH), Dim(C.AXIS_SEQ), Dim(C.AXIS_PAST)
    kv = {0: batch, 2: past}
    # *past arrives as one tuple argument, so its specs nest in one tuple too.
    return (
        {0: batch, 1: seq},
        {0: batch, 1: Dim.DYNAMIC},
        {0: batch, 1: seq},
        (kv,) * (2 * num_layers),
    )


def _name_axes(program: torch.onnx.ONNXProgram, cfg, spec: tuple | None = None) -> None:
    """Rename torch's axes (s0, s53, 'a + b', ...) to the contract's, checking every I/O shape
    against `spec` ((inputs, outputs) as _io_spec returns them; default: _io_spec(cfg))."""
    inputs, outputs = spec or _io_spec(cfg)
    graph = program.model.graph
    values = {v.name: v for v in [*graph.inputs, *graph.outputs]}
    if list(values) != [*inputs, *outputs]:
        raise ExportValidationError(f"decoder I/O {list(values)} != {[*inputs, *outputs]}")
    mapping: dict[str, str] = {}
    for name, want in {**inputs, **outputs}.items():
        got = list(values[name].shape)
        for axis, (g, w) in enumerate(zip(got, want, strict=True)):
            ok = g == w if isinstance(w, int) else isinstance(g, ir.SymbolicDim) and g.value
            if not ok:  # a static axis came out dynamic, or a dynamic one was specialised
                raise ExportValidationError(f"{name} axis {axis} is {g}, expected {w}")
            if isinstance(w, str) and g.value != w:
                mapping[g.value] = w
    program.rename_axes(mapping)  # inner value shapes too, so the graph stays consistent
    for name, want in {**inputs, **outputs}.items():  # exact strings, however torch spelled sums
        values[name].shape = ir.Shape(want)


def _check_no_control_flow(model: ir.Model) -> None:
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    ops |= {n.op_type for f in model.functions.values() for n in f}
    if bad := sorted(ops & FORBIDDEN_OPS):
        raise ExportValidationError(f"decoder graph contains control flow {bad}; cannot ship it")


def export_decoder_torch(
    lm: PreTrainedModel,
    path: Path,
    opset: int = 18,
    weights: Weights | None = None,
    deferred: bool = False,
    family: tuple | None = None,
) -> None:
    """Export `lm` (a *ForCausalLM, eager attention) as the merged decoder graph at `path`.

    With `weights` (the lean export) `lm` holds stand-ins and each weight is read from the
    checkpoint as it is saved (export/lean_ir.py); past lean.INLINE_BYTES of weights they go to
    `<path.name>_data` beside it (without: past ~2 GB); `deferred`: not written at all (see
    export.lean.finalize). `family` = (io spec, trace inputs, dynamic shapes) where they differ
    from LLaVA's (Qwen2.5-VL's 3-row positions, export/qwen_decoder.py). Raises
    ExportValidationError when the graph has control flow or a dynamic axis came out static.
    """
    path = Path(path)
    cfg = lm.config
    spec, args, dynamic = family or (
        _io_spec(cfg),
        _trace_inputs(cfg, lm.dtype),
        _dynamic_shapes(cfg.num_hidden_layers),
    )
    inputs, outputs = spec
    program = export_program(
        FlatCacheDecoder(lm).eval(),
        args,
        weights,
        opset_version=opset,
        dynamic_shapes=dynamic,
        input_names=list(inputs),
        output_names=list(outputs),
    )
    _name_axes(program, cfg, spec)
    model = program.model
    _check_no_control_flow(model)
    if deferred:
        defer(model, weights, C.DECODER_ONNX)
    # Streams tensor by tensor (torch parameters or lazy checkpoint reads): no second copy.
    save_ir(model, path, EXTERNAL_DATA_BYTES if weights is None else None)
