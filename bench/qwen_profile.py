"""`make profile-qwen`: what a fixed K buys a Qwen2.5-VL model as the image grows.

    python -m bench.qwen_profile [--preset medium | -m CKPT] [--k all 256 64 16] [--reps 2]

checkpoint (default: the built-in tiny Qwen2.5-VL; --preset medium: Qwen2.5-VL-3B shapes)
  ─► build/<name>-k<K> per K (K = all: --method none), exported first when missing; the
     language-model graphs of every K are the same bytes, so later bundles hard-link the first
     one's (a 3B decoder is 12 GiB in fp32) instead of keeping a copy each
  ─► per bundle (one warm-up answer at the first size), per image size (448x448, 1008x1008, a
     2 MP photo): preprocess, vision (tower +
     merger + pruning), prefill (embed + decoder over the prompt), TTFT, KV-cache bytes, peak RSS
  ─► build/profile/qwen.{json,md}: the table in the README

Each size is one of the shared photos resized with PIL (the processor's smart_resize then makes
it 448x448, 1008x1008 and 1736x1148 = 2542 tokens); K = all is the unpruned model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from runtime import contract as C
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import load_image
from runtime.profile import kv_cache_bytes, release_freed_memory, reset_peak_rss, rss_mb
from runtime.session import SessionConfig

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "images" / "waterview.jpg"
SIZES = {"448x448": (448, 448), "1008x1008": (1008, 1008), "2 MP": (1732, 1155)}  # (W, H)
PROMPT = "What is in the image? Describe it in detail."
ALL = "all"
SHARED_GRAPHS = (C.EMBED_ONNX, C.DECODER_ONNX)


def export(src: Path, k: str, out: Path) -> Path:
    """The bundle for K (or all) at `out`, exported in a child process when missing."""
    if (out / C.MANIFEST_FILE).is_file():
        return out
    cmd = [sys.executable, "-m", "export", "-m", str(src), "-o", str(out)]
    cmd += ["--method", "none"] if k == ALL else ["--k", k]
    print(f"exporting {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=2)  # fd 2: progress on stderr
    return out


def share_text_graphs(first: Path, other: Path) -> int:
    """Hard-link `other`'s embed/decoder files to `first`'s where their sha256 (manifest) match;
    returns the bytes saved. A bundle whose graphs differ keeps its own files."""
    a, b = (json.loads((p / C.MANIFEST_FILE).read_text())[C.KEY_FILES] for p in (first, other))
    saved = 0
    for rel, digest in b.items():
        if not rel.startswith(SHARED_GRAPHS) or a.get(rel) != digest:
            continue
        src, dst = first / rel, other / rel
        if os.path.samefile(src, dst):
            continue
        tmp = dst.with_name(dst.name + ".link")
        os.link(src, tmp)
        os.replace(tmp, dst)
        saved += src.stat().st_size
    return saved


def photo(size: tuple[int, int]) -> Image.Image:
    return load_image(PHOTO).resize(size, Image.Resampling.BICUBIC)


def measure(pipe: Pipeline, image: Image.Image, reps: int, new: int, warm: bool) -> dict:
    """Median ms of each stage over `reps` answers (one warm-up first unless `warm`: the
    sessions have run already), and the sizes."""
    rows = []
    for i in range(int(not warm), reps + 1):
        t0 = time.perf_counter()
        pixels = pipe.preprocess([image])
        t1 = time.perf_counter()
        ids = pipe.prompt_ids(PROMPT, pipe.image_tokens(pixels)[0])
        (r,) = pipe.generate(pixels, [ids], Sampling(max_new_tokens=new))
        t = r.timings_ms
        row = {"preprocess_ms": (t1 - t0) * 1e3, "vision_ms": t["vision"]}
        row["prefill_ms"] = t["embed"] + t["prefill"]
        row["ttft_ms"] = row["preprocess_ms"] + row["vision_ms"] + row["prefill_ms"]
        row["decode_tokens_per_s"] = (len(r.token_ids) - 1) / (t["decode"] / 1e3)
        if i:  # the first answer warms the sessions up
            rows.append(row)
    out = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    grid = pixels[0][1][0]
    out["grid"] = f"{grid[2] * 14}x{grid[1] * 14}"  # W x H, as the sizes are named
    out["image_tokens_unpruned"] = int(grid[1] * grid[2] // 4)
    out["image_tokens"] = pipe.image_tokens(pixels)[0]
    out["prompt_tokens"] = len(ids)
    out["kv_cache_bytes"] = kv_cache_bytes(pipe.text, len(ids) + new)
    return out


def profile(bundles: dict[str, Path], sizes: dict, reps: int, new: int, threads: int) -> list:
    rows = []
    for k, bundle in bundles.items():
        release_freed_memory()
        reset_peak_rss()
        pipe = Pipeline(bundle, SessionConfig(provider="cpu", threads=threads))
        pipe.text[C.T_EOS] = []  # exactly `new` tokens
        for i, (name, size) in enumerate(sizes.items()):
            row = {"k": k, "size": name, **measure(pipe, photo(size), reps, new, warm=i > 0)}
            row["peak_rss_mb"] = rss_mb()[1]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del pipe
    return rows


def table(rows: list[dict]) -> str:
    """The README's Markdown table: one row per (size, K)."""
    head = "| image | K | image tokens | prompt | vision ms | prefill ms | TTFT ms | KV MiB |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(SIZES).index(r["size"]), -r["image_tokens"])):
        lines.append(
            f"| {r['size']} ({r['grid']}) | {r['k']} | {r['image_tokens']} of "
            f"{r['image_tokens_unpruned']} | {r['prompt_tokens']} | {r['vision_ms']:.0f} | "
            f"{r['prefill_ms']:.0f} | {r['ttft_ms']:.0f} | {r['kv_cache_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from export import load

    ap = argparse.ArgumentParser(prog="python -m bench.qwen_profile", description=__doc__)
    ap.add_argument("-m", "--model", type=Path, help="local Qwen2.5-VL checkpoint")
    ap.add_argument("--preset", choices=("tiny", "medium"), default="tiny")
    ap.add_argument("--k", nargs="+", default=[ALL, "256", "64", "16"])
    ap.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-o", "--out", type=Path, default=REPO / "build" / "profile")
    ap.add_argument("--bundles", type=Path, default=REPO / "build", help="bundle folder")
    args = ap.parse_args(argv)
    src = load.checkpoint(args.model, args.preset, C.FAMILY_QWEN25VL)
    bundles, saved = {}, 0
    for k in args.k:  # shared right after each export: never two 12 GiB decoders on disk
        bundles[k] = export(src, k, args.bundles / f"{src.name}-k{k}")
        saved += share_text_graphs(next(iter(bundles.values())), bundles[k])
    print(f"text graphs shared between bundles: {saved / 2**30:.1f} GiB saved", file=sys.stderr)
    sizes = {name: SIZES[name] for name in args.sizes}
    rows = profile(bundles, sizes, args.reps, args.new_tokens, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    (args.out / "qwen.json").write_text(json.dumps({"source": str(src), "rows": rows}, indent=1))
    md = table(rows)
    (args.out / f"qwen-{digest}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
