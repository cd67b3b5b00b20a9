"""optimum (of record) and torch.onnx dynamo decoder routes: same contract, same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.__main__ import cli
from export.decoder import export_decoder_optimum
from export.decoder_torch import export_decoder_torch
from export.load import load_llava
from export.text_graphs import empty_past
from runtime import contract as C
from runtime.bundle import load_manifest
from runtime.parity import DECODER_RTOL, rel_diff
from svdprune_onnx.text import causal_lm


def _io(sess: ort.InferenceSession) -> tuple[dict, dict]:
    return (
        {i.name: i.shape for i in sess.get_inputs()},
        {o.name: o.shape for o in sess.get_outputs()},
    )


def test_both_exporters_agree(tiny_siglip: Path, tmp_path: Path) -> None:
    lm = causal_lm(load_llava(tiny_siglip))  # qwen2 text model
    export_decoder_optimum(lm, tmp_path / "optimum.onnx")
    export_decoder_torch(lm, tmp_path / "torch.onnx")
    a, b = (
        ort.InferenceSession(str(tmp_path / f"{n}.onnx"), providers=["CPUExecutionProvider"])
        for n in ("optimum", "torch")
    )
    assert _io(a) == _io(b), "names and symbolic axes must be identical"
    assert _io(a)[1][C.LOGITS] == [C.AXIS_BATCH, C.LOGITS_POSITIONS, lm.config.vocab_size]
    cfg = lm.config
    rng = np.random.default_rng(0)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    feed = empty_past(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, head_dim)
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]], np.int64)
    feed |= {
        C.INPUTS_EMBEDS: rng.standard_normal((2, 5, cfg.hidden_size)).astype(np.float32),
        C.ATTENTION_MASK: mask,
        C.POSITION_IDS: np.clip(np.cumsum(mask, 1) - 1, 0, None),
    }
    names = [o.name for o in a.get_outputs()]
    outs_a, outs_b = a.run(names, feed), b.run(names, feed)
    assert outs_a[0].shape == (2, 1, cfg.vocab_size), "a prefill of 5 emits the last position"
    for x, y in zip(outs_a, outs_b, strict=True):
        assert rel_diff(x, y) <= DECODER_RTOL


def test_cli_torch_route(tiny_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert (
        cli(["-m", str(tiny_clip), "--k", "16", "--decoder-exporter", "torch", "-o", str(out)]) == 0
    )
    m = load_manifest(out)
    assert m[C.KEY_EXPORTER]["decoder_exporter"] == "torch"
    assert m[C.KEY_VALIDATION][C.VAL_DECODER_REL] <= DECODER_RTOL
