"""Answer with ONNX Runtime GenAI's own generator over a bundle (its Model / Generator, C++ loop).

    python examples/ortgenai/generate.py BUNDLE IMAGE PROMPT [--max-new-tokens N] [--json]
                                         [--genai-processor]

    image ─► runtime.preprocess ─► pixel_values (1,3,H,W) ─┐
    prompt ─► bundle template + tokenizer (runtime) ─► ids ─┼─► Generator.set_inputs:
    K ─► num_image_tokens (1,) ─────────────────────────────┘   vision ─► embed_genai ─► decoder
                                                                (prefill) ─► greedy steps

The pixels and prompt ids are our runtime's (runtime.preprocess, runtime.generate.prompt_ids),
set by hand, so none of ORT GenAI's processors runs; greedy tokens equal `python -m runtime.run`'s
(tests/test_ortgenai.py). `--json` prints {"token_ids", "text", "timings_ms", "tokens_per_s"} as
the last line. A bundle without ORT GenAI files, or one ORT GenAI cannot run (original position
ids), is refused in one line, exit code 2. Benchmarks import `generate` or `GenaiRunner`.

Qwen2.5-VL (an unpruned bundle, --method none; ORT GenAI type qwen2_5_vl): set_inputs gets our
pixel_values (patches, 1176), image_grid_thw (1, 3), the prompt with the image's N pads and
num_image_tokens N; ORT GenAI computes the M-RoPE positions (tests/test_ortgenai_qwen.py: logits
bit-equal to the runtime's at every step). `--genai-processor` instead runs ORT GenAI's own
QwenImageProcessor (ort-extensions, genai_processor_config.json) on the image file and the
prompt text, and prints how far its pixels are from runtime.preprocess_qwen's (stderr). A
pruned Qwen bundle is refused: ORT GenAI derives the positions from the full grid.

Needs onnxruntime-genai==0.18.0 installed with --no-deps beside onnxruntime-gpu (`make venv`).
"""

from __future__ import annotations

