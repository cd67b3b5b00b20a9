"""`make bench-peers`: our runtime vs ORT GenAI, transformers.js and PyTorch, on one bundle.

    python -m export --preset P --k K          (once, when the bundle is missing)
      │  the same bundle, photo, prompt, K and greedy TOKENS for every peer
      ▼
    REPS rounds, interleaved: ours, genai, tjs, torch, ours, ...  each a fresh process
      ours   bench/peer_workers.py ours    runtime.generate.Pipeline
      genai  bench/peer_workers.py genai   examples/ortgenai/generate.py (ORT GenAI's loop)
      tjs    examples/node/peer_timing.mjs transformers.js in Node (build/node-cache/<hash>)
      torch  bench/peer_workers.py torch   LlavaForConditionalGeneration.generate on the
                                           checkpoint, fed the same pruned features
      each:  load ─► warm-up answer ─► timed answer ─► VmHWM (its own peak RSS) ─► JSON
             timed: image file ─► preprocess ─► vision+prune ─► prefill ─► 1st token ─► decode
      ▼
    medians ─► Markdown table (ratios to ours), token agreement with ours,
               build/bench-peers/<preset>-k<K>.{json,png}

    python -m bench.peers [--preset tiny|medium] [--k 16] [--image F] [--prompt T]
                          [--tokens 32] [--reps 3] [--threads N] [--peers ours genai tjs torch]

Every peer stops at eos or TOKENS. TTFT is the median repetition's (median_low), with its own
parts; the other figures are medians. A stage a peer does not expose is left blank ("-").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import environment, md_table
from runtime import contract as C
from runtime.profile import DEFAULT_IMAGE, DEFAULT_PROMPT

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "build" / "bench-peers"
NODE_SCRIPT = "peer_timing.mjs"
PEERS = ("ours", "genai", "tjs", "torch")
LABELS = {"ours": "ours (runtime.generate)", "genai": "ONNX Runtime GenAI",
          "tjs": "transformers.js (Node)", "torch": "PyTorch eager generate"}  # fmt: skip
STAGES = ("preprocess", "vision", "prefill")  # the parts of TTFT, where a peer exposes them
PARTS = (*[f"{s}_ms" for s in STAGES], "vision_prefill_ms")
PEER_TIMEOUT_S = 900
MIB = 1024  # kiB per MiB


class PeerError(RuntimeError):
    """A peer failed or is not available; the message says which and why."""


def ensure_bundle(preset: str, k: int, bundle: Path | None, genai: bool) -> Path:
    """The bundle `python -m export --preset P --k K [-o bundle]` writes, exported if missing
    or (for the GenAI peer) written by an exporter that predates ORT GenAI's files."""
    from export.__main__ import bundle_path, parse_args

    argv = ["--preset", preset, "--k", str(k), *(["-o", str(bundle)] if bundle else [])]
    path = bundle_path(parse_args(argv))
    manifest = path / C.MANIFEST_FILE
    m = json.loads(manifest.read_text()) if manifest.is_file() else None
    if m is None or (genai and C.KEY_GENAI not in m):
        print(f"exporting {path} (python -m export {' '.join(argv)}) ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "export", *argv], cwd=REPO,
                              stdout=sys.stderr)  # fmt: skip
        if proc.returncode != 0:
            raise PeerError(f"python -m export {' '.join(argv)} failed ({proc.returncode})")
        m = json.loads(manifest.read_text())
    if genai and m[C.KEY_GENAI][C.GN_UNSUPPORTED]:
        raise PeerError(f"ORT GenAI cannot run {path}: {m[C.KEY_GENAI][C.GN_UNSUPPORTED]}")
    return path


def tjs_dir() -> Path:
    """bench.tjs_agreement's npm cache (transformers.js as pinned), with our script beside it."""
    from bench.tjs_agreement import NODE_DIR, node_cache

    try:
        cache = node_cache()
    except RuntimeError as e:  # no node/npm, or npm ci failed
        raise PeerError(f"transformers.js peer: {e}") from e
    shutil.copy2(NODE_DIR / NODE_SCRIPT, cache / NODE_SCRIPT)
    return cache


