"""python -m runtime.profile: where the time goes, stage by stage, across bundles of one model.

    python -m runtime.profile -b build/tiny-llava-k576 -b build/tiny-llava-k16 [--reps 5] [--trace]

    per bundle (K = N, 64, 32, 16 ...):
      load sessions ─► warm-up ×W ─► R reps, each:
          load_image + preprocess ─► Pipeline.generate: vision ─► embed+scatter ─► prefill ─► decode
          (+ a side-by-side callback, e.g. PyTorch, interleaved so drift hits both)
      ─► peak RSS of the bundle, device memory (CUDA), KV-cache bytes, prefill FLOPs
      ─► vision profiling twin (ORT profiler) ─► pruning ms / % of the vision graph
    rows ─► build/profile/latency.{json,csv,png} + a Markdown table + the targets, PASS/MISS

Runtime-only: onnxruntime, numpy, tokenizers, Pillow, stdlib (matplotlib optional, for the PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import contract as C
from runtime import ortprof
from runtime import profile_report as report
from runtime.bundle import BundleError
from runtime.generate import TTFT_STAGES, Pipeline, PromptError, Sampling
from runtime.preprocess import ImageError, load_image, preprocess_batch
from runtime.session import PROVIDER_CHOICES, ProviderError, SessionConfig

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "images" / "coco_cats.png"
DEFAULT_PROMPT = "What is in the image? Describe it in detail."
DEFAULT_OUT = Path("build") / "profile"
PROFILED_RUNS = 3  # profiled vision runs after one warm-up; the pruning share is their median
STAGES = ("preprocess", *TTFT_STAGES, "decode")  # what e2e is made of (plus "other": the rest)
USER_ERRORS = (BundleError, ImageError, PromptError, ProviderError, FileNotFoundError)

# A side-by-side measurement: given the loaded pipeline and the prompt ids, return a function
# that runs one repetition and returns its figures (e.g. {"torch_e2e_ms": ...}).
Side = Callable[[Pipeline, list[int]], Callable[[], dict[str, float]]]


@dataclass
class Options:
    """What one profile run measures: the image, prompt, repetitions and sessions."""

    image: Path = DEFAULT_IMAGE
    prompt: str = DEFAULT_PROMPT
    reps: int = 5
    warmup: int = 1
    new_tokens: int = 32
    cfg: SessionConfig = field(default_factory=SessionConfig)
    trace_dir: Path | None = None  # keep the ORT Chrome traces here (--trace)
    timings: bool = False  # print every repetition's stages


def once(pipe: Pipeline, image: Path, ids: list[int], new: int) -> dict[str, float]:
    """One answer, timed by stage (ms): preprocess, vision, embed, prefill, decode, ttft, e2e."""
    t0 = time.perf_counter()
    pixels = preprocess_batch([load_image(image)], pipe.m[C.KEY_VISION])  # (1,3,H,W)
    t1 = time.perf_counter()
    (r,) = pipe.generate(pixels, [ids], Sampling(max_new_tokens=new))
    e2e = (time.perf_counter() - t0) * 1e3
    t = r.timings_ms
    steps = len(r.token_ids) - 1  # decode steps after the first token
    row = {"preprocess_ms": (t1 - t0) * 1e3, **{f"{s}_ms": t[s] for s in TTFT_STAGES}}
    row["ttft_ms"] = row["preprocess_ms"] + sum(t[s] for s in TTFT_STAGES)
    row["decode_ms"] = t["decode"]
    row["decode_ms_per_token"] = t["decode"] / steps
    row["decode_tokens_per_s"] = steps / (t["decode"] / 1e3)
    row["host_overhead_pct"] = 100 * (t["decode"] - t["decode_in_graph"]) / t["decode"]
    row["e2e_ms"] = e2e
    row["other_ms"] = e2e - sum(row[f"{s}_ms"] for s in STAGES)
    return row


def summarize(reps: list[dict[str, float]]) -> dict[str, float]:
    """Median of every figure, plus _min and _max."""
    out: dict[str, float] = {}
    for key in reps[0]:
        values = [r[key] for r in reps]
        out[key] = statistics.median(values)
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


# --- memory ----------------------------------------------------------------------------------
def status_kb(field_name: str, pid: int | str = "self") -> float | None:
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM, ...); None off Linux or once pid exits."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def release_freed_memory() -> None:
    """gc, then hand freed heap pages back to the OS (glibc malloc_trim), so the previous
    bundle's freed sessions do not sit in this bundle's RSS. No-op off glibc."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: rss_base_mb shows the rest
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) so the next reading is this bundle's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> tuple[float, float, str]:
    """(current RSS, peak RSS, scope of the peak) in MiB. Off Linux the peak is the process's
    lifetime peak (scope "process": it also covers earlier bundles)."""
    now, peak = status_kb("VmRSS"), status_kb("VmHWM")
    if now is None or peak is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            1024 if sys.platform == "darwin" else 1
        )
        return float("nan"), kib / 1024, "process"
    return now / 1024, peak / 1024, "bundle"