import argparse
import io
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
from runtime import qwen_images, rows
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
        # what runtime.rows reads of a pipeline, to build several images' prompt as ours does
        self.prompt_cfg, self.k = self.m[C.KEY_PROMPT], self.text[C.T_IMAGE_TOKENS]

    @property
    def qwen(self) -> bool:
        return qwen_images.is_qwen(self.m)

    def _several(self, images: list, prompt: str) -> tuple[dict, list[int]]:
        """Several images in one prompt (LLaVA): runtime.rows' prompt and pixels. ORT GenAI's
        gemma3 type sizes image_features (num_images, sum(num_image_tokens)), so it gets K once:
        (num_images, K) is what the vision graph returns."""
        if self.qwen:
            raise GenaiError("several images per prompt: LLaVA bundles only in ORT GenAI here")
        (row,) = rows.prepare(self, [[im if isinstance(im, Image.Image) else load_image(im)
                                      for im in images]])  # fmt: skip
        pixels = np.concatenate([it.inputs for it in row])  # (num_images, 3, H, W)
        feed = {C.PIXEL_VALUES: pixels, C.NUM_IMAGE_TOKENS: self.k}
        return feed, rows.prompt_ids(self, prompt, row)

    def _our_pixels(self, image) -> dict:
        """set_inputs' image tensors from our runtime's preprocessing (num_image_tokens: K, or
        the image's N for an unpruned Qwen2.5-VL bundle)."""
        image = image if isinstance(image, Image.Image) else load_image(image)
        if self.qwen:  # one (pixel_values (patches, 1176), image_grid_thw (1, 3))
            samples = qwen_images.preprocess([image], self.m)
            (pixels, grid), n = samples[0], qwen_images.image_tokens(samples, self.m)[0]
            return {C.PIXEL_VALUES: pixels, C.IMAGE_GRID_THW: grid, C.NUM_IMAGE_TOKENS: n}
        pixels = preprocess_batch([image], self.m[C.KEY_VISION])  # (1, 3, H, W) float32
        return {C.PIXEL_VALUES: pixels, C.NUM_IMAGE_TOKENS: self.text[C.T_IMAGE_TOKENS]}

    def _our_ids(self, prompt: str, pixels: dict) -> list[int]:
        """The prompt in the bundle's template with the image's tokens (runtime.generate)."""
        k = pixels[C.NUM_IMAGE_TOKENS] if self.qwen else None
        return prompt_ids(self.tokenizer, self.m, prompt, k)

    def genai_inputs(self, image, prompt: str):
        """ORT GenAI's own processor on the image file (or a PIL image, as PNG bytes) and the
        prompt in the bundle's template: NamedTensors {input_ids, pixel_values, image_grid_thw,
        num_image_tokens}. Qwen2.5-VL only (its genai_processor_config.json)."""
        if not self.qwen:
            raise GenaiError(
                "--genai-processor needs a Qwen2.5-VL bundle: a LLaVA bundle's ORT GenAI type "
                f"({C.GENAI_MODEL_TYPE}) would run Gemma 3's image processor"
            )
        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            images = self.og.Images.open_bytes(buf.getvalue())
        else:
            images = self.og.Images.open(str(image))
        if not hasattr(self, "processor"):
            self.processor = self.model.create_multimodal_processor()
        p = self.m[C.KEY_PROMPT]
        return self.processor(p[C.PR_TEMPLATE].replace(p[C.PR_MARKER], prompt), images=images)

    def compare_preprocessing(self, image, prompt: str) -> dict:
        """ORT GenAI's processor vs ours on one image: {size, grid_genai, grid_ours,
        ids_equal, max_abs, mean_abs} (max/mean None when the grids differ), plus the same
        in 8-bit levels (|diff| * std / rescale: max_levels, mean_levels, off_by_2_or_more)."""
        path = image
        image = image if isinstance(image, Image.Image) else load_image(image)
        ours = self._our_pixels(image)
        ids = self._our_ids(prompt, ours)
        named = self.genai_inputs(path, prompt)
        theirs = {k: named[k].as_numpy() for k in named.keys()}  # noqa: SIM118 (not iterable)
        grid_genai = theirs[C.IMAGE_GRID_THW].reshape(-1).tolist()
        grid_ours = ours[C.IMAGE_GRID_THW].reshape(-1).tolist()
        out = {
            "size": list(image.size), "grid_genai": grid_genai, "grid_ours": grid_ours,
            "ids_equal": theirs[C.INPUT_IDS].reshape(-1).tolist() == ids,
            "max_abs": None, "mean_abs": None, "max_levels": None, "mean_levels": None,
            "off_by_2_or_more": None,
        }  # fmt: skip
        if grid_genai == grid_ours:
            v = self.m[C.KEY_VISION]
            diff = np.abs(theirs[C.PIXEL_VALUES] - ours[C.PIXEL_VALUES])
            std = np.asarray(v[C.V_IMAGE_STD], np.float32)
            levels = diff.reshape(len(diff), len(std), -1) * std[:, None] / v[C.V_RESCALE]
            out |= {
                "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                "max_levels": float(levels.max()), "mean_levels": float(levels.mean()),
                "off_by_2_or_more": float((levels > 1.5).mean()),
            }  # fmt: skip
        return out

    def answer(
        self, image, prompt: str, max_new_tokens: int = 128, genai_processor: bool = False
    ) -> dict:
        """{token_ids, text, prompt_token_ids, timings_ms, tokens_per_s} for one image (a path
        or PIL image; a list: several images in one prompt, as runtime.run --one-prompt) and
        question; greedy, stopping at eos (kept, as runtime.run keeps it).
        `genai_processor`: ORT GenAI's own processor makes the inputs (Qwen2.5-VL)."""
        if max_new_tokens < 1:
            raise PromptError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        check_prompt(prompt, "PROMPT")  # runtime.run's rule: non-empty UTF-8 text
        t0 = time.perf_counter()
        if genai_processor:  # image and prompt in one call, set_inputs as ORT GenAI made them
            inputs = self.genai_inputs(image, prompt)
            t1 = time.perf_counter()
            ids = [int(i) for i in inputs[C.INPUT_IDS].as_numpy().reshape(-1)]
        else:
            several = isinstance(image, list | tuple)
            feed, ids = self._several(image, prompt) if several else (self._our_pixels(image), [])
            t1 = time.perf_counter()
            ids = ids or self._our_ids(prompt, feed)
            inputs = self.og.NamedTensors()
            inputs[C.INPUT_IDS] = np.array([ids], dtype=np.int32)  # ORT GenAI's ids are int32
            for name, value in feed.items():  # num_image_tokens: (num_images,) int64
                inputs[name] = value if name != C.NUM_IMAGE_TOKENS else np.array([value], np.int64)
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
            "preprocess": (t1 - t0) * 1e3,  # --genai-processor: image and prompt
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
    bundle: Path,
    image,
    prompt: str,
    max_new_tokens: int = 128,
    provider: str = "cpu",
    genai_processor: bool = False,
) -> dict:
    """One answer from a fresh load: GenaiRunner(bundle).answer(...) with timings_ms["load"]
    (the ORT GenAI model) added; `genai_processor` also adds "preprocessing" (ORT GenAI's
    pixels vs ours: GenaiRunner.compare_preprocessing)."""
    runner = GenaiRunner(bundle, provider)
    out = runner.answer(image, prompt, max_new_tokens, genai_processor)
    out["timings_ms"]["load"] = runner.load_ms
    if genai_processor:
        out["preprocessing"] = runner.compare_preprocessing(image, prompt)
    return out


USER_ERRORS = (GenaiError, BundleError, ImageError, PromptError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="examples/ortgenai/generate.py", description=__doc__.splitlines()[0]
    )
    ap.add_argument("bundle", type=Path, help="bundle folder (python -m export)")
    ap.add_argument("image", type=Path, nargs="+", help="image(s): several go in one prompt")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--provider", choices=PROVIDERS, default="cpu")
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    ap.add_argument(
        "--genai-processor", action="store_true",
        help="Qwen2.5-VL: ORT GenAI's own image processor and prompt expansion instead of ours",
    )  # fmt: skip
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    try:
        image = args.image if len(args.image) > 1 else args.image[0]
        out = generate(
            args.bundle, image, args.prompt, args.max_new_tokens, args.provider,
            args.genai_processor,
        )  # fmt: skip
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "preprocessing" in out:
        diff = json.dumps(out["preprocessing"])
        print(f"ORT GenAI's processor vs runtime.preprocess_qwen: {diff}", file=sys.stderr)
    if args.json:
        keys = ("token_ids", "text", "timings_ms", "tokens_per_s")
        print(json.dumps({k: out[k] for k in keys}), flush=True)
    else:
        print(out["text"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
