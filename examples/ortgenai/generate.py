"""Answer with ONNX Runtime GenAI's own generator over a bundle (its Model / Generator, C++ loop).

    python examples/ortgenai/generate.py BUNDLE IMAGE PROMPT [--max-new-tokens N] [--json]

    image ─► runtime.preprocess ─► pixel_values (1,3,H,W) ─┐
    prompt ─► bundle template + tokenizer (runtime) ─► ids ─┼─► Generator.set_inputs:
    K ─► num_image_tokens (1,) ─────────────────────────────┘   vision ─► embed_genai ─► decoder
                                                                (prefill) ─► greedy steps

The pixels and prompt ids are our runtime's (runtime.preprocess, runtime.generate.prompt_ids),
set by hand, so none of ORT GenAI's processors runs; greedy tokens equal `python -m runtime.run`'s
(tests/test_ortgenai.py). `--json` prints {"token_ids", "text", "timings_ms", "tokens_per_s"} as
the last line. A bundle without ORT GenAI files, or one ORT GenAI cannot run (original position
ids), is refused in one line, exit code 2. Benchmarks import `generate` or `GenaiRunner`.

Needs onnxruntime-genai==0.18.0 installed with --no-deps beside onnxruntime-gpu (`make venv`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script from a checkout: `runtime` is two folders up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokenizers import Tokenizer

from runtime import contract as C
from runtime.bundle import BundleError, load_manifest
from runtime.generate import PromptError, prompt_ids
from runtime.generator import answer_text
from runtime.preprocess import ImageError, load_image, preprocess_batch
from runtime.run import check_prompt

PROVIDERS = ("cpu", "cuda")  # cuda needs the onnxruntime-genai-cuda wheel


class GenaiError(RuntimeError):
    """The bundle or the installed onnxruntime-genai cannot run this; the message says the fix."""


def check_bundle(bundle: Path, manifest: dict) -> None:
    """Raise GenaiError unless the bundle carries ORT GenAI's files, listed and verified."""
    section = manifest.get(C.KEY_GENAI)
    if section is None:
        raise GenaiError(
            f"{bundle} has no ONNX Runtime GenAI files ({C.GENAI_CONFIG}, "
            f"{C.GENAI_EMBED_ONNX}); re-export it with this version (python -m export ...)"
        )
    if section[C.GN_UNSUPPORTED]:
        raise GenaiError(f"{bundle}: ONNX Runtime GenAI cannot run it: {section[C.GN_UNSUPPORTED]}")
    unlisted = [f for f in C.GENAI_FILES if f not in manifest[C.KEY_FILES]]
    if unlisted:
        raise GenaiError(
            f"{bundle} does not list {', '.join(unlisted)} in {C.MANIFEST_FILE}; re-export it"
        )