def run_peer(name: str, req: dict, tmp: Path, node_dir: Path | None) -> dict:
    """One peer, one repetition, in its own process; its JSON result plus the process's wall."""
    request, out = tmp / f"{name}-request.json", tmp / f"{name}-out.json"
    request.write_text(json.dumps(req))
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    if name == "tjs":
        from bench.tjs_agreement import run_node

        try:
            run_node(node_dir, NODE_SCRIPT, str(request), str(out))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            raise PeerError(f"peer tjs failed: {e}") from e
    else:
        cmd = [sys.executable, "-m", "bench.peer_workers", name, str(request), str(out)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  timeout=PEER_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise PeerError(f"peer {name} ran past {PEER_TIMEOUT_S} s") from e
        if proc.returncode != 0:
            raise PeerError(f"peer {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()) | {"process_s": time.perf_counter() - t}


def figures(r: dict) -> dict:
    """The reported figures of one result: TTFT and its parts, decode tok/s, host ms/token."""
    steps = len(r["token_ids"]) - 1
    tps = steps / (r["decode_ms"] / 1e3) if steps > 0 and r["decode_ms"] > 0 else None
    host = None
    if r.get("decode_in_graph_ms") is not None and steps > 0:
        host = (r["decode_ms"] - r["decode_in_graph_ms"]) / steps
    stages = {f"{s}_ms": r["stages_ms"].get(s) for s in STAGES}
    after = r["ttft_ms"] - stages["preprocess_ms"]  # vision + prefill, split or not
    return {"ttft_ms": r["ttft_ms"], **stages, "vision_prefill_ms": after,
            "decode_tokens_per_s": tps, "host_ms_per_token": host,
            "peak_rss_mib": r["peak_rss_kib"] / MIB if r.get("peak_rss_kib") else None,
            "load_ms": r["load_ms"], "tokens": len(r["token_ids"])}  # fmt: skip


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per peer: the median of each figure, ratios to ours, and token agreement with ours."""
    ours = runs["ours"][0]["token_ids"] if "ours" in runs else None
    out = {}
    for name, reps in runs.items():
        rows = [figures(r) for r in reps]
        med = {}
        for key in rows[0]:
            vals = [row[key] for row in rows if row[key] is not None]
            med[key] = statistics.median(vals) if vals else None
        # TTFT's parts from the repetition of median TTFT, so that they add up to it
        mid = statistics.median_low(row["ttft_ms"] for row in rows)
        middle = next(row for row in rows if row["ttft_ms"] == mid)
        med |= {key: middle[key] for key in ("ttft_ms", *PARTS)}
        out[name] = {"median": med, "reps": rows, "token_ids": reps[0]["token_ids"],
                     "tokens_stable": all(r["token_ids"] == reps[0]["token_ids"] for r in reps),
                     "same_tokens_as_ours": None if ours is None else
                     all(r["token_ids"] == ours for r in reps)}  # fmt: skip
    if "ours" in out:
        base = out["ours"]["median"]
        for s in out.values():
            s["ratio_to_ours"] = {
                key: s["median"][key] / base[key] if s["median"][key] and base[key] else None
                for key in ("ttft_ms", "decode_tokens_per_s", "peak_rss_mib")
            }
    return out


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(summary: dict[str, dict]) -> str:
    """Markdown: per peer the medians and each as a ratio to ours."""
    head = ["peer", "TTFT ms", "TTFT / ours", "preprocess", "vision+prune", "prefill",
            "vision+prefill",
            "decode tok/s", "tok/s / ours", "host ms/token", "peak RSS MiB", "RSS / ours",
            "load ms", "tokens", "same tokens as ours"]  # fmt: skip
    body = []
    for name, s in summary.items():
        m, r = s["median"], s.get("ratio_to_ours", {})
        same = {None: "-", True: "yes", False: "NO"}[s["same_tokens_as_ours"]]
        body.append([LABELS[name], _f(m["ttft_ms"]), _f(r.get("ttft_ms"), ".2f"),
                     *[_f(m[f"{st}_ms"]) for st in STAGES], _f(m["vision_prefill_ms"]),
                     _f(m["decode_tokens_per_s"]),
                     _f(r.get("decode_tokens_per_s"), ".2f"), _f(m["host_ms_per_token"], ".2f"),
                     _f(m["peak_rss_mib"], ".0f"), _f(r.get("peak_rss_mib"), ".2f"),
                     _f(m["load_ms"], ".0f"), _f(m["tokens"], ".0f"), same])  # fmt: skip
    return md_table(head, body)


def plot(summary: dict[str, dict], title: str, path: Path) -> Path | None:
    """Bars: TTFT split by stage, decode tokens/s and peak RSS per peer (None without mpl)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(summary)
    med = [summary[n]["median"] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    bottom = [0.0] * len(names)
    for stage in STAGES:
        vals = [m[f"{stage}_ms"] or 0.0 for m in med]
        axes[0].bar(names, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    rest = [max(0.0, (m["ttft_ms"] or 0) - b) for m, b in zip(med, bottom, strict=True)]
    axes[0].bar(names, rest, bottom=bottom, label="not split", color="lightgrey")
    axes[0].set(title="time to first token (ms)")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [m["decode_tokens_per_s"] or 0 for m in med], color="tab:green")
    axes[1].set(title="decode tokens/s")
    axes[2].bar(names, [m["peak_rss_mib"] or 0 for m in med], color="tab:purple")
    axes[2].set(title="peak RSS (MiB)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def versions() -> dict:
    """Package versions of the peers, beside bench.report's environment."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "onnxruntime-genai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    node = shutil.which("node")
    if node:
        out["node"] = subprocess.run(
            [node, "--version"], capture_output=True, text=True
        ).stdout.strip()
    pkg = json.loads((REPO / "examples" / "node" / "package.json").read_text())
    out["transformers.js"] = pkg["dependencies"]["@huggingface/transformers"]
    return out


def run(args: argparse.Namespace) -> dict:
    """Export if needed, run the peers interleaved, write the JSON and PNG; returns the report."""
    bundle = ensure_bundle(args.preset, args.k, args.bundle, "genai" in args.peers)
    node_dir = tjs_dir() if "tjs" in args.peers else None
    env = {**environment(), **versions(), "platform": platform.platform()}
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    req = {"bundle": str(bundle.resolve()), "image": str(Path(args.image).resolve()),
           "prompt": args.prompt, "max_new_tokens": args.tokens, "warmup": not args.no_warmup,
           "provider": args.provider, "threads": args.threads}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in args.peers}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        for rep in range(args.reps):
            for name in args.peers:
                r = run_peer(name, req, Path(tmp), node_dir)
                runs[name].append(r)
                print(f"  rep {rep + 1}/{args.reps} {name}: TTFT {r['ttft_ms']:.1f} ms, "
                      f"{len(r['token_ids'])} tokens, decode {r['decode_ms']:.1f} ms, "
                      f"process {r['process_s']:.1f} s", flush=True)  # fmt: skip
    summary = summarise(runs)
    settings = {"preset": args.preset, "k": args.k, "bundle": str(bundle), "image": req["image"],
                "prompt": args.prompt, "tokens": args.tokens, "reps": args.reps,
                "warmup": req["warmup"], "provider": args.provider,
                "threads": args.threads}  # fmt: skip
    report = {"environment": env, "settings": settings, "peers": summary, "table": table(summary)}
    out = args.out / f"{args.preset}-k{args.k}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    title = f"{args.preset} K={args.k}, {args.tokens} tokens, median of {args.reps}, CPU, {threads}"
    png = plot(summary, title, out.with_suffix(".png"))
    print(f"\n## Peers on one bundle ({title})\n\n{report['table']}\n")
    if not args.threads and "genai" in summary:
        print(f"note: default threads: ORT GenAI takes cores/2 intra-op threads "
              f"({max(1, (os.cpu_count() or 2) // 2)} here), the others one per core; "
              "--threads N (make THREADS=N) gives every peer N")  # fmt: skip
    for name, s in summary.items():
        if s["same_tokens_as_ours"] is False:
            print(f"note: {name}'s greedy tokens differ from ours: {s['token_ids']}")
        if not s["tokens_stable"]:
            print(f"note: {name}'s tokens changed between repetitions")
    print(f"wrote {out.with_suffix('.json')}" + (f" and {png}" if png else ""))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="export's --preset: tiny, medium, ...")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--bundle", type=Path, help="bundle folder (default: export's own path)")
    ap.add_argument("-i", "--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens (greedy; eos stops)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--provider", default="cpu", help="our runtime's provider (default cpu)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads of every peer (0: each library's default, one per "
        "core; on a busy machine 1 keeps spinning thread pools out of the figures)",
    )
    ap.add_argument("--no-warmup", action="store_true", help="time each process's first answer")
    ap.add_argument("-o", "--out", type=Path, default=OUT_DIR)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "ours" not in args.peers:
        args.peers.insert(0, "ours")  # the ratios' base
    try:
        run(args)
    except PeerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
