"""`make profile VIDEO=... FRAMES="4 8 16"`: what K tokens per frame buy a video prompt.

    python -m bench.video_profile [--family llava|qwen2.5-vl] [--preset medium | -m CKPT]
        [--video PATH | pan] [--frames 4 8 16] [--k all 64 16] [--reps 1]

checkpoint ─► build/<name>-k<K> per K (K = all: unpruned), exported when missing, the text graphs
              hard-linked across K (bench.qwen_profile; LLaVA's unpruned one is -k<N>, as
              bench.profile names it)
clip: --video (file, GIF or folder of frames), or none / `pan`: a camera pan over a real photo
      (PAN_FRAMES crops of 448x336 sliding across it, PNG frames in build/profile/pan-448x336)
per bundle (a 2-frame warm-up first), per F (F frames sampled uniformly, runtime.media):
  runtime.rows.prepare (preprocess) ─► rows.run (vision: LLaVA every frame one image block of K
  tokens, one batch; Qwen2.5-VL one call per slice of 2 frames, K tokens each) ─► Pipeline.generate
  (embed + prefill + first token); TTFT = preprocess + vision + embed + prefill.
  Figures: image / prompt tokens, positions, TTFT, vision and prefill ms, KV-cache bytes after
  prefill, prefill GFLOPs, peak RSS. A prompt past the model's positions is "does not fit" with
  the F that would (rows.check_context, nothing run); one whose TTFT, extrapolated from the
  bundle's previous F, passes --max-ttft-s is "not measured".
─► build/profile/video.{json,md} (and video-<model>.{json,md}): one row per (F, K), each K's
   ratios to the unpruned one at the same F, measured in the same run.

Prefill FLOPs: runtime.profile.prefill_flops (the one formula: projections, full-square
attention as ORT computes it, the gated MLP, lm_head over the last position).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

from runtime import contract as C
from runtime import rows as R
from runtime.generate import Pipeline, PromptError, Sampling
from runtime.media import Video, load_video
from runtime.preprocess import load_image
from runtime.profile import (
    kv_cache_bytes,
    prefill_flops,
    release_freed_memory,
    reset_peak_rss,
    rss_mb,
)
from runtime.profile_report import cpu_model, load_average, md_table
from runtime.session import SessionConfig

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "images" / "waterview.jpg"  # 1000x667
PAN = "pan"  # --video pan: the built-in clip
PAN_FRAMES = 32  # frames on disk; F of them are sampled
FRAME_SIZE = (448, 336)  # W, H: Qwen2.5-VL 32x24 patches -> 192 tokens per slice of 2 frames
PROMPT = "What happens in the video? Describe it in detail."
ALL = "all"
FAMILIES = {"llava": C.FAMILY_LLAVA, "qwen2.5-vl": C.FAMILY_QWEN25VL}  # --family -> model_type


def pan_clip(folder: Path, frames: int = PAN_FRAMES, size=FRAME_SIZE, photo: Path = PHOTO) -> Path:
    """A clip from a real photo: `frames` crops of `size` sliding left to right across it (a
    camera pan), PNG frames (lossless) in `folder`; kept when already there."""
    if len(list(folder.glob("frame*.png"))) == frames:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    im = load_image(photo)
    w, h = size
    y = (im.height - h) // 2
    for i in range(frames):
        x = round(i * (im.width - w) / max(frames - 1, 1))
        im.crop((x, y, x + w, y + h)).save(folder / f"frame{i:03d}.png")
    return folder


def ensure_bundles(family: str, src: Path, ks: list[str], root: Path) -> dict[str, Path]:
    """{K: bundle} at root/<name>-k<K>, exported when missing (K = all / N: unpruned), the text
    graphs of later bundles hard-linked to the first's (one decoder on disk)."""
    from bench.qwen_profile import export, share_text_graphs

    out: dict[str, Path] = {}
    for k in ks:
        unpruned = k.lower() in (ALL, "n")
        label = ALL if unpruned else k
        if family == C.FAMILY_QWEN25VL:
            out[label] = export(src, label, root / f"{src.name}-k{label}")
        else:  # LLaVA: bench.profile's export (--k N --method none when unpruned)
            from bench.profile import ensure_bundle
            from export.load import token_count

            n = token_count(src)
            kk = n if unpruned else int(k)
            out[label] = ensure_bundle(src, kk, n, root / f"{src.name}-k{kk}")
        share_text_graphs(next(iter(out.values())), out[label])
    return out