def import_genai():
    """onnxruntime_genai, or GenaiError saying how to install it without replacing
    onnxruntime-gpu."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise GenaiError(
            f"onnxruntime_genai is not importable ({e}); install it beside onnxruntime-gpu with "
            f"`pip install --no-deps onnxruntime-genai=={C.GENAI_VERSION}` (make venv does)"
        ) from e
    return og


class GenaiRunner:
    """A bundle loaded in ORT GenAI (manifest verified, model, our tokenizer); answers many
    (image, prompt) pairs, one Generator each. `threads` > 0: intra-op threads of every session
    (the vision and embedding sessions take the decoder's session options)."""

    def __init__(
        self, bundle: Path, provider: str = "cpu", verify: bool = True, threads: int = 0
    ) -> None:
        self.bundle = Path(bundle)
        if provider not in PROVIDERS:
            raise GenaiError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        self.m = load_manifest(self.bundle, verify)  # checksums of every listed file
        check_bundle(self.bundle, self.m)
        self.og = import_genai()
        section = self.m[C.KEY_GENAI]
        if self.og.__version__ != section[C.GN_VERSION]:
            print(
                f"note: onnxruntime-genai {self.og.__version__}, the bundle's files are for "
                f"{section[C.GN_VERSION]}: tokens may differ if its "
                f"'{section[C.GN_MODEL_TYPE]}' handling changed (tests/test_ortgenai.py checks)",
                file=sys.stderr,
            )
        t0 = time.perf_counter()
        config = self.og.Config(str(self.bundle))
        if threads:
            opts = {"session_options": {"intra_op_num_threads": threads}}
            config.overlay(json.dumps({"model": {"decoder": opts}}))
        config.clear_providers()  # CPU; the CUDA wheel takes "cuda" for every session
        if provider != "cpu":
            config.append_provider(provider)
        self.model = self.og.Model(config)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.tokenizer = Tokenizer.from_file(str(self.bundle / C.TOKENIZER_FILE))
        self.text = self.m[C.KEY_TEXT]

    def answer(self, image, prompt: str, max_new_tokens: int = 128) -> dict:
        """{token_ids, text, prompt_token_ids, timings_ms, tokens_per_s} for one image (a path
        or PIL image) and question; greedy, stopping at eos (kept, as runtime.run keeps it)."""
        if max_new_tokens < 1:
            raise PromptError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        check_prompt(prompt, "PROMPT")  # runtime.run's rule: non-empty UTF-8 text
        t0 = time.perf_counter()
        image = image if isinstance(image, Image.Image) else load_image(image)
        pixels = preprocess_batch([image], self.m[C.KEY_VISION])  # (1, 3, H, W) float32
        t1 = time.perf_counter()
        ids = prompt_ids(self.tokenizer, self.m, prompt)
        max_pos = self.text[C.T_MAX_POS]
        if len(ids) + max_new_tokens > max_pos:  # the runtime's rule (runtime/generator.py)
            raise PromptError(
                f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens needs "
                f"{len(ids) + max_new_tokens} positions, the model has {max_pos}; shorten the "
                "prompt or lower --max-new-tokens"
            )
        t2 = time.perf_counter()
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        gen = self.og.Generator(self.model, params)
        inputs = self.og.NamedTensors()
        inputs[C.INPUT_IDS] = np.array([ids], dtype=np.int32)  # ORT GenAI's ids are int32
        inputs[C.PIXEL_VALUES] = pixels
        inputs[C.NUM_IMAGE_TOKENS] = np.array([self.text[C.T_IMAGE_TOKENS]], dtype=np.int64)
        gen.set_inputs(inputs)  # the prefill: vision, embed_genai, decoder
        t3 = time.perf_counter()
        tokens: list[int] = []
        t_first = None
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))  # eos too (not kept in the sequence)
            t_first = t_first or time.perf_counter()
        t_end = time.perf_counter()
        ms = {
            "preprocess": (t1 - t0) * 1e3,
            "prompt": (t2 - t1) * 1e3,  # template + tokenizer
            "prefill": (t3 - t2) * 1e3,  # set_inputs: vision + embedding + decoder prefill
            "first_token": (t_first - t3) * 1e3,  # the first pick
            "decode": (t_end - t_first) * 1e3,  # the remaining tokens
        }
        ms["ttft"] = ms["preprocess"] + ms["prefill"] + ms["first_token"]  # as runtime.run
        decode_s = ms["decode"] / 1e3
        return {
            "token_ids": tokens,
            "text": answer_text(self.tokenizer, tokens, set(self.text[C.T_EOS])),
            "prompt_token_ids": ids,
            "timings_ms": ms,
            "tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s else None,
        }


def generate(
    bundle: Path, image, prompt: str, max_new_tokens: int = 128, provider: str = "cpu"
) -> dict:
    """One answer from a fresh load: GenaiRunner(bundle).answer(...) with timings_ms["load"]
    (the ORT GenAI model) added."""
    runner = GenaiRunner(bundle, provider)
    out = runner.answer(image, prompt, max_new_tokens)
    out["timings_ms"]["load"] = runner.load_ms
    return out


USER_ERRORS = (GenaiError, BundleError, ImageError, PromptError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="examples/ortgenai/generate.py", description=__doc__.splitlines()[0]
    )
    ap.add_argument("bundle", type=Path, help="bundle folder (python -m export)")
    ap.add_argument("image", type=Path)
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--provider", choices=PROVIDERS, default="cpu")
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    try:
        out = generate(args.bundle, args.image, args.prompt, args.max_new_tokens, args.provider)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        keys = ("token_ids", "text", "timings_ms", "tokens_per_s")
        print(json.dumps({k: out[k] for k in keys}), flush=True)
    else:
        print(out["text"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
