"""decoder_model_merged.onnx via torch.export vs the PyTorch LM: prefill from an empty cache, then
three decode steps fed back from `present`, batch 1 and left-padded batch 2, llama/qwen2/mistral."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import decoder_torch
from export.decoder_torch import export_decoder_torch
from export.load import load_llava
from export.vision import FORBIDDEN_OPS
from runtime import contract as C
from svdprune_onnx.text import causal_lm
from svdprune_onnx.tiny import ensure_tiny_llava

ATOL = 1e-4
DECODE_STEPS = 3


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def exported(request, models_root: Path, tmp_path_factory):
    """(lm, path to decoder.onnx) per text family; mistral goes through the external-data path."""
    text = request.param
    lm = causal_lm(load_llava(ensure_tiny_llava(models_root, tower="clip", text=text)))
    path = tmp_path_factory.mktemp(f"dec-{text}") / "decoder.onnx"
    with pytest.MonkeyPatch.context() as mp:
        if text == "mistral":  # force external data on a tiny model: `decoder.onnx_data`
            mp.setattr(decoder_torch, "EXTERNAL_DATA_BYTES", 0)
        export_decoder_torch(lm, path)
    assert (path.parent / "decoder.onnx_data").exists() == (text == "mistral")
    return lm, path


def test_graph_contract(exported) -> None:
    lm, path = exported
    cfg = lm.config
    onnx.checker.check_model(str(path), full_check=True)  # by path: external data too
    model = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}.get("") == 18
    assert not {n.op_type for n in model.graph.node} & FORBIDDEN_OPS

    def dims(vi) -> list:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    b, s, p, t = C.AXIS_BATCH, C.AXIS_SEQ, C.AXIS_PAST, C.AXIS_TOTAL
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    layers = range(cfg.num_hidden_layers)
    want_in = [
        (C.INPUTS_EMBEDS, [b, s, cfg.hidden_size]),
        (C.ATTENTION_MASK, [b, t]),
        (C.POSITION_IDS, [b, s]),
        *((name, [b, kv, p, hd]) for i in layers for name in C.past_names(i)),
    ]
    want_out = [
        (C.LOGITS, [b, C.LOGITS_POSITIONS, cfg.vocab_size]),  # the last position only
        *((name, [b, kv, t, hd]) for i in layers for name in C.present_names(i)),
    ]
    assert [(vi.name, dims(vi)) for vi in model.graph.input] == want_in
    assert [(vi.name, dims(vi)) for vi in model.graph.output] == want_out
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    assert elem[C.ATTENTION_MASK] == elem[C.POSITION_IDS] == onnx.TensorProto.INT64


@pytest.mark.parametrize(("batch", "prompt", "pad"), [(1, 5, 0), (2, 6, 3)])
def test_prefill_and_decode_match_pytorch(exported, batch: int, prompt: int, pad: int) -> None:
    lm, path = exported
    cfg = lm.config
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(batch)
    total = prompt + DECODE_STEPS
    ids = torch.randint(5, cfg.vocab_size, (batch, total), generator=gen)
    full_mask = torch.ones(batch, total, dtype=torch.int64)
    full_mask[-1, :pad] = 0  # left padding on the last row (none for batch 1)
    hd = cfg.hidden_size // cfg.num_attention_heads
    empty = np.zeros((batch, cfg.num_key_value_heads, 0, hd), np.float32)  # past length 0
    past_names = [n for i in range(cfg.num_hidden_layers) for n in C.past_names(i)]
    past, cache = dict.fromkeys(past_names, empty), None
    for start, end in [(0, prompt), *((e - 1, e) for e in range(prompt + 1, total + 1))]:
        mask = full_mask[:, :end]
        embeds = lm.get_input_embeddings()(ids[:, start:end]).detach()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]
        with torch.no_grad():
            ref = lm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        cache = ref.past_key_values
        feeds = {C.INPUTS_EMBEDS: embeds.numpy(), C.ATTENTION_MASK: mask.numpy()}
        outs = sess.run(None, {**feeds, C.POSITION_IDS: positions.numpy(), **past})
        refs = [ref.logits[:, -1:]] + [
            t for layer in cache.layers for t in (layer.keys, layer.values)
        ]
        assert len(outs) == len(refs)
        for out, want in zip(outs, refs, strict=True):
            np.testing.assert_allclose(out, want.numpy(), atol=ATOL, rtol=0)
        past = dict(zip(past_names, outs[1:], strict=True))
