"""embed_tokens.onnx export, and ORT-vs-PyTorch parity for the embedding and decoder graphs."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.lean import Weights, capture, finalize
from export.progress import steps as tqdm_steps
from export.vision import ExportValidationError, cpu_session
from runtime import contract as C
from runtime.parity import DECODER_RTOL, rel_diff


class EmbedTokens(nn.Module):
    """input_ids (B, S) int64 -> inputs_embeds (B, S, H)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.embed = lm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def export_embed(
    lm: nn.Module, path: Path, opset: int = 18, weights: Weights | None = None
) -> None:
    """TorchScript export of the token embedding with dynamic batch and sequence axes; with
    `weights` (the lean export) the table is streamed in from the checkpoint after the trace."""
    axes = {C.AXIS_BATCH: 0, C.AXIS_SEQ: 1}
    dyn = {name: {i: a for a, i in axes.items()} for name in (C.INPUT_IDS, C.INPUTS_EMBEDS)}
    with (
        warnings.catch_warnings(),
        torch.no_grad(),
        capture(weights) if weights is not None else contextlib.nullcontext({}) as captured,
    ):
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
    if weights is not None:
        finalize(path, captured, weights, C.EMBED_ONNX)


def embed_refs(lm: nn.Module, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids (2, 7), PyTorch's embeddings of them): the reference embed_parity compares with."""
    vocab = lm.get_input_embeddings().num_embeddings
    ids = np.random.default_rng(seed).integers(0, vocab, size=(2, 7), dtype=np.int64)
    with torch.no_grad():
        return ids, lm.get_input_embeddings()(torch.from_numpy(ids)).numpy()


def embed_parity(path: Path, refs: tuple[np.ndarray, np.ndarray]) -> float:
    """Max |ORT - PyTorch| of inputs_embeds on random ids; a lookup, so it must be exact."""
    ids, ref = refs
    (got,) = cpu_session(path).run([C.INPUTS_EMBEDS], {C.INPUT_IDS: ids})
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


def decoder_refs(
    lm: nn.Module, embed: Callable | None = None, steps: int = 3, seed: int = 0
) -> list[tuple[dict, list]]:
    """Prefill from empty past + `steps` decode steps, batch 1 and 2 (left-padded), in PyTorch:
    [(step inputs, [last-position logits, *present]), ...] for decoder_parity.

    The inputs are the model's own token embeddings with BOS first, plus image-feature-like
    rows: real decoders put their massive activations on exactly such tokens, which random
    inputs never trigger. Each step's inputs do not depend on the outputs, so the references
    are computed first and the weights can be released before ONNX Runtime loads its copy.

    `embed(ids) -> (..., H)` looks the embeddings up (default: `lm`'s own table); the lean export
    passes the validated embed_tokens graph, so the table need not be in memory here.
    """

    cfg = lm.config
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    if embed is None:
        table = lm.get_input_embeddings().weight.detach().numpy()  # (V, H)
        embed = table.__getitem__
    bos = cfg.bos_token_id
    rng = np.random.default_rng(seed)
    # the table's scale from 256 rows: a lookup through a mapped graph pages in what it reads
    scale = float(embed(rng.integers(0, vocab, size=(1, 256))).std())
    out = []
    for batch in (1, 2):
        mask = np.ones((batch, 8), np.int64)
        mask[1:, :2] = 0  # left padding in the second row
        ids = rng.integers(0, vocab, size=(batch, 8))
        if bos is not None:  # BOS opens each row's real tokens
            ids[:, 0], ids[1:, 2] = bos, bos
        emb = np.array(embed(ids))  # (B, 8, H)
        # two "image" rows at the scale of the token embeddings
        emb[:, 4:6] = rng.standard_normal((batch, 2, hidden)) * scale
        out += reference_steps(lm, emb.astype(np.float32), mask, embed, rng, steps, compact)
    return out


def compact(mask: np.ndarray, n: int, step: int) -> np.ndarray:
    """(B, n) position ids of the last `n` tokens: 0.. over each row's real tokens."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -n:]


def reference_steps(
    lm: nn.Module,
    emb: np.ndarray,
    mask: np.ndarray,
    embed: Callable,
    rng: np.random.Generator,
    steps: int,
    positions: Callable[[np.ndarray, int, int], np.ndarray],
) -> list[tuple[dict, list]]:
    """One batch's prefill (`emb` (B, S, H), `mask` (B, S)) + `steps` decode steps of random
    tokens, in PyTorch: [(step inputs, [last-position logits, *present]), ...].
    `positions(mask so far, new tokens, step)` gives the step's position ids."""
    from transformers import DynamicCache

    batch, vocab, cache, out = emb.shape[0], lm.config.vocab_size, DynamicCache(), []
    for step in range(steps + 1):
        pos = positions(mask, emb.shape[1], step)
        feed = {C.INPUTS_EMBEDS: emb, C.ATTENTION_MASK: mask, C.POSITION_IDS: pos}
        with torch.no_grad():
            ref = lm(
                inputs_embeds=torch.from_numpy(emb),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos),
                past_key_values=cache,
                use_cache=True,
            )
        last = ref.logits[:, -C.LOGITS_POSITIONS :].numpy()  # (B, 1, V)
        out.append((feed | {"step": step}, [last, *cache_arrays(ref.past_key_values)]))
        emb = np.asarray(embed(rng.integers(0, vocab, size=(batch, 1))), np.float32)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return out


def decoder_parity(path: Path, refs: list[tuple[dict, list]], text: dict) -> dict[str, float]:
    """Run decoder_refs' steps in ONNX Runtime, each on its own KV cache; every output (logits,
    each present) is compared relative to its own scale; above DECODER_RTOL the export fails.
    Returns {rel, abs}: the worst of each. A graph whose logits are not the last position's
    (B, 1, V) fails on the shape."""
    n_layers = text[C.T_LAYERS]
    sess = cpu_session(path)
    out_names = [C.LOGITS] + [n for i in range(n_layers) for n in C.present_names(i)]
    worst = {"rel": 0.0, "abs": 0.0}
    feed: dict[str, np.ndarray] = {}
    for inputs, want in tqdm_steps(refs, "decoder parity"):
        step = inputs["step"]
        batch = len(inputs[C.INPUTS_EMBEDS])
        if step == 0:
            feed = empty_past(n_layers, batch, text[C.T_KV_HEADS], text[C.T_HEAD_DIM])
        feed |= {k: v for k, v in inputs.items() if k != "step"}
        got = sess.run(out_names, feed)
        for name, a, b in zip(out_names, got, want, strict=True):
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
    return worst