def kv_cache_bytes(text: dict, seq: int, batch: int = 1) -> int:
    """KV-cache bytes for `seq` positions: 2 (K, V) × layers × kv_heads × seq × head_dim × item."""
    itemsize = np.dtype(text[C.T_DTYPE]).itemsize
    return 2 * text[C.T_LAYERS] * text[C.T_KV_HEADS] * seq * text[C.T_HEAD_DIM] * itemsize * batch


def prefill_flops(bundle: Path, text: dict, seq: int) -> float:
    """Multiply-add FLOPs (×2) of the decoder over a `seq`-token prompt, from the shapes in the
    manifest and config.json: q/k/v/o projections, QKᵀ and AV (full square, as ORT computes it),
    the MLP (3 matrices when gated: llama/qwen2/mistral/Qwen2.5-VL's text) and lm_head (over the
    last position when the decoder returns only its logits, text.logits "last")."""
    import json

    cfg = json.loads((bundle / C.HF_CONFIG).read_text()).get("text_config", {})
    if "intermediate_size" not in cfg:
        raise BundleError(f"{bundle}/config.json lacks text_config.intermediate_size; re-export")
    h, hd = text[C.T_HIDDEN], text[C.T_HEAD_DIM]
    q, kv = text[C.T_HEADS] * hd, text[C.T_KV_HEADS] * hd
    mlp = 3 if text[C.T_MODEL_TYPE] in ("llama", "qwen2", "mistral", "qwen2_5_vl_text") else 2
    per_layer = 2 * seq * (h * (q + 2 * kv) + q * h + mlp * h * cfg["intermediate_size"])
    per_layer += 2 * 2 * seq * seq * q
    head_rows = 1 if text.get(C.T_LOGITS) == C.LOGITS_LAST else seq
    return float(text[C.T_LAYERS] * per_layer + 2 * head_rows * h * text[C.T_VOCAB])


# --- the pruning share, from the ORT profiler ----------------------------------------------------
def pruning_share(
    pipe: Pipeline, pixels: np.ndarray, ids: list[int], opts: Options, tmp: Path
) -> dict:
    """Pruning kernel ms and % of the vision graph's run, median of PROFILED_RUNS after a warm-up,
    on a profiling twin of the vision session. With opts.trace_dir, the embed and decoder graphs
    get twins too, one answer runs through them, and the three traces are kept."""
    name = pipe.bundle.name
    vision = ortprof.profiling_twin(
        pipe.vision, pipe.bundle / C.VISION_ONNX, tmp / f"{name}_vision"
    )
    for _ in range(1 + PROFILED_RUNS):
        vision.run(None, {C.PIXEL_VALUES: pixels})
    twins = {"vision": vision}
    if opts.trace_dir is not None:
        for graph, path in (("embed", C.EMBED_ONNX), ("decoder", C.DECODER_ONNX)):
            twins[graph] = ortprof.profiling_twin(
                getattr(pipe, graph), pipe.bundle / path, tmp / f"{name}_{graph}"
            )
        pipe.vision, pipe.embed, pipe.decoder = twins["vision"], twins["embed"], twins["decoder"]
        pipe.generate(pixels, [ids], Sampling(max_new_tokens=opts.new_tokens))
    traces = {graph: Path(sess.end_profiling()) for graph, sess in twins.items()}
    events = ortprof.read_trace(traces["vision"])
    runs = [ortprof.scope_ms(events, i) for i in range(1, 1 + PROFILED_RUNS)]
    for graph, trace in traces.items():
        if opts.trace_dir is not None:
            opts.trace_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(trace, opts.trace_dir / f"{name}_{graph}.json")
        else:
            trace.unlink(missing_ok=True)
    return {
        "pruning_ms": statistics.median(r["pruning"] for r in runs),
        "pruning_pct": statistics.median(100 * r["pruning"] / r["run"] for r in runs),
        "vision_profiled_ms": statistics.median(r["run"] for r in runs),
        "tower_ms": statistics.median(r["tower"] for r in runs),
        "projector_ms": statistics.median(r["projector"] for r in runs),
    }


