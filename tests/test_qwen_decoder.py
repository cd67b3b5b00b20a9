"""Qwen2.5-VL's decoder_model_merged.onnx (export/qwen_decoder.py) on the tiny checkpoint: the
contract with 3-row position_ids, parity with the PyTorch language model + lm_head over a prefill
with an image's M-RoPE pattern and 3 decode steps, and greedy tokens equal to transformers'
generate (pixels through its own vision path) from a numpy loop over the graph's KV cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration

from export.qwen_decoder import (
    QwenCausalLM,
    export_qwen_decoder,
    qwen_causal_lm,
    qwen_decoder_refs,
)
from export.text_graphs import decoder_parity, empty_past
from export.vision import FORBIDDEN_OPS
from runtime import contract as C
from runtime.mrope import decode_positions, rope_index
from runtime.parity import rel_diff
from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl

RTOL = 1e-5  # of each output's scale (max |PyTorch|)
DECODE_STEPS = 3
NEW_TOKENS = 8
GRIDS = [(1, 4, 6), (1, 6, 8)]  # patches (t, h, w): merged 2 x 3 and 3 x 4 = 6 and 12 tokens


@pytest.fixture(scope="module")
def vlm(models_root: Path) -> Qwen2_5_VLForConditionalGeneration:
    path = ensure_tiny_qwen25vl(models_root)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, local_files_only=True, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def session(vlm, tmp_path_factory) -> tuple[ort.InferenceSession, Path]:
    path = tmp_path_factory.mktemp("qwen-dec") / "decoder.onnx"
    export_qwen_decoder(qwen_causal_lm(vlm), path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_graph_contract(vlm, session) -> None:
    _, path = session
    cfg = vlm.config.text_config
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}.get("") == 18
    assert not {n.op_type for n in model.graph.node} & FORBIDDEN_OPS
    b, s, p, t = C.AXIS_BATCH, C.AXIS_SEQ, C.AXIS_PAST, C.AXIS_TOTAL
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    layers = range(cfg.num_hidden_layers)
    want_in = [
        (C.INPUTS_EMBEDS, [b, s, cfg.hidden_size]),
        (C.ATTENTION_MASK, [b, t]),
        (C.POSITION_IDS, [3, b, s]),  # the M-RoPE rows: the only change from the LLaVA graph
        *((name, [b, kv, p, hd]) for i in layers for name in C.past_names(i)),
    ]
    want_out = [
        (C.LOGITS, [b, C.LOGITS_POSITIONS, cfg.vocab_size]),
        *((name, [b, kv, t, hd]) for i in layers for name in C.present_names(i)),
    ]
    assert [(vi.name, _dims(vi)) for vi in model.graph.input] == want_in
    assert [(vi.name, _dims(vi)) for vi in model.graph.output] == want_out
    assert list(C.MROPE_POSITION_AXES) == want_in[2][1]
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    assert elem[C.ATTENTION_MASK] == elem[C.POSITION_IDS] == onnx.TensorProto.INT64


def _image_prompt(cfg, rng, before: int, grid, after: int) -> list[int]:
    n = grid[0] * grid[1] * grid[2] // cfg.vision_config.spatial_merge_size**2
    text = [int(t) for t in rng.integers(0, 990, before + after)]
    image = [cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id]
    return [*text[:before], *image, *text[before:]]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    s = max(map(len, rows))
    ids = np.array([[pad] * (s - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (s - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


def _positions(cfg, ids, mask, grids):
    merge = cfg.vision_config.spatial_merge_size
    return rope_index(ids, cfg.image_token_id, grids, merge_size=merge, attention_mask=mask)


@pytest.mark.parametrize("batch", [1, 2])
def test_prefill_and_decode_match_pytorch(vlm, session, batch: int) -> None:
    """model.language_model + lm_head in PyTorch vs the graph, on the same (3, B, S) positions."""
    sess, _ = session
    cfg, text = vlm.config, vlm.config.text_config
    rng = np.random.default_rng(batch)
    grids = GRIDS[:batch]
    ids, mask = _left_pad(
        [_image_prompt(cfg, rng, 3 + 4 * i, g, 4) for i, g in enumerate(grids)], 0
    )
    assert batch == 1 or (mask == 0).any()
    pos, deltas = _positions(cfg, ids, mask, grids)
    assert (pos[0] != pos[1]).any() and (pos[1] != pos[2]).any()  # a real image pattern
    table = vlm.model.language_model.embed_tokens
    emb = table(torch.from_numpy(ids)).detach()
    image = torch.from_numpy(ids == cfg.image_token_id)
    emb[image] = torch.randn(int(image.sum()), text.hidden_size) * emb.std()  # "features"
    head_dim = text.hidden_size // text.num_attention_heads
    past = empty_past(text.num_hidden_layers, batch, text.num_key_value_heads, head_dim)
    cache = DynamicCache()
    for step in range(DECODE_STEPS + 1):
        with torch.no_grad():
            out = vlm.model.language_model(
                inputs_embeds=emb,
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos),
                past_key_values=cache,
                use_cache=True,
            )
            logits = vlm.lm_head(out.last_hidden_state[:, -1:])
        want = [logits, *(t for layer in cache.layers for t in (layer.keys, layer.values))]
        feed = {C.INPUTS_EMBEDS: emb.numpy(), C.ATTENTION_MASK: mask, C.POSITION_IDS: pos}
        got = sess.run(None, {**feed, **past})
        assert len(got) == len(want)
        for name, a, b in zip([o.name for o in sess.get_outputs()], got, want, strict=True):
            assert rel_diff(a, b.numpy()) <= RTOL, f"{name} at step {step}"
        past = dict(zip(past, got[1:], strict=True))
        emb = table(torch.from_numpy(rng.integers(0, 990, (batch, 1)))).detach()
        pos = decode_positions(deltas, mask.shape[1])  # (3, B, 1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


def test_refs_for_the_export_check(vlm, session) -> None:
    """qwen_decoder_refs + text_graphs.decoder_parity: the export CLI's check for this graph."""
    _, path = session
    text = vlm.config.text_config
    refs = qwen_decoder_refs(qwen_causal_lm(vlm))
    assert refs[0][0][C.POSITION_IDS].shape == (3, 1, 11)
    facts = {
        C.T_LAYERS: text.num_hidden_layers,
        C.T_KV_HEADS: text.num_key_value_heads,
        C.T_HEAD_DIM: text.hidden_size // text.num_attention_heads,
    }
    assert decoder_parity(path, refs, facts)["rel"] <= RTOL