def answer(pipe: Pipeline, video: Video, new: int) -> dict:
    """One timed answer (ms per stage) and its prompt."""
    t0 = time.perf_counter()
    (row,) = R.prepare(pipe, [[video]])
    t1 = time.perf_counter()
    ids = R.prompt_ids(pipe, PROMPT, row)
    t2 = time.perf_counter()
    image = R.run(pipe, [row])
    t3 = time.perf_counter()
    (r,) = pipe.generate(None, [ids], Sampling(max_new_tokens=new), vision_out=image)
    t = r.timings_ms
    out = {"preprocess_ms": (t1 - t0) * 1e3, "vision_ms": (t3 - t2) * 1e3}
    out["prefill_ms"] = t["embed"] + t["prefill"]
    out["ttft_ms"] = out["preprocess_ms"] + out["vision_ms"] + out["prefill_ms"]
    return out


def sizes(pipe: Pipeline, video: Video, new: int) -> dict:
    """Token and position counts of the F-frame prompt (no vision run), and whether it fits."""
    (row,) = R.prepare(pipe, [[video]])
    ids = R.prompt_ids(pipe, PROMPT, row)
    out = {"frames": len(video), "image_tokens": sum(it.tokens for it in row)}
    out["prompt_tokens"] = len(ids)
    out["text_tokens"] = len(ids) - out["image_tokens"]
    out["positions"] = R.positions_needed(pipe, ids, row)
    out["max_positions"] = pipe.text[C.T_MAX_POS]
    out["kv_cache_bytes"] = kv_cache_bytes(pipe.text, len(ids))
    out["prefill_gflops"] = prefill_flops(pipe.bundle, pipe.text, len(ids)) / 1e9
    try:
        R.check_context(pipe, PROMPT, row, new, len(video))
    except PromptError as e:  # the message names the largest --frames that fits
        fit = re.search(r"--frames (\d+) fits", str(e))
        out.update(fits=False, fits_frames=int(fit[1]) if fit else 0, note=str(e))
    return out


def estimate_s(prev: dict | None, now: dict) -> float | None:
    """TTFT (s) of `now` from the bundle's previous F: vision by frames, prefill by FLOPs."""
    if prev is None or "ttft_ms" not in prev:
        return None
    vision = (prev["preprocess_ms"] + prev["vision_ms"]) * now["frames"] / prev["frames"]
    prefill = prev["prefill_ms"] * now["prefill_gflops"] / prev["prefill_gflops"]
    return (vision + prefill) / 1e3


def profile_bundle(
    k: str, bundle: Path, clip: Path, frames: list[int], opts: argparse.Namespace
) -> list[dict]:
    """One bundle's rows, F ascending (after a 2-frame warm-up answer)."""
    release_freed_memory()
    pipe = Pipeline(bundle, SessionConfig(provider="cpu", threads=opts.threads))
    pipe.text[C.T_EOS] = []  # exactly new_tokens tokens
    answer(pipe, load_video(clip, 2), opts.new_tokens)  # warm the sessions up
    out, prev = [], None
    for f in sorted(frames):
        video = load_video(clip, f)
        row = {"k": k, "bundle": bundle.name, "fits": True, **sizes(pipe, video, opts.new_tokens)}
        est = estimate_s(prev, row)
        if row["fits"] and est is not None and est > opts.max_ttft_s:
            row["measured"] = False
            row["note"] = (f"not measured: TTFT estimated at {est:.0f} s from F={prev['frames']}"
                           f" (over --max-ttft-s {opts.max_ttft_s:.0f})")  # fmt: skip
        elif row["fits"]:
            reset_peak_rss()
            row["load_before"] = load_average()
            reps = [answer(pipe, video, opts.new_tokens) for _ in range(opts.reps)]
            for key in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms"):
                row[key] = statistics.median(r[key] for r in reps)
            row["peak_rss_mb"] = rss_mb()[1]
            row["load_after"] = load_average()
            row["measured"] = True
            prev = row
        else:
            row["measured"] = False
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    del pipe
    return out


def add_ratios(rows: list[dict]) -> None:
    """Each measured pruned row's figures over the unpruned row's at the same F (same run)."""
    full = {r["frames"]: r for r in rows if r["k"] == ALL}
    for r in rows:
        u = full.get(r["frames"])
        if u is None or r["k"] == ALL:
            continue
        r["token_ratio"] = r["prompt_tokens"] / u["prompt_tokens"]
        r["kv_ratio"] = r["kv_cache_bytes"] / u["kv_cache_bytes"]
        r["gflops_ratio"] = r["prefill_gflops"] / u["prefill_gflops"]
        if r.get("measured") and u.get("measured"):
            r["ttft_ratio"] = r["ttft_ms"] / u["ttft_ms"]
            r["prefill_ratio"] = r["prefill_ms"] / u["prefill_ms"]