# --- one bundle ------------------------------------------------------------------------------
def profile_bundle(
    bundle: Path, opts: Options, bar: report.Progress, tmp: Path, side: Side | None = None
) -> dict:
    """Every figure of one bundle: a row of latency.json."""
    release_freed_memory()
    reset = reset_peak_rss()
    rss_base, _, _ = rss_mb()
    bar.note(f"{bundle.name}: loading")
    t0 = time.perf_counter()
    pipe = Pipeline(bundle, opts.cfg)
    load_s = time.perf_counter() - t0
    pipe.text[C.T_EOS] = []  # time exactly new_tokens tokens even if the model says eos
    ids = pipe.prompt_ids(opts.prompt)
    side_rep = side(pipe, ids) if side else None
    for i in range(opts.warmup):
        bar.step(f"{bundle.name}: warm-up {i + 1}/{opts.warmup}")
        once(pipe, opts.image, ids, opts.new_tokens)
        if side_rep:
            side_rep()
    reps = []
    for i in range(opts.reps):  # interleaved with the side so drift hits both alike
        bar.step(f"{bundle.name}: rep {i + 1}/{opts.reps}")
        r = once(pipe, opts.image, ids, opts.new_tokens)
        if side_rep:
            r.update(side_rep())
        if opts.timings:
            bar.print(
                f"{bundle.name} rep {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items())
            )
        reps.append(r)
    _, peak, scope = rss_mb()
    p = pipe.m[C.KEY_PRUNING]
    row = {
        "bundle": bundle.name,
        "k": p[C.P_K],
        "n": p[C.P_N],
        "method": p[C.P_METHOD],
        "rank": p.get(C.P_RANK),
        "iterations": p.get(C.P_ITERS),
        "prompt_tokens": len(ids),
        "new_tokens": opts.new_tokens,
        "reps": opts.reps,
        "provider_vision": pipe.vision.get_providers()[0],
        "provider_text": pipe.decoder.get_providers()[0],
        "load_s": load_s,
        **summarize(reps),
        "rss_base_mb": rss_base,
        "peak_rss_mb": peak,
        "peak_rss_scope": scope if reset else "process",
        "device_memory_mb": report.device_memory_mb() if pipe.device == "cuda" else None,
        "kv_cache_bytes": kv_cache_bytes(pipe.text, len(ids)),
        "prefill_gflops": prefill_flops(bundle, pipe.text, len(ids)) / 1e9,
    }
    bar.step(f"{bundle.name}: ORT profiler")
    pixels = preprocess_batch([load_image(opts.image)], pipe.m[C.KEY_VISION])
    row.update(pruning_share(pipe, pixels, ids, opts, tmp))
    del pipe
    return row


def one_model(bundles: list[Path]) -> None:
    """The targets compare K within one model: refuse bundles of different checkpoints."""
    import json

    names = {}
    for b in bundles:
        manifest = b / C.MANIFEST_FILE
        if not manifest.is_file():
            raise BundleError(f"{b} is not a bundle (no {C.MANIFEST_FILE}); export it first")
        names[b] = json.loads(manifest.read_text())[C.KEY_MODEL]["name"]
    if len(set(names.values())) > 1:
        raise BundleError(f"bundles of different models {names}; profile one model per run")


def run_profile(
    bundles: list[Path], opts: Options, side: Side | None = None
) -> tuple[list[dict], dict, dict]:
    """Profile every bundle in turn: (rows, environment, settings)."""
    import tempfile

    one_model(bundles)
    load = report.load_average()
    bar = report.Progress(len(bundles) * (opts.warmup + opts.reps + 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ortprof-") as tmp:
        for bundle in bundles:
            rows.append(profile_bundle(bundle, opts, bar, Path(tmp), side))
    bar.done()
    settings = {
        "image": str(opts.image),
        "prompt": opts.prompt,
        "reps": opts.reps,
        "warmup": opts.warmup,
        "new_tokens": opts.new_tokens,
        "provider": opts.cfg.provider,
        "threads": opts.cfg.threads,
        "trace_dir": str(opts.trace_dir) if opts.trace_dir else None,
    }
    return rows, report.environment(rows, load), settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m runtime.profile", description=__doc__.splitlines()[0]
    )
    ap.add_argument("-b", "-m", "--bundle", dest="bundles", type=Path, action="append",
                    required=True, help="bundle folder; repeat for each K (one model)")  # fmt: skip
    ap.add_argument("-i", "--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="output folder")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per bundle")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--new", "--max-new-tokens", dest="new", type=int, default=32,
                    help="tokens generated per run (eos ignored)")  # fmt: skip
    ap.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    ap.add_argument("--trace", action="store_true", help="keep ORT Chrome traces in OUT/trace/")
    ap.add_argument("--timings", action="store_true", help="print every repetition's stages")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.new < 2:
        ap.error("--reps must be >= 1 and --new >= 2 (decode needs a step after the first token)")
    return args


def options(args: argparse.Namespace) -> Options:
    """Options from parsed CLI arguments (shared with bench.profile)."""
    return Options(
        image=args.image,
        prompt=args.prompt,
        reps=args.reps,
        warmup=args.warmup,
        new_tokens=args.new,
        cfg=SessionConfig(provider=args.provider, threads=args.threads),
        trace_dir=args.out / "trace" if args.trace else None,
        timings=args.timings,
    )


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows, env, settings = run_profile(args.bundles, options(args))
        report.write_all(rows, env, settings, args.out)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
