"""`make soak`: many consecutive runtime calls in one process; does memory grow, does any fail?

    Pipeline(bundle), once ─► call i = 0 .. N-1:
        image i mod M (load_image + preprocess; 131 real photos) ─┐
        prompt i mod P, max_new_tokens varied, every 5th sampled ─┴─► Pipeline.generate ─► RSS
    the first W calls are warm-up (ORT arenas, lazy allocations) and are excluded
    report: RSS after warm-up and at the end, growth %, least-squares slope (MB per 100 calls),
            failed calls, latency; JSON in build/bench/soak.json

A benchmark, not a test. Target: growth <= 5 % after warm-up, no failed call.

    python -m bench.soak [-b build/tiny-llava-k16] [--calls 1000] [--warmup 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime import contract as C
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import load_image, preprocess_batch
from runtime.session import SessionConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "build" / "tiny-llava-k16"
DATA = REPO.parent / "shared" / "data"
IMAGE_DIRS = (DATA / "images", DATA / "coco128" / "images" / "train")
PROMPTS = (
    "What is in the image?",
    "Describe the colors you see.",
    "How many people are there?",
    "Is this photo taken indoors or outdoors? Explain briefly.",
    "List every object you can recognise, from left to right, and say what each one is used for.",
    "What time of day is it?",
    "Write a short caption.",
    "What is unusual about this picture?",
)
NEW_TOKENS = (4, 8, 16, 32)
TARGET_GROWTH_PCT = 5.0


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; MiB)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError as e:
        raise SystemExit(f"error: cannot read /proc/self/statm ({e}); the soak needs Linux") from e
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def images() -> list[Path]:
    found = [
        p
        for d in IMAGE_DIRS
        if d.is_dir()
        for p in sorted(d.iterdir())
        if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
    ]
    if not found:
        raise SystemExit(f"error: no photos under {', '.join(map(str, IMAGE_DIRS))}")
    return found


def ensure_bundle(bundle: Path) -> None:
    """Export the tiny default if it is missing (in a subprocess: this process stays torch-free)."""
    if (bundle / C.MANIFEST_FILE).is_file():
        return
    if bundle.resolve() != DEFAULT_BUNDLE.resolve():
        raise SystemExit(f"error: {bundle} is not a bundle; export it first (make export)")
    print(f"exporting the tiny default bundle to {bundle} ...", flush=True)
    subprocess.run([sys.executable, "-m", "export", "--k", "16"], cwd=REPO, check=True)


def soak(bundle: Path, calls: int, warmup: int, provider: str, threads: int) -> dict:
    pipe = Pipeline(bundle, SessionConfig(provider, threads))
    photos = images()
    vision = pipe.m[C.KEY_VISION]
    rss, latency, failures = [], [], []
    t_start = time.perf_counter()
    for i in range(calls):
        sampling = Sampling(
            max_new_tokens=NEW_TOKENS[i % len(NEW_TOKENS)],
            temperature=0.8 if i % 5 == 4 else 0.0,
            top_p=0.9,
            seed=i,
        )
        t0 = time.perf_counter()
        try:
            pixels = preprocess_batch([load_image(photos[i % len(photos)])], vision)
            ids = pipe.prompt_ids(PROMPTS[i % len(PROMPTS)])
            (result,) = pipe.generate(pixels, [ids], sampling)
            if not result.token_ids:
                raise RuntimeError("no token generated")
        except Exception as e:  # a benchmark counts failures instead of stopping at the first
            failures.append(f"call {i} ({photos[i % len(photos)].name}): {e!r}")
        latency.append((time.perf_counter() - t0) * 1e3)
        rss.append(rss_mb())
        if (i + 1) % 100 == 0:
            print(f"  {i + 1:5d} calls  RSS {rss[-1]:7.1f} MiB  failed {len(failures)}", flush=True)
    wall = time.perf_counter() - t_start
    after = np.asarray(rss[warmup:])  # one sample per call after warm-up
    x = np.arange(warmup, calls)
    slope = float(np.polyfit(x, after, 1)[0]) * 100 if len(after) > 1 else float("nan")
    start, end = float(after[0]), float(after[-1])
    return {
        "bundle": str(bundle),
        "calls": calls,
        "warmup_calls": warmup,
        "images": len(photos),
        "prompts": len(PROMPTS),
        "provider": provider,
        "rss_mb_before_warmup": rss[0],
        "rss_mb_start": start,
        "rss_mb_end": end,
        "rss_mb_max": float(after.max()),
        "growth_pct": 100 * (end - start) / start,
        "slope_mb_per_100_calls": slope,
        "failed_calls": len(failures),
        "failures": failures[:20],
        "latency_ms_median": statistics.median(latency),
        "latency_ms_p95": float(np.percentile(latency, 95)),
        "wall_s": wall,
        "rss_mb_every_10_calls": [round(r, 2) for r in rss[::10]],
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-b", "--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100, help="calls excluded from the trend")
    ap.add_argument("--provider", default="cpu", help="auto|cuda|tensorrt|cpu (default cpu)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "soak.json")
    args = ap.parse_args(argv)
    if not 0 <= args.warmup < args.calls - 1:
        ap.error("--warmup must leave at least two calls: 0 <= warmup < calls - 1")
    ensure_bundle(args.bundle)
    print(f"soak: {args.calls} calls on {args.bundle} ({args.warmup} warm-up)", flush=True)
    r = soak(args.bundle, args.calls, args.warmup, args.provider, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    ok = r["growth_pct"] <= TARGET_GROWTH_PCT and r["failed_calls"] == 0
    print(
        "\n| calls | RSS after warm-up | RSS at end | growth | slope | failed "
        "| latency median / p95 |\n|---|---|---|---|---|---|---|"
        f"\n| {r['calls']} ({r['warmup_calls']} warm-up) | {r['rss_mb_start']:.1f} MiB | "
        f"{r['rss_mb_end']:.1f} MiB | {r['growth_pct']:+.2f} % | "
        f"{r['slope_mb_per_100_calls']:+.3f} MiB / 100 calls | {r['failed_calls']} | "
        f"{r['latency_ms_median']:.1f} / {r['latency_ms_p95']:.1f} ms |"
    )
    verdict = "met" if ok else "MISSED"
    print(f"\ntarget (growth <= {TARGET_GROWTH_PCT:.0f} %, no failed call): {verdict}; "
          f"{r['wall_s']:.0f} s; wrote {args.out}")  # fmt: skip
    for f in r["failures"][:5]:
        print(f"  failed: {f}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
