"""A stateful generator over a loaded bundle, in the manner of ONNX Runtime GenAI.

    gen = Generator(pipe, sampling, batch=B)
    gen.append_tokens(prompts, image=(features, kept))   # prefill: any number of new positions
    while not gen.is_done():
        tokens = gen.generate_next_token()                # (B,) one decoder step + pick
    gen.rewind(n)                                         # drop the last n tokens of the sequence
    gen.append_tokens([[...next turn...]])                # prefill on top of the cache

The sequence is a (B, L) grid of token ids, left-padded: `mask` marks real tokens, `positions`
(R, B, L) holds every column's position ids (LLaVA R = 1: compact, or the kept image tokens at
their original slots; Qwen2.5-VL R = 3: the M-RoPE rows t, h, w).
The first `computed` columns are in the KV cache; the rest (at most the last generated token, or
what a rewind re-exposes) are fed by the next decoder run. The KV cache never leaves the
decoder's device: presents come back as OrtValues through IOBinding and are bound as the next
run's past (on CPU the same code path runs on host memory).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from runtime import contract as C

if TYPE_CHECKING:
    from runtime.generate import Pipeline, Sampling


def scatter_features(
    embeds: np.ndarray,
    ids: np.ndarray,
    lo: int,
    features: np.ndarray | None,
    image_id,
    media: np.ndarray | None = None,
) -> np.ndarray:
    """Write image features into `embeds` (B, L-lo, D), the embeddings of ids[:, lo:], in place:
    the k-th image token of row b (counted over the whole row of `ids` (B, L)) gets
    features[b, k] ((B, K, D)). `image_id`: the image token id, or an array of media token ids
    (Qwen's image and video tokens: one count over both, items in prompt order). `media` (B, L)
    bool, when given, says which columns are image tokens instead (a generated token that
    happens to be the image token id is text). Returns `embeds`."""
    media = np.isin(ids, image_id) if media is None else media
    img = media[:, lo:]
    if img.any():
        rank = np.cumsum(media, axis=1)[:, lo:] - 1  # k of each token
        rows = np.nonzero(img)[0]
        embeds[img] = features[rows, rank[img]]
    return embeds


def answer_text(tokenizer, ids: Sequence[int], eos: set[int] | Sequence[int]) -> str:
    """Generated ids as the answer's text: eos left out, special tokens skipped."""
    return tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)


