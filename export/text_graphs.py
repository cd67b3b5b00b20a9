"""embed_tokens.onnx export, and ORT-vs-PyTorch parity for the embedding and decoder graphs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.vision import ExportValidationError
from runtime import contract as C
from runtime.parity import DECODER_RTOL, rel_diff


class EmbedTokens(nn.Module):
    """input_ids (B, S) int64 -> inputs_embeds (B, S, H)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.embed = lm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def export_embed(lm: nn.Module, path: Path, opset: int = 18) -> None:
    """TorchScript export of the token embedding with dynamic batch and sequence axes."""
    axes = {C.AXIS_BATCH: 0, C.AXIS_SEQ: 1}
    dyn = {name: {i: a for a, i in axes.items()} for name in (C.INPUT_IDS, C.INPUTS_EMBEDS)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            EmbedTokens(lm).eval(),
            (torch.zeros(2, 3, dtype=torch.int64),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[C.INPUT_IDS],
            output_names=[C.INPUTS_EMBEDS],
            dynamic_axes=dyn,
        )


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def embed_parity(lm: nn.Module, path: Path, seed: int = 0) -> float:
    """Max |ORT - PyTorch| of inputs_embeds on random ids; a lookup, so it must be exact."""
    vocab = lm.get_input_embeddings().num_embeddings
    ids = np.random.default_rng(seed).integers(0, vocab, size=(2, 7), dtype=np.int64)
    (got,) = _session(path).run([C.INPUTS_EMBEDS], {C.INPUT_IDS: ids})
    with torch.no_grad():
        ref = lm.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    diff = float(np.abs(got - ref).max())
    if diff != 0.0:
        raise ExportValidationError(f"embed_tokens differs from PyTorch by {diff:.3g}")
    return diff


def cache_arrays(cache) -> list[np.ndarray]:
    """Flat [k0, v0, k1, v1, ...] numpy arrays from a transformers Cache (4.5x layouts)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [t.detach().numpy() for pair in pairs for t in pair]


def empty_past(n_layers: int, batch: int, kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
    """The first step's past: every layer's key/value with past length 0."""
    empty = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    return {name: empty for i in range(n_layers) for name in C.past_names(i)}


def decoder_parity(lm: nn.Module, path: Path, steps: int = 3, seed: int = 0) -> dict[str, float]:
    """Prefill from empty past + `steps` decode steps, batch 1 and 2 (left-padded), ORT vs torch.

    The inputs are the model's own token embeddings with BOS first, plus image-feature-like
    rows: real decoders put their massive activations on exactly such tokens, which random
    inputs never trigger. Every output (logits, each present) is compared relative to its own
    scale; above DECODER_RTOL the export fails. Returns {rel, abs}: the worst of each.
    The graph's logits are the last position's (B, 1, V), compared with PyTorch's last
    position; a graph whose logits have another shape fails.
    """
    from transformers import DynamicCache

    cfg = lm.config
    n_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    table = lm.get_input_embeddings().weight.detach().numpy()  # (V, H)
    bos = cfg.bos_token_id
    sess = _session(path)
    out_names = [C.LOGITS] + [n for i in range(n_layers) for n in C.present_names(i)]
    rng = np.random.default_rng(seed)
    worst = {"rel": 0.0, "abs": 0.0}
    for batch in (1, 2):
        mask = np.ones((batch, 8), np.int64)
        mask[1:, :2] = 0  # left padding in the second row
        ids = rng.integers(0, table.shape[0], size=(batch, 8))
        if bos is not None:  # BOS opens each row's real tokens
            ids[:, 0], ids[1:, 2] = bos, bos
        emb = table[ids]  # (B, 8, H)
        # two "image" rows at the scale of the token embeddings
        emb[:, 4:6] = rng.standard_normal((batch, 2, hidden)) * table.std()
        emb = emb.astype(np.float32)
        feed = empty_past(n_layers, batch, kv_heads, head_dim)
        cache = DynamicCache()
        for step in range(steps + 1):
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -emb.shape[1] :]
            feed |= {C.INPUTS_EMBEDS: emb, C.ATTENTION_MASK: mask, C.POSITION_IDS: pos}
            got = sess.run(out_names, feed)
            with torch.no_grad():
                ref = lm(
                    inputs_embeds=torch.from_numpy(emb),
                    attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos),
                    past_key_values=cache,
                    use_cache=True,
                )
            last = ref.logits[:, -C.LOGITS_POSITIONS :].numpy()  # (B, 1, V)
            refs = [last, *cache_arrays(ref.past_key_values)]
            for name, a, b in zip(out_names, got, refs, strict=True):
                if a.shape != b.shape:
                    raise ExportValidationError(
                        f"decoder {name} has shape {a.shape}, expected {b.shape} at step {step}"
                    )
                rel = rel_diff(a, b)
                worst["rel"] = max(worst["rel"], rel)
                worst["abs"] = max(worst["abs"], float(np.abs(a - b).max()))
                if not rel <= DECODER_RTOL:
                    raise ExportValidationError(
                        f"decoder {name} differs from PyTorch by {rel:.3g} of its scale "
                        f"(> {DECODER_RTOL}) at step {step}, batch {batch}"
                    )
            feed |= {
                p: g
                for i in range(n_layers)
                for p, g in zip(C.past_names(i), got[1 + 2 * i : 3 + 2 * i], strict=True)
            }
            emb = table[rng.integers(0, table.shape[0], size=(batch, 1))].astype(np.float32)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return worst