def profile(bundles: dict[str, Path], clip: Path, frames: list[int], opts) -> list[dict]:
    """Every (F, K) row of the table, the ratios filled in. `opts`: reps, new_tokens, threads,
    max_ttft_s (main's arguments)."""
    out = []
    for k, bundle in bundles.items():
        out += profile_bundle(k, bundle, clip, frames, opts)
    add_ratios(out)
    return out


COLUMNS = {  # table column -> row key (md_table's fmt: 3 significant figures, "-" if absent)
    "image tokens": "image_tokens", "prompt tokens": "prompt_tokens", "TTFT ms": "ttft_ms",
    "vision ms": "vision_ms", "prefill ms": "prefill_ms", "KV MiB": "kv_mib",
    "prefill GFLOPs": "prefill_gflops", "peak RSS MiB": "peak_rss_mb", "TTFT / all": "ttft_ratio",
    "prefill / all": "prefill_ratio", "KV / all": "kv_ratio",
}  # fmt: skip


def table(rows: list[dict]) -> str:
    """frames x K: tokens, times, KV and FLOPs, and pruned / unpruned at the same F; a row not
    run says why in its TTFT cell."""
    body = []
    order = {k: i for i, k in enumerate(dict.fromkeys(r["k"] for r in rows))}
    for r in sorted(rows, key=lambda r: (r["frames"], order[r["k"]])):
        cells = {**r, "kv_mib": r["kv_cache_bytes"] / 2**20}
        if not r["fits"]:
            cells["ttft_ms"] = (f"does not fit: {r['positions']} positions > "
                                f"{r['max_positions']}; F = {r['fits_frames']} fits")  # fmt: skip
        elif not r["measured"]:
            cells["ttft_ms"] = r["note"]
        body.append([r["frames"], r["k"], *(cells.get(key) for key in COLUMNS.values())])
    return md_table(["frames", "K", *COLUMNS], body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.video_profile", description=__doc__)
    ap.add_argument("--family", choices=tuple(FAMILIES), default="llava",
                    help="built-in model when no -m (with -m: its config.json)")  # fmt: skip
    ap.add_argument("-m", "--model", type=Path, help="local checkpoint folder")
    ap.add_argument("--preset", choices=("tiny", "medium"), default="tiny")
    ap.add_argument("--video", default=PAN, help="video file, GIF, folder of frames, or 'pan'")
    ap.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--k", nargs="+", default=[ALL, "64", "16"], help="K values; all = unpruned")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=2, help="the first token and one more")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--max-ttft-s",
        type=float,
        default=600.0,
        help="skip an answer whose TTFT, extrapolated from the previous F, is over",
    )
    ap.add_argument("-o", "--out", type=Path, default=REPO / "build" / "profile")
    ap.add_argument("--bundles", type=Path, default=REPO / "build", help="bundle folder")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from export import load

    args = parse_args(argv)
    src = load.checkpoint(args.model, args.preset, FAMILIES[args.family])
    family = load.family_of(src, None)
    bundles = ensure_bundles(family, src, args.k, args.bundles)
    clip = pan_clip(args.out / "pan-{}x{}".format(*FRAME_SIZE)) if args.video == PAN else None
    clip = clip or Path(args.video)
    env = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_at_start": load_average(),
           "mem_available_gib": _mem_available_gib()}  # fmt: skip
    print(f"machine: {env}", file=sys.stderr, flush=True)
    rows = profile(bundles, clip, args.frames, args)
    env["load_at_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"source": str(src), "video": str(clip), "prompt": PROMPT, "reps": args.reps,
                "new_tokens": args.new_tokens, "threads": args.threads}  # fmt: skip
    doc = json.dumps({"settings": settings, "environment": env, "rows": rows}, indent=1)
    md = table(rows)
    for name in ("video", f"video-{src.name}"):  # the latest run, and each model's own
        (args.out / f"{name}.json").write_text(doc)
        (args.out / f"{name}.md").write_text(f"{src.name}, {clip}\n\n{md}\n\nmachine: {env}\n")
    print(md)
    return 0


def _mem_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


if __name__ == "__main__":
    raise SystemExit(main())