class Generator:
    """Owns one batch's sequence and KV cache; `pipe` supplies the sessions and the manifest."""

    def __init__(self, pipe: Pipeline, sampling: Sampling, batch: int = 1) -> None:
        from runtime.generate import PromptError  # generate imports this module

        self._PromptError = PromptError
        self.pipe, self.s, self.batch = pipe, sampling, batch
        t = pipe.text
        self.pad = t[C.T_PAD] if t[C.T_PAD] is not None else 0
        self.eos = set(t[C.T_EOS])
        from runtime.rows import media_ids

        self.image_id = np.array(sorted(media_ids(pipe.m)))  # image (and video) token ids
        dec = pipe.decoder
        self.binding = dec.io_binding()
        self.out_names = [o.name for o in dec.get_outputs()]
        layers = t[C.T_LAYERS]
        self.past_names = [n for i in range(layers) for n in C.past_names(i)]
        presents = [n for i in range(layers) for n in C.present_names(i)]
        self.past_for = dict(zip(presents, self.past_names, strict=True))
        self.in_graph_s = 0.0  # total seconds inside the decoder graph
        self.embed_s = 0.0  # total seconds in embed_tokens + scatter
        self.reset()

    def reset(self) -> None:
        """An empty sequence and KV cache (the sessions and the timers stay)."""
        t, b = self.pipe.text, self.batch
        self.ids = np.zeros((b, 0), np.int64)
        self.mask = np.zeros((b, 0), np.int64)
        self.media = np.zeros((b, 0), bool)  # columns that are image features (prompt only)
        self.positions = np.zeros((self.pipe.position_rows, b, 0), np.int64)
        self.computed = 0  # columns in the KV cache
        self.logits: np.ndarray | None = None  # (B, V) at the last cached column
        self.features: np.ndarray | None = None  # (B, K, D) image features, scattered on embed
        self.rng = np.random.default_rng(self.s.seed)
        self.done = np.zeros(b, bool)
        self.new_tokens: list[list[int]] = [[] for _ in range(b)]  # since the last append
        self.prefill_tokens = 0  # columns the last append's decoder run processed
        empty = np.zeros((b, t[C.T_KV_HEADS], 0, t[C.T_HEAD_DIM]), np.float32)
        self.kv = {
            n: ort.OrtValue.ortvalue_from_numpy(empty, self.pipe.device, 0) for n in self.past_names
        }
        for name, value in self.kv.items():
            self.binding.bind_ortvalue_input(name, value)

    # --- state -----------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Columns in the sequence (cached ones plus the ones the next run feeds)."""
        return self.ids.shape[1]

    def sequence(self, row: int = 0) -> list[int]:
        """Row `row`'s tokens (padding left out), the last generated token included."""
        return [int(i) for i in self.ids[row][self.mask[row] == 1]]

    def text(self, row: int = 0) -> str:
        """Row `row`'s tokens generated since the last append, decoded (eos left out)."""
        return answer_text(self.pipe.tokenizer, self.new_tokens[row], self.eos)

    def is_done(self) -> bool:
        """Every row has produced eos, or max_new_tokens were generated since the last append."""
        return bool(self.done.all()) or len(max(self.new_tokens, key=len)) >= self.s.max_new_tokens

    # --- feeding ---------------------------------------------------------------------------
    def append_tokens(
        self,
        ids: Sequence[Sequence[int]] | np.ndarray,
        image: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Prefill the new tokens (one list per row, left-padded to the longest) on top of the
        cache. `image` = (features (B,K,D), kept_indices (B,K)) fills the image tokens in them."""
        rows = [list(map(int, r)) for r in ids]
        if len(rows) != self.batch:
            raise ValueError(f"append_tokens got {len(rows)} rows, the generator has {self.batch}")
        n = max(len(r) for r in rows)
        new = np.full((self.batch, n), self.pad, np.int64)
        mask = np.zeros((self.batch, n), np.int64)
        for b, r in enumerate(rows):
            new[b, n - len(r) :], mask[b, n - len(r) :] = r, 1
        img = np.isin(new, self.image_id)
        # each row continues after its largest position (M-RoPE: the rows differ in an image)
        start = self.positions.max(axis=(0, 2)) + 1 if self.length else np.zeros(self.batch, int)
        if img.any():
            if image is None or self.features is not None:
                raise self._PromptError("image tokens need image features, once per sequence")
            counts = self.pipe.image_counts(image)
            if img.sum(axis=1).tolist() != counts:
                raise self._PromptError(f"the rows need exactly {counts} image tokens")
            pos = self.pipe.positions(new, mask, image)  # (R, B, n) from 0
        else:
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
            pos = np.broadcast_to(pos, (self.pipe.position_rows, *pos.shape))
        pos = pos + start[None, :, None]
        last = pos.max(axis=(0, 2)) if n else start - 1  # each row's top position
        need = int(last.max()) + 1 + self.s.max_new_tokens
        max_pos = self.pipe.text[C.T_MAX_POS]
        if need > max_pos:
            raise self._PromptError(
                f"prompt of {self.length + n} tokens + {self.s.max_new_tokens} new tokens needs "
                f"{need} positions, the model has {max_pos}; shorten the prompt or lower "
                "--max-new-tokens"
            )
        if img.any():
            self.features = image[0]
        self._extend(new, mask, pos, img if image is not None else None)
        self.done[:] = False
        self.new_tokens = [[] for _ in range(self.batch)]
        self.prefill_tokens = self._advance()

    def resume(self, ids: Sequence[int], image: tuple[np.ndarray, np.ndarray]) -> int:
        """Batch 1 (a chat): make the sequence `ids` -- the whole conversation, as a fresh run
        would feed it -- keeping the cached prefix it shares and prefilling only the rest.
        Sampling restarts from the seed, so the answer equals a fresh run's. Returns the number
        of columns the decoder processed."""
        if self.batch != 1:
            raise ValueError("resume() is for a single sequence (batch 1)")
        have, ids = self.sequence(0), [int(i) for i in ids]
        pairs = enumerate(zip(have, ids, strict=False))
        common = next((i for i, (a, b) in pairs if a != b), min(len(have), len(ids)))
        media = set(self.image_id.tolist())
        image_end = max((i + 1 for i, t in enumerate(ids) if t in media), default=0)
        if common < image_end or common == 0:  # the image itself changed: start over
            self.reset()
            self.append_tokens([ids], image=image)
        else:
            self.rewind(self.length - common)
            self.append_tokens([ids[common:]])
        self.rng = np.random.default_rng(self.s.seed)
        return self.prefill_tokens

    def generate_next_token(self) -> np.ndarray:
        """(B,) the next token per row; rows already finished get the pad id."""
        self._advance()  # the last generated token goes in
        if self.logits is None:
            raise RuntimeError("nothing to generate from: append tokens first")
        from runtime.generate import pick

        tokens = pick(self.logits, self.s, self.rng).astype(np.int64)
        tokens[self.done] = self.pad
        for b in np.nonzero(~self.done)[0]:
            self.new_tokens[b].append(int(tokens[b]))
            self.done[b] = int(tokens[b]) in self.eos
        ones = np.ones((self.batch, 1), np.int64)
        nxt = self.positions.max(axis=(0, 2))[:, None] + 1  # (B, 1): after each row's top
        self._extend(tokens[:, None], ones, np.broadcast_to(nxt, (len(self.positions), *nxt.shape)))
        return tokens

    def rewind(self, n_tokens: int) -> None:
        """Drop the last `n_tokens` columns of the sequence (and of the KV cache)."""
        keep = self.length - n_tokens
        if n_tokens < 0 or keep < 1:
            raise ValueError(f"cannot rewind {n_tokens} of {self.length} tokens")
        self.ids, self.mask = self.ids[:, :keep], self.mask[:, :keep]
        self.media = self.media[:, :keep]
        self.positions = self.positions[:, :, :keep]
        if keep < self.computed:  # the next run re-feeds the last kept column if it must
            self._truncate(keep)

    # --- internals -------------------------------------------------------------------------
    def _extend(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, media: np.ndarray | None = None
    ) -> None:
        media = np.zeros(ids.shape, bool) if media is None else media
        self.media = np.concatenate([self.media, media], axis=1)
        self.ids = np.concatenate([self.ids, ids], axis=1)
        self.mask = np.concatenate([self.mask, mask], axis=1)
        self.positions = np.concatenate([self.positions, pos], axis=2)

    def _advance(self) -> int:
        """Run the decoder over the uncomputed columns; returns how many it processed."""
        if self.length == self.computed and self.logits is None and self.computed:
            self._truncate(self.computed - 1)  # after a rewind: re-feed the last column
        n = self.length - self.computed
        if n:
            self._run()
        return n

    def _truncate(self, keep: int) -> None:
        """Keep the first `keep` columns of the KV cache. OrtValues cannot be sliced in place:
        each present goes to the host and back (a copy on CPU; on CUDA a device->host->device
        round trip, once per rewind, which a chat turn amortises over its prefill)."""
        self.computed, self.logits = keep, None
        for name, value in self.kv.items():
            host = np.ascontiguousarray(value.numpy()[:, :, :keep])
            self.kv[name] = ort.OrtValue.ortvalue_from_numpy(host, self.pipe.device, 0)
            self.binding.bind_ortvalue_input(name, self.kv[name])

    def _embeds(self, lo: int) -> np.ndarray:
        """(B, L-lo, D) embeddings of columns lo.., image features at the image tokens."""
        ids = self.ids[:, lo:]
        (embeds,) = self.pipe.embed.run(None, {C.INPUT_IDS: np.ascontiguousarray(ids)})
        return scatter_features(embeds, self.ids, lo, self.features, self.image_id, self.media)

    def _run(self) -> None:
        """One decoder run over the uncomputed columns; the presents become the next past."""
        t0 = time.perf_counter()
        embeds = self._embeds(self.computed)
        t1 = time.perf_counter()
        b = self.binding
        b.bind_cpu_input(C.INPUTS_EMBEDS, np.ascontiguousarray(embeds))
        b.bind_cpu_input(C.ATTENTION_MASK, np.ascontiguousarray(self.mask))
        pos = self.positions[:, :, self.computed :]  # (R, B, n): LLaVA's graph takes (B, n)
        b.bind_cpu_input(C.POSITION_IDS, np.ascontiguousarray(pos if self.pipe.qwen else pos[0]))
        for name in self.out_names:
            b.bind_output(name, self.pipe.device)
        self.pipe.decoder.run_with_iobinding(b)
        self.in_graph_s += time.perf_counter() - t1
        self.embed_s += t1 - t0
        outs = b.get_outputs()
        # logits may be (B, S, V) or (B, 1, V): only the last position crosses to the host
        self.logits = outs[0].numpy()[:, -1]
        for name, value in zip(self.out_names[1:], outs[1:], strict=True):
            self.kv[self.past_for[name]] = value
            b.bind_ortvalue_input(self.past_for[name], value)  # stays on the device
        self.computed = self.length