def _greedy_onnx(sess, vlm, emb: np.ndarray, mask, pos, deltas) -> tuple[np.ndarray, list]:
    """Greedy tokens (B, NEW_TOKENS) and each step's logits (B, V) from the graph, its KV cache
    fed back as numpy arrays."""
    text = vlm.config.text_config
    table = vlm.model.language_model.embed_tokens.weight.detach().numpy()  # (V, H)
    head_dim = text.hidden_size // text.num_attention_heads
    past = empty_past(text.num_hidden_layers, len(emb), text.num_key_value_heads, head_dim)
    tokens, steps = [], []
    for _ in range(NEW_TOKENS):
        feed = {C.INPUTS_EMBEDS: emb, C.ATTENTION_MASK: mask, C.POSITION_IDS: pos}
        logits, *present = sess.run(None, {**feed, **past})
        steps.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(-1))
        past = dict(zip(past, present, strict=True))
        emb = table[tokens[-1]][:, None]  # (B, 1, H)
        pos = decode_positions(deltas, mask.shape[1])
        mask = np.concatenate([mask, np.ones((len(emb), 1), np.int64)], axis=1)
    return np.stack(tokens, axis=1), steps


def _generate(vlm, ids, mask, **kw):
    with torch.no_grad():
        out = vlm.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,  # no early stop: every step compared
            return_dict_in_generate=True,
            output_logits=True,
            **kw,
        )
    assert out.sequences.shape[1] == ids.shape[1] + NEW_TOKENS
    return out.sequences[:, ids.shape[1] :].numpy(), [s.numpy() for s in out.logits]


def _same_generation(got, want) -> None:
    (got_tokens, got_logits), (want_tokens, want_logits) = got, want
    np.testing.assert_array_equal(got_tokens, want_tokens)
    for step, (a, b) in enumerate(zip(got_logits, want_logits, strict=True)):
        assert rel_diff(a, b) <= 1e-4, f"logits at step {step}"


def test_greedy_generation_matches_transformers_with_images(vlm, session) -> None:
    """Pixels through transformers' vision path in generate; the graph gets the same image
    embeddings scattered into the prompt and runtime.mrope's positions."""
    sess, _ = session
    cfg = vlm.config
    rng = np.random.default_rng(7)
    ids, mask = _left_pad(
        [_image_prompt(cfg, rng, 3, GRIDS[0], 5), _image_prompt(cfg, rng, 2, GRIDS[1], 4)],
        vlm.generation_config.pad_token_id,
    )
    grids = torch.tensor(GRIDS)
    patches = int(grids.prod(-1).sum())
    vc = cfg.vision_config
    pixels = torch.from_numpy(
        rng.standard_normal((patches, 3 * vc.temporal_patch_size * vc.patch_size**2))
    ).float()
    want = _generate(vlm, ids, mask, pixel_values=pixels, image_grid_thw=grids)

    with torch.no_grad():
        features = torch.cat(vlm.model.get_image_features(pixels, grids)).numpy()  # (18, H)
    emb = vlm.model.language_model.embed_tokens.weight.detach().numpy()[ids]  # (B, S, H)
    emb[ids == cfg.image_token_id] = features  # row-major: images in prompt order
    pos, deltas = _positions(cfg, ids, mask, GRIDS)
    _same_generation(_greedy_onnx(sess, vlm, emb, mask, pos, deltas), want)


def test_greedy_generation_matches_transformers_text_only(vlm, session) -> None:
    sess, _ = session
    rng = np.random.default_rng(8)
    rows = [[int(t) for t in rng.integers(0, 990, n)] for n in (9, 5)]
    ids, mask = _left_pad(rows, vlm.generation_config.pad_token_id)
    want = _generate(vlm, ids, mask)
    emb = vlm.model.language_model.embed_tokens.weight.detach().numpy()[ids]
    pos, deltas = rope_index(ids, vlm.config.image_token_id, attention_mask=mask)
    _same_generation(_greedy_onnx(sess, vlm, emb, mask, pos, deltas), want)


def test_refusals() -> None:
    llava_like = SimpleNamespace(
        config=SimpleNamespace(text_config=SimpleNamespace(model_type="llama"))
    )
    with pytest.raises(ValueError, match="Qwen2_5_VLForConditionalGeneration"):
        QwenCausalLM(llava_like)


def test_two_row_positions_refused(vlm) -> None:
    lm = qwen_causal_lm(vlm)
    emb = torch.zeros(1, 2, vlm.config.text_config.hidden_size)
    with pytest.raises(ValueError, match=r"runtime\.mrope\.rope_index"):
        lm(emb, torch.ones(1, 2, dtype=torch.int64), torch.arange(2)[None])
