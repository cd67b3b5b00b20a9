"""The decoder emits the last position's logits only: (B, 1, V) for a prefill of S > 1, on both
export routes, equal to PyTorch's last position; decode steps (S = 1) are unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.decoder import export_decoder_optimum
from export.decoder_torch import export_decoder_torch
from export.load import load_llava
from export.text_graphs import empty_past
from runtime import contract as C
from runtime.parity import DECODER_RTOL, rel_diff
from svdprune_onnx.text import causal_lm

EXPORTERS = {"optimum": export_decoder_optimum, "torch": export_decoder_torch}


@pytest.fixture(scope="module")
def lm(tiny_clip: Path):
    return causal_lm(load_llava(tiny_clip))  # llama text model


@pytest.fixture(scope="module", params=sorted(EXPORTERS))
def decoder(request, lm, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(f"last-{request.param}") / "decoder.onnx"
    EXPORTERS[request.param](lm, path)
    return path


def test_declared_logits_shape(decoder: Path, lm) -> None:
    (out,) = [o for o in onnx.load(str(decoder)).graph.output if o.name == C.LOGITS]
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims == [C.AXIS_BATCH, C.LOGITS_POSITIONS, lm.config.vocab_size]


def test_prefill_emits_last_position(decoder: Path, lm) -> None:
    cfg = lm.config
    sess = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    batch, seq = 2, 7
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    mask = np.ones((batch, seq), np.int64)
    mask[1, :3] = 0  # left padding: the last position is real in every row
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    emb = lm.get_input_embeddings()(ids).detach()
    feed = empty_past(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, head_dim)
    feed |= {C.INPUTS_EMBEDS: emb.numpy(), C.ATTENTION_MASK: mask, C.POSITION_IDS: pos}
    logits, *present = sess.run(None, feed)
    assert logits.shape == (batch, 1, cfg.vocab_size)
    assert present[0].shape[2] == seq, "the KV cache still covers every prompt position"
    with torch.no_grad():
        ref = lm(
            inputs_embeds=emb,
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            use_cache=True,
        )
    assert rel_diff(logits, ref.logits[:, -1:].numpy()) <= DECODER_RTOL
    # one decode step on that cache: still (B, 1, V)
    step = {n: p for i in range(cfg.num_hidden_layers) for n, p in
            zip(C.past_names(i), present[2 * i : 2 * i + 2], strict=True)}  # fmt: skip
    step |= {
        C.INPUTS_EMBEDS: emb[:, -1:].numpy(),
        C.ATTENTION_MASK: np.concatenate([mask, np.ones((batch, 1), np.int64)], 1),
        C.POSITION_IDS: pos[:, -1:] + 1,
    }
    (logits,) = sess.run([C.LOGITS], step)
    assert logits.shape == (batch, 1, cfg.vocab_size)
