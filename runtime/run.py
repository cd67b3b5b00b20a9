"""svdprune-run / python -m runtime.run: image + prompt -> answer, on ONNX Runtime only.

    python -m runtime.run -m build/tiny-llava-k16 -i photo.jpg -p "What is in the image?"
    python -m runtime.run -m BUNDLE -i a.jpg -i b.jpg -p "Describe it." --json --timings
    python -m runtime.run -m BUNDLE -i photo.jpg            # interactive chat on stdin
    python -m runtime.run -m BUNDLE -i a.jpg -i b.jpg --one-prompt -p "What changed?"
    python -m runtime.run -m BUNDLE --video clip.mp4 --frames 8 -p "What happens?"

Needs only onnxruntime(-gpu), numpy, tokenizers, Pillow (and jinja2 for multi-turn chat).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from runtime import rows
from runtime.bundle import BundleError, load_manifest
from runtime.generate import TTFT_STAGES, Pipeline, PromptError, Sampling
from runtime.media import load_video
from runtime.preprocess import ImageError, load_image
from runtime.selftest import SelfTestError, ensure_selftest
from runtime.session import OPT_LEVELS, PROVIDER_CHOICES, ProviderError, SessionConfig


class UsageError(ValueError):
    """A flag value the runtime cannot use; the message names the flag and its valid range."""


USER_ERRORS = (
    BundleError,
    SelfTestError,
    ImageError,
    PromptError,
    ProviderError,
    UsageError,
    FileNotFoundError,
)


class InOrder(argparse.Action):
    """Appends to its own list (args.image / args.video) and to args.media as (dest, path), so
    one prompt keeps the order the flags were given in."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), values])
        namespace.media = [*namespace.media, (self.dest, values)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="svdprune-run", description=__doc__.splitlines()[0])
    ap.set_defaults(media=[])
    ap.add_argument("-m", "--model", type=Path, required=True, help="bundle folder (make export)")
    ap.add_argument("-i", "--image", type=Path, action=InOrder, default=[], help="image(s)")
    ap.add_argument("-p", "--prompt", help="question; without it: interactive chat on stdin")
    ap.add_argument(
        "--one-prompt",
        action="store_true",
        help="all -i images and --video clips in one prompt (in the order given), one answer; "
        "the -p text may place them itself with one <image> marker each",
    )
    ap.add_argument(
        "--video",
        type=Path,
        action=InOrder,
        default=[],
        help="a video file (needs PyAV), animated GIF or folder of frames; implies --one-prompt",
    )
    ap.add_argument("--frames", type=int, default=8, help="frames sampled uniformly per --video")
    ap.add_argument("--fps", type=float, help="a --video's frame rate (default: its own; folder 2)")
    ap.add_argument(
        "--jsonl",
        type=Path,
        help='batch file, one {"image": PATH, "prompt": TEXT} per line (paths relative to it)',
    )
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    ap.add_argument("--opt-level", choices=tuple(OPT_LEVELS), default="all")
    ap.add_argument("--fp16", action="store_true", help="TensorRT fp16 for the vision graph")
    ap.add_argument("--timings", action="store_true", help="TTFT, tokens/s and stage times")
    ap.add_argument(
        "--verify", action="store_true", help="hash every bundle file (default: once, then stat)"
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per answer on stdout")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap.parse_args(argv)


def answer_json(result, elapsed_ms: dict) -> str:
    """The --json line: text, ids, prompt as fed, kept tokens, timings, tokens/s."""
    n = len(result.token_ids)
    decode_s = result.timings_ms["decode"] / 1e3
    return json.dumps(
        {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_token_ids": result.prompt_token_ids,
            "kept_indices": result.kept_indices,
            "timings_ms": {**elapsed_ms, **result.timings_ms},
            "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        }
    )


def check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that would crash or silently misbehave later, before loading anything."""
    checks = [
        (args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
        (args.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {args.temperature}"),
        (args.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {args.top_k}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.threads >= 0, f"--threads must be >= 0 (0 = ORT default), got {args.threads}"),
        (args.frames >= 1, f"--frames must be >= 1, got {args.frames}"),
        (args.fps is None or args.fps > 0, f"--fps must be > 0, got {args.fps}"),
        (
            not (args.jsonl and (args.video or args.one_prompt)),
            "--jsonl takes one image a row; drop --one-prompt/--video",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.prompt is not None:
        check_prompt(args.prompt, "-p")


def check_prompt(text: str, where: str) -> str:
    """A prompt must be non-empty, valid UTF-8 text (argv bytes that are not UTF-8 arrive as
    lone surrogates, which the tokenizer cannot encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(
            f"{where} is not valid UTF-8 (byte {e.object[e.start]!r} at {e.start}); "
            "pass the prompt as UTF-8 text"
        ) from e
    if not text.strip():
        raise PromptError(f'{where} is empty; pass a question, e.g. "What is in the image?"')
    return text


def main(args: argparse.Namespace) -> int:
    check_args(args)
    t0 = time.perf_counter()
    # 1. bundle: manifest (checksums verified), tokenizer, sessions on the chosen providers
    cfg = SessionConfig(args.provider, args.threads, args.opt_level, args.fp16)
    if args.verify:  # the full check; Pipeline then finds every file in the fresh stamp
        load_manifest(args.model, full=True)
    pipe = Pipeline(args.model, cfg)
    load_ms = (time.perf_counter() - t0) * 1e3
    # the bundle's self-test, once per provider/precision (cached beside the bundle)
    ensure_selftest(pipe, cfg)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.video or args.one_prompt:
        return one_prompt(pipe, args, sampling, t0, load_ms)
    if args.jsonl:
        args.image, texts = read_jsonl(args.jsonl)
    if not args.image:
        raise ImageError("no image given; pass one or more -i PATH (or --jsonl FILE)")
    # 2. images -> pixel_values (B,3,H,W), exactly as the checkpoint's processor would
    #    (Qwen2.5-VL: one (pixel_values, image_grid_thw) per image, each at its own size)
    t1 = time.perf_counter()
    if args.prompt is None and not args.jsonl:  # a chat about the first image
        (first,) = rows.prepare(pipe, [[load_image(args.image[0])]])
        preprocess_ms = (time.perf_counter() - t1) * 1e3
        return chat(pipe, first, sampling, args.json, args.timings, preprocess_ms)
    pixels = pipe.preprocess([load_image(p) for p in args.image])
    preprocess_ms = (time.perf_counter() - t1) * 1e3
    # 3. prompt -> ids with K image tokens (one -p for every image, or one per --jsonl row)
    texts = texts if args.jsonl else [args.prompt] * len(pixels)
    counts = pipe.image_tokens(pixels)  # K per image (an unpruned Qwen bundle: each image's N)
    prompts = [pipe.prompt_ids(t, k) for t, k in zip(texts, counts, strict=True)]
    # 4. vision + prefill + decode, streaming tokens as they come
    stream = StreamPrinter(pipe) if not args.json and len(pixels) == 1 else None
    results = pipe.generate(pixels, prompts, sampling, stream)
    total_ms = (time.perf_counter() - t0) * 1e3
    # 5. report
    for r in results:
        extra = {"load": load_ms, "preprocess": preprocess_ms, "total": total_ms}
        extra["ttft"] = preprocess_ms + sum(r.timings_ms[k] for k in TTFT_STAGES)
        if args.json:
            print(answer_json(r, extra), flush=True)
        elif stream is None:
            print(r.text, flush=True)
    if stream is not None:
        print(flush=True)
    if args.timings:
        print_timings(results, preprocess_ms, total_ms, load_ms)
    return 0


def one_prompt(pipe: Pipeline, args, sampling: Sampling, t0: float, load_ms: float) -> int:
    """Every -i image and --video clip, in the order given, in one prompt: one answer (or a
    chat)."""
    if not args.image and not args.video:
        raise ImageError("--one-prompt needs images or videos; pass -i PATH or --video PATH")
    # 2. media -> the family's inputs: LLaVA one image block per image / frame, Qwen2.5-VL an
    #    image block per image and a video block per clip (2 frames per temporal slice)
    t1 = time.perf_counter()
    media = [
        load_video(p, args.frames, args.fps) if kind == "video" else load_image(p)
        for kind, p in args.media
    ]
    (row,) = rows.prepare(pipe, [media])
    preprocess_ms = (time.perf_counter() - t1) * 1e3
    if args.prompt is None:
        return chat(pipe, row, sampling, args.json, args.timings, preprocess_ms)
    # 3. prompt -> ids, each image / frame / slice K tokens; the context check names the F
    #    that fits before any vision runs
    rows.check_context(pipe, args.prompt, row, args.max_new_tokens, args.frames)
    ids = rows.prompt_ids(pipe, args.prompt, row)
    # 4. vision (all frames as one batch; Qwen one call per slice) + prefill + decode
    t2 = time.perf_counter()
    image = rows.run(pipe, [row])
    vision_ms = (time.perf_counter() - t2) * 1e3
    stream = None if args.json else StreamPrinter(pipe)
    (r,) = pipe.generate(None, [ids], sampling, stream, vision_out=image)
    r.timings_ms["vision"] = vision_ms
    total_ms = (time.perf_counter() - t0) * 1e3
    # 5. report
    extra = {"load": load_ms, "preprocess": preprocess_ms, "total": total_ms}
    extra["ttft"] = preprocess_ms + sum(r.timings_ms[k] for k in TTFT_STAGES)
    print(answer_json(r, extra) if args.json else "", flush=True)
    if args.timings:
        print_timings([r], preprocess_ms, total_ms, load_ms)
    return 0


def read_jsonl(path: Path) -> tuple[list[Path], list[str]]:
    """Images and prompts of a batch file; a clear error names the bad line."""
    if not path.is_file():
        raise PromptError(f"batch file {path} does not exist; pass an existing --jsonl file")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptError(
            f"{path} is not valid UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from e
    images, texts = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            images.append(path.parent / row["image"])
            texts.append(check_prompt(str(row["prompt"]), f"{path}:{n} prompt"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PromptError(
                f'{path}:{n}: expected {{"image": PATH, "prompt": TEXT}} ({e!r}); fix that line'
            ) from e
    if not images:
        raise PromptError(f"batch file {path} has no rows; add one JSON object per line")
    return images, texts


class StreamPrinter:
    """Prints the decoded text of row 0 as tokens arrive (decoding the whole tail each time, so
    byte-level pieces that only form a character together print correctly)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe, self.ids, self.shown = pipe, [], ""

    def __call__(self, row: int, token: int) -> None:
        if row or token in self.pipe.text["eos_token_id"]:
            return
        self.ids.append(token)
        text = self.pipe.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the rest
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
            self.shown = text


def print_timings(results, preprocess_ms: float, total_ms: float, load_ms: float = 0.0) -> None:
    r = results[0]
    t = r.timings_ms
    n = sum(len(x.token_ids) for x in results)
    steps = max(len(x.token_ids) for x in results)
    ttft = preprocess_ms + sum(t[k] for k in TTFT_STAGES)
    tps = (steps - 1) / (t["decode"] / 1e3) if steps > 1 and t["decode"] > 0 else float("nan")
    print(
        f"timings: load {load_ms:.1f} ms | preprocess {preprocess_ms:.1f} ms | "
        f"vision+prune {t['vision']:.1f} ms | "
        f"embed {t['embed']:.1f} ms | prefill {t['prefill']:.1f} ms | "
        f"time to first token {ttft:.1f} ms | "
        f"decode {tps:.1f} tokens/s per sequence ({n} tokens, batch {len(results)}) | "
        f"total {total_ms:.1f} ms",
        file=sys.stderr,
    )


def chat(
    pipe: Pipeline,
    row: list,
    sampling: Sampling,
    as_json: bool = False,
    timings: bool = False,
    preprocess_ms: float = 0.0,
) -> int:
    """A multi-turn chat about `row` (runtime.rows Items: the first turn's images/videos); a
    line `/image PATH` adds an image to the next question. Each turn renders the whole
    conversation with the chat template (the ids a fresh run would feed) and keeps the cached
    prefix it shares -- the earlier turns and the replies generated into the cache -- so every
    answer equals a fresh run's. An image added later changes the image tokens: that turn
    prefills the whole conversation again (the earlier images' vision output is reused)."""
    from runtime.chat import render
    from runtime.generator import Generator

    t0 = time.perf_counter()
    items = list(row)
    image = rows.run(pipe, [items])  # vision once per set of images
    vision_ms = (time.perf_counter() - t0) * 1e3
    gen = Generator(pipe, sampling, 1)
    messages: list[dict] = []
    pending = list(row)  # items the next user turn carries
    for line in _stdin_lines():
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            break
        if question.startswith("/image "):
            (new,) = rows.prepare(pipe, [[load_image(Path(question[7:].strip()))]])
            t_v = time.perf_counter()
            pending += new
            items += new
            image = rows.run(pipe, [items])
            vision_ms += (time.perf_counter() - t_v) * 1e3
            continue
        text_only = [{"type": "text", "text": question}]
        content = rows.content(pipe, question, pending) if pending else text_only
        messages.append({"role": "user", "content": content})
        pending = []
        t_turn = time.perf_counter()
        ids = rows.encode(pipe, render(pipe, messages), rows.slots(pipe, items))
        t_prompt = time.perf_counter()
        embed_s = gen.embed_s
        prefilled = gen.resume(ids, image)
        stream = StreamPrinter(pipe) if not as_json else None
        t_first = None
        while not gen.is_done():
            (token,) = gen.generate_next_token()
            t_first = t_first or time.perf_counter()
            if stream:
                stream(0, int(token))
        t_end = time.perf_counter()
        tokens = gen.new_tokens[0]
        text = gen.text(0)
        embed_ms = (gen.embed_s - embed_s) * 1e3  # the prefill's (decode steps come after)
        turn_ms = {
            "preprocess": preprocess_ms if len(messages) == 1 else 0.0,
            "vision": vision_ms,
            "prompt": (t_prompt - t_turn) * 1e3,  # chat template + tokenizer
            "embed": embed_ms,
            "prefill": (t_first - t_prompt) * 1e3 - embed_ms,  # decoder + first pick
            "decode": (t_end - t_first) * 1e3,
        }
        vision_ms = 0.0
        turn_ms["ttft"] = sum(turn_ms.values()) - turn_ms["decode"]
        n, decode_s = len(tokens), turn_ms["decode"] / 1e3
        tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else None
        if as_json:
            turn = {"turn": len(messages) // 2 + 1, "text": text, "token_ids": tokens}
            turn |= {"prompt_token_ids": ids, "prefill_tokens": prefilled}
            turn |= {"cached_tokens": len(ids) - prefilled}  # reused from the KV cache
            print(json.dumps(turn | {"timings_ms": turn_ms, "tokens_per_s": tps}), flush=True)
        else:
            print(flush=True)
        if timings:
            print(
                f"turn {len(messages) // 2 + 1}: prefill {prefilled} tokens "
                f"({len(ids) - prefilled} cached) | time to first token {turn_ms['ttft']:.1f} ms"
                f" | decode {tps or float('nan'):.1f} tokens/s ({n} tokens)",
                file=sys.stderr,
            )
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return 0


def _stdin_lines():
    # Undecodable stdin would end the chat with a traceback mid-conversation; name the fix.
    try:
        yield from sys.stdin
    except UnicodeDecodeError as e:
        raise PromptError(f"stdin is not valid UTF-8 ({e.reason}); type or pipe UTF-8 text") from e


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return main(args)
    except USER_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C mid-answer: the runtime writes nothing, so just stop
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
