"""The language decoder with KV cache, taking inputs_embeds, exported with optimum (of record).

    inputs_embeds (B,S,H) ┐
    attention_mask (B,P+S)├─► *ForCausalLM (LLaVA's text model + lm_head) ─► logits (B,1,V)
    position_ids (B,S)    │                                                 present.{i}.key/value
    past_key_values.{i}.* ┘  (B,kv,P,hd); P = 0 on the first step          (B,kv,P+S,hd)

lm_head runs on the last position only (logits_to_keep=1): a prefill of S tokens computes one
row of logits per sequence, not S (C.LOGITS_POSITIONS).

One graph, no If: optimum exports the with-past model whose past may be empty, which is what
transformers.js and ONNX Runtime GenAI call decoder_model_merged.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import onnx
import torch
from optimum.exporters.onnx import onnx_export_from_model
from optimum.exporters.onnx.config import TextDecoderWithPositionIdsOnnxConfig
from optimum.exporters.onnx.model_patcher import ModelPatcher
from optimum.utils import (
    DummyTextInputGenerator,
    MistralDummyPastKeyValuesGenerator,
    NormalizedTextConfigWithGQA,
)

from export.bundle import data_file
from export.lean import Weights, capture, finalize
from runtime import contract as C

# Dummy shapes for tracing: all >= 2 so no axis gets specialised to a constant.
DUMMY_BATCH, DUMMY_SEQ, DUMMY_PAST = 2, 4, 3


class InputsEmbedsDecoderOnnxConfig(TextDecoderWithPositionIdsOnnxConfig):
    """optimum's decoder config (Llama, Qwen2, Mistral: GQA aware) fed inputs_embeds."""

    NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA
    DUMMY_INPUT_GENERATOR_CLASSES = (DummyTextInputGenerator, MistralDummyPastKeyValuesGenerator)
    DUMMY_PKV_GENERATOR_CLASS = MistralDummyPastKeyValuesGenerator

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        # Same inputs as the text decoder, with input_ids swapped for inputs_embeds in place.
        renamed = OrderedDict()
        for name, axes in super().inputs.items():
            if name == C.INPUT_IDS:
                renamed[C.INPUTS_EMBEDS] = {0: C.AXIS_BATCH, 1: C.AXIS_SEQ}
            else:
                renamed[name] = axes
        return renamed

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        # logits (batch_size, 1, V): axis 1 is the literal C.LOGITS_POSITIONS, not sequence_length.
        outs = super().outputs
        outs[C.LOGITS] = {0: C.AXIS_BATCH}
        return outs

    def patch_model_for_export(self, model, model_kwargs: dict | None = None) -> ModelPatcher:
        # optimum sets logits_to_keep=0 (every position); ours overrides it: the last one only.
        kwargs = {**(model_kwargs or {}), "logits_to_keep": C.LOGITS_POSITIONS}
        return super().patch_model_for_export(model, model_kwargs=kwargs)

    def static_output_axes(self, model_path: Path) -> None:
        """What optimum's fix_dynamic_axes does, without running the graph (the lean export's
        graph has no weights yet): every output axis the tracer left symbolic although this
        config does not name it dynamic gets the contract's static size (logits' axis 1 = 1)."""
        from export.decoder_torch import _io_spec

        allowed = {
            a for axes in (*self.inputs.values(), *self.outputs.values()) for a in axes.values()
        }
        _, want = _io_spec(self._config)
        model = onnx.load(str(model_path), load_external_data=False)
        for out in model.graph.output:
            for dim, size in zip(out.type.tensor_type.shape.dim, want[out.name], strict=True):
                if dim.HasField("dim_param") and dim.dim_param not in allowed:
                    if not isinstance(size, int):
                        raise ValueError(f"{out.name}: axis {dim.dim_param} is not in the contract")
                    dim.dim_value = size
        onnx.save(model, str(model_path))

    def generate_dummy_inputs(self, framework: str = "pt", **kwargs) -> dict:
        """inputs_embeds (B,S,H), a full mask over P+S, positions P..P+S-1, a past of P."""
        cfg = self._normalized_config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = (DUMMY_BATCH, cfg.num_key_value_heads, DUMMY_PAST, head_dim)
        total = DUMMY_PAST + DUMMY_SEQ
        dummy = {
            C.INPUTS_EMBEDS: torch.randn(DUMMY_BATCH, DUMMY_SEQ, cfg.hidden_size),
            C.ATTENTION_MASK: torch.ones(DUMMY_BATCH, total, dtype=torch.int64),
            C.POSITION_IDS: torch.arange(DUMMY_PAST, total).expand(DUMMY_BATCH, -1).contiguous(),
            C.PAST_PREFIX: [(torch.randn(kv), torch.randn(kv)) for _ in range(cfg.num_layers)],
        }
        if framework == "np":  # optimum's fix_dynamic_axes runs the graph once to pin the
            # logits' position axis (TorchScript names it) to its static C.LOGITS_POSITIONS
            dummy = {
                k: [(a.numpy(), b.numpy()) for a, b in v] if k == C.PAST_PREFIX else v.numpy()
                for k, v in dummy.items()
            }
        return dummy


def _move_onnx(src: Path, dst: Path) -> None:
    """Move a graph and its external data (if any) to `dst`, renaming the data file to match.

    Only the tensor records are rewritten (weights are not loaded), so this costs no memory.
    """
    model = onnx.load(str(src), load_external_data=False)
    data_name = data_file(dst).name
    moved = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                moved.add(entry.value)
                entry.value = data_name
    if len(moved) > 1:
        raise RuntimeError(f"expected one external data file, optimum wrote {sorted(moved)}")
    for name in moved:
        shutil.move(str(src.parent / name), str(dst.parent / data_name))
    onnx.save(model, str(dst))


def export_decoder_optimum(
    lm: torch.nn.Module,
    path: Path,
    opset: int = 18,
    weights: Weights | None = None,
    deferred: bool = False,
) -> None:
    """Export `lm` (see svdprune_onnx.text.causal_lm) to `path` with optimum-onnx.

    With `weights` (the lean export) `lm` holds stand-ins: optimum traces them with no weights
    written, and finalize() streams the real ones in from the checkpoint (`deferred`: leaves
    them for the dtype pass to read, see export.lean.finalize).
    """
    cfg = InputsEmbedsDecoderOnnxConfig(
        lm.config, task="text-generation", use_past=True, use_past_in_inputs=True
    )
    if weights is not None:  # optimum's own fix runs the graph, which has no weights yet
        cfg.fix_dynamic_axes = lambda model_path, **_: cfg.static_output_axes(model_path)
    with (
        tempfile.TemporaryDirectory(dir=path.parent) as tmp,
        warnings.catch_warnings(),
        capture(weights) if weights is not None else contextlib.nullcontext({}) as captured,
    ):
        warnings.simplefilter("ignore")
        # Our own validation (export.text_parity) is stricter than optimum's; skip theirs.
        onnx_export_from_model(
            lm,
            tmp,
            task="text-generation-with-past",
            custom_onnx_configs={"model": cfg},
            opset=opset,
            do_validation=False,
            no_post_process=True,
        )
        _move_onnx(Path(tmp) / "model.onnx", path)
    if weights is not None:
        finalize(path, captured, weights, C.DECODER_ONNX, deferred)
