"""The generation loop over a bundle: vision -> embed -> scatter -> prefill -> decode (KV cache).

    pixels (B,3,H,W) ─► vision_encoder ─► image_features (B,K,D), kept_indices (B,K)
    prompts ─► template ─► ids with K image tokens, left-padded (B,S)
            ─► embed_tokens ─► inputs_embeds (B,S,D) ◄─ scatter image_features at image tokens
    decoder: prefill (past = 0) ─► logits ─► pick ─► embed one token ─► decode step ... eos/limit

`Pipeline.generate` is a thin loop over `runtime.generator.Generator`, which owns the sequence
and the KV cache (on the decoder's device, through IOBinding) and also serves multi-turn chat:
append tokens on top of the cache, generate the next token, rewind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime import contract as C
from runtime import qwen_images
from runtime.bundle import BundleError, load_manifest
from runtime.generator import Generator
from runtime.preprocess import ImageError, preprocess_batch
from runtime.session import GRAPH_ROLES, SessionConfig, bundle_providers, device_of, open_session

# Pipeline.generate's stages before the first token (Result.timings_ms keys); TTFT adds preprocess.
TTFT_STAGES = ("vision", "embed", "prefill")


class PromptError(ValueError):
    """The prompt cannot be run (too long for the context, or empty)."""


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0; otherwise temperature / top-k / top-p with a seed."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Result:
    """One answer: generated ids and text, the prompt as fed, kept tokens, per-stage timings."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    kept_indices: list[int] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    first_logits: np.ndarray | None = None  # (V,) float32 logits of the first generated token


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from (B, V) logits."""
    if s.temperature <= 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / s.temperature
    if s.top_k > 0:
        kth = np.sort(z, axis=-1)[:, -min(s.top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if s.top_p < 1.0:  # nucleus: the smallest set of tokens whose mass reaches top_p
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < s.top_p  # keeps the top one
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def prompt_ids(
    tokenizer: Tokenizer, manifest: dict, prompt: str, k: int | None = None
) -> list[int]:
    """The user's text in the bundle's template (manifest `prompt`), with exactly K image tokens
    (`k`: the image's own count, for an unpruned Qwen2.5-VL bundle's images).
    Needs no session: other runners of a bundle (examples/ortgenai/) feed the same ids."""
    p = manifest[C.KEY_PROMPT]
    text = p[C.PR_TEMPLATE].replace(p[C.PR_MARKER], prompt)
    return encode_with_image(tokenizer, manifest, text, k)


def encode_with_image(
    tokenizer: Tokenizer, manifest: dict, text: str, k: int | None = None
) -> list[int]:
    """`text` holding the image placeholder once -> ids with it expanded to exactly K (`k`)
    tokens."""
    image, text_cfg = manifest[C.KEY_PROMPT][C.PR_IMAGE], manifest[C.KEY_TEXT]
    k = k or text_cfg[C.T_IMAGE_TOKENS]
    if k is None:
        raise PromptError("this bundle keeps every image token: pass the image's count")
    if text.count(image) != 1:
        raise PromptError(f"the prompt must contain the image placeholder {image!r} once")
    ids = tokenizer.encode(text.replace(image, image * k)).ids
    n_img = sum(1 for i in ids if i == text_cfg[C.T_IMAGE_TOKEN_ID])
    if n_img != k:
        raise PromptError(f"prompt holds {n_img} image tokens, the bundle needs {k}")
    return ids


class Pipeline:
    """A loaded bundle: manifest, tokenizer and the three sessions."""

    def __init__(self, bundle: Path, cfg: SessionConfig | None = None, verify: bool = True) -> None:
        self.bundle = Path(bundle)
        self.m = load_manifest(self.bundle, verify)
        missing = {C.KEY_PROMPT, C.KEY_TEXT} - self.m.keys()
        if missing:
            raise BundleError(f"{bundle}: manifest lacks {sorted(missing)}; re-export the bundle")
        self.text = self.m[C.KEY_TEXT]
        self.prompt_cfg = self.m[C.KEY_PROMPT]
        cfg = cfg or SessionConfig()
        self.tokenizer = Tokenizer.from_file(str(self.bundle / C.TOKENIZER_FILE))
        chains = bundle_providers(cfg, self.bundle, self.m)  # a refused bundle fails fast
        # The decoder first: while a session loads, ONNX Runtime prepacks its weights and the
        # largest (lm_head) briefly exists twice; opened first, that spike does not sit on top
        # of the vision session (medium preset: peak RSS 3612 -> 3223 MiB, `make bench-peers`).
        opened = {g: open_session(self.bundle / g, cfg, chains[g]) for g, _ in GRAPH_ROLES[::-1]}
        self.vision, self.embed, self.decoder = (opened[g] for g, _ in GRAPH_ROLES)
        # --batch at export fixes the vision graph's batch (TensorRT); None: dynamic
        self.static_batch = self.m.get(C.KEY_VISION, {}).get(C.V_STATIC_BATCH)
        self.device = device_of(self.decoder)
        self.k = self.text[C.T_IMAGE_TOKENS]  # None: an unpruned Qwen2.5-VL bundle (N varies)
        self.qwen = qwen_images.is_qwen(self.m)  # one image per vision call, 3-row positions
        self.position_rows = C.MROPE_ROWS if self.qwen else 1

    def sessions(self) -> tuple:
        """(vision, embed, decoder) sessions, in C.GRAPH_FILES order."""
        return self.vision, self.embed, self.decoder

    def reopen_vision(self, cfg: SessionConfig) -> None:
        """A new vision session under `cfg` (the self-test's fp32 fallback)."""
        chain = bundle_providers(cfg, self.bundle, self.m)[C.VISION_ONNX]
        self.vision = open_session(self.bundle / C.VISION_ONNX, cfg, chain)

    # --- prompt ----------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, k: int | None = None) -> list[int]:
        """The user's text in the bundle's template, with exactly K (`k`) image tokens."""
        return prompt_ids(self.tokenizer, self.m, prompt, k)

    def encode_with_image(self, text: str, k: int | None = None) -> list[int]:
        return encode_with_image(self.tokenizer, self.m, text, k)

    # --- images ----------------------------------------------------------------------------
    def preprocess(self, images: list) -> np.ndarray | list:
        """PIL images -> the vision graph's inputs: (B, 3, H, W) pixels (LLaVA), or one
        (pixel_values, image_grid_thw) per image at its own size (Qwen2.5-VL)."""
        if self.qwen:
            return qwen_images.preprocess(images, self.m)
        return preprocess_batch(images, self.m[C.KEY_VISION])

    def image_tokens(self, pixels) -> list[int]:
        """Image tokens each row's prompt holds: K (or each image's N, unpruned Qwen)."""
        return qwen_images.image_tokens(pixels, self.m) if self.qwen else [self.k] * len(pixels)

    def vision_row(self, image, i: int):
        """Row `i` of a run_vision output, as a batch of one."""
        if self.qwen:
            return image.row(i)
        return image[0][i : i + 1], image[1][i : i + 1]

    def image_counts(self, image) -> list[int]:
        """Image tokens per row of a vision output (run_vision's or runtime.rows.run's; LLaVA
        rows of several images pad kept with -1)."""
        return [int(c) for c in image.counts] if self.qwen else (image[1] >= 0).sum(1).tolist()

    def positions(self, ids: np.ndarray, mask: np.ndarray, image) -> np.ndarray:
        """(rows, B, S) position ids of new tokens from 0: LLaVA (1, B, S) compact, or kept image
        tokens at their original slots; Qwen2.5-VL (3, B, S) M-RoPE rows."""
        if self.qwen:
            return qwen_images.positions(self.m, ids, mask, image)
        return self._llava_positions(ids, mask, image[1])[None]

    def _llava_positions(self, ids: np.ndarray, mask: np.ndarray, kept: np.ndarray) -> np.ndarray:
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        if self.m[C.KEY_PRUNING].get(C.P_POSITIONS) != C.POSITIONS_ORIGINAL:
            return pos
        n, k = self.m[C.KEY_PRUNING][C.P_N], self.k
        for b in range(len(ids)):
            img = np.nonzero(ids[b] == self.text[C.T_IMAGE_TOKEN_ID])[0]
            for j in range(len(img) // k):  # each image a block of K tokens, in prompt order
                cols = img[j * k : (j + 1) * k]
                pos[b, cols] = pos[b, cols[0]] + kept[b, j * k : (j + 1) * k]
                pos[b, cols[-1] + 1 :] += n - k  # text after the image starts at offset N
        return pos

    # --- the loop --------------------------------------------------------------------------
    def generate(
        self,
        pixels: np.ndarray,
        prompts: list[list[int]],
        s: Sampling,
        on_token: Callable[[int, int], None] | None = None,
        vision_out: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[Result]:
        """Answer B (image, prompt-ids) pairs in one batch; `on_token(row, id)` streams.

        `vision_out` = (image_features (B,K,D), kept_indices (B,K)) skips the vision graph (its
        output computed once per image, or features pruned elsewhere, e.g. exact SVD in torch).
        """
        t0 = time.perf_counter()
        if vision_out is None:
            vision_out = self.run_vision(pixels)
        kept = vision_out[1]  # (B, K)
        t_vision = time.perf_counter()
        gen = Generator(self, s, len(prompts))
        gen.append_tokens(prompts, image=vision_out)  # embed + scatter + positions + prefill
        embed_s = gen.embed_s
        results = [Result(prompt_token_ids=gen.sequence(b)) for b in range(len(prompts))]
        first_logits, t_first, in_graph_first = None, None, 0.0
        while not gen.is_done():
            live = ~gen.done
            tokens = gen.generate_next_token()
            if t_first is None:
                t_first, first_logits = time.perf_counter(), gen.logits
                in_graph_first = gen.in_graph_s
            if on_token:
                for b in np.nonzero(live)[0]:
                    on_token(int(b), int(tokens[b]))
        t_end = time.perf_counter()
        counts = self.image_counts(vision_out)
        for b, r in enumerate(results):
            r.token_ids = gen.new_tokens[b]
            r.kept_indices = [int(i) for i in kept[b][: counts[b]]]
            r.first_logits = first_logits[b]
            r.text = gen.text(b)
            r.timings_ms = {
                "vision": (t_vision - t0) * 1e3,
                "embed": embed_s * 1e3,  # embed_tokens + scatter of the prompt
                "prefill": (t_first - t_vision - embed_s) * 1e3,  # positions, decoder, first pick
                "decode": (t_end - t_first) * 1e3,
                "decode_in_graph": (gen.in_graph_s - in_graph_first) * 1e3,
            }
        return results

    def run_vision(self, pixels):
        """(image_features (B,K,D), kept_indices (B,K)) from pixel_values (B,3,H,W); Qwen2.5-VL:
        a QwenImages from preprocess()'s list (one vision call per image)."""
        if self.qwen:
            return qwen_images.run_vision(self.vision, pixels, self.m)
        if self.static_batch is not None and len(pixels) != self.static_batch:
            raise ImageError(
                f"{self.bundle.name}'s vision graph has a static batch of {self.static_batch} "
                f"(exported with --batch), got {len(pixels)} images; pass "
                f"{self.static_batch} per run, or re-export without --batch"
            )
        feats, kept = self.vision.run(None, {C.PIXEL_VALUES: pixels})
        return feats, kept
