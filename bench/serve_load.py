"""`make bench-serve`: a bounded load on the OpenAI-compatible server, alone and on Ray Serve.

    for each target (runtime.serve; runtime.serve_ray with 1, 2 replicas), a fresh subprocess on
    a free 127.0.0.1 port, ready when /health answers:
        for each concurrency C: N streaming requests (real photos as data URIs, greedy,
        max_tokens fixed) from C client threads, then the next level; no retries
        peak RSS of the server's process tree (/proc, every 100 ms; Ray: replicas, and all)
    report: req/s, completion tokens/s, p50/p95 latency, p50 time to first token (first content
            chunk), errors, peak RSS; a Markdown table and build/bench/serve_load.json

Load goes to 127.0.0.1 only, a fixed number of requests per level; it stops by itself.

    python -m bench.serve_load -m build/tiny-llava-k16 [--requests 48] [--concurrency 1 4 16]
                               [--ray-replicas 1 2] [--max-tokens 32] [--provider cpu]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from runtime.profile_report import load_average, md_table

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "images"
OUT = REPO / "build" / "bench" / "serve_load.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROMPTS = ("What is in the image?", "Describe the scene.", "What colours do you see?")


def data_uris() -> list[str]:
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    if not photos:
        raise SystemExit(f"error: no photos in {PHOTOS}")
    kinds = {".png": "png", ".jpg": "jpeg"}
    return [
        f"data:image/{kinds[p.suffix.lower()]};base64,{base64.b64encode(p.read_bytes()).decode()}"
        for p in photos
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in its own session (Ray's processes with it), stopped with SIGINT."""

    def __init__(self, argv: list[str], log: Path, port: int) -> None:
        self.url, self.log = f"http://127.0.0.1:{port}", log
        with log.open("w") as f:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"error: the server exited ({self.proc.returncode}); see {self.log}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise SystemExit(f"error: the server was not ready in {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class RssSampler(threading.Thread):
    """Peak RSS (MiB) of a process tree, from /proc: every process, and Ray Serve replicas alone
    (their process title names them)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop_flag = pid, threading.Event()
        self.peak_all = self.peak_replicas = 0.0
        self.page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:  # the parent pid is the 2nd field after the parenthesised command
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def run(self) -> None:
        while not self.stop_flag.wait(0.1):
            total = replicas = 0.0
            for pid in self.tree():
                try:
                    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self.page_mb
                    title = Path(f"/proc/{pid}/cmdline").read_bytes()
                except (OSError, IndexError, ValueError):
                    continue
                total += rss
                replicas += rss if b"ServeReplica" in title else 0.0
            self.peak_all = max(self.peak_all, total)
            self.peak_replicas = max(self.peak_replicas, replicas)


def one_request(client: httpx.Client, url: str, body: dict) -> dict:
    """Stream one answer: latency, time to first content, completion tokens, or the error."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    except httpx.HTTPError as e:
        return {"error": repr(e)}
    end = time.perf_counter()
    return {"latency_s": end - t0, "ttft_s": (first or end) - t0, "tokens": tokens}


def load_level(url: str, uris: list[str], requests: int, concurrency: int, tokens: int) -> dict:
    """`requests` requests from `concurrency` threads; throughput, latency and TTFT figures."""
    results: list[dict] = []
    counter, lock = iter(range(requests)), threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=300) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": uris[i % len(uris)]}},
                                {"type": "text", "text": PROMPTS[i % len(PROMPTS)]},
                            ],
                        }
                    ],
                    "max_tokens": tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                out = one_request(client, url, body)
                with lock:
                    results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    latency = [r["latency_s"] * 1e3 for r in ok] or [float("nan")]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": len(results) - len(ok),
        "error_samples": [r["error"] for r in results if "error" in r][:3],
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "latency_ms_p50": statistics.median(latency),
        "latency_ms_p95": float(np.percentile(latency, 95)),
        "ttft_ms_p50": statistics.median([r["ttft_s"] * 1e3 for r in ok] or [float("nan")]),
    }


def run_target(name: str, argv: list[str], args: argparse.Namespace, uris: list[str]) -> list:
    port = free_port()
    log = OUT.parent / f"serve_load-{name}.log"
    print(f"{name}: starting ({' '.join(argv[2:])}) ...", flush=True)
    server = ServerProcess([*argv, "--port", str(port)], log, port)
    rows = []
    try:
        server.wait_ready()
        load_level(server.url, uris, 2, 1, args.max_tokens)  # warm-up: arenas, first batch
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        for c in args.concurrency:
            row = {
                "target": name,
                **load_level(server.url, uris, args.requests, c, args.max_tokens),
            }
            row["peak_rss_mb"] = sampler.peak_all
            row["peak_rss_replicas_mb"] = sampler.peak_replicas or None
            rows.append(row)
            print(
                f"  concurrency {c:3d}: {row['req_per_s']:.2f} req/s, "
                f"{row['tokens_per_s']:.0f} tokens/s, errors {row['errors']}",
                flush=True,
            )
        sampler.stop_flag.set()
    finally:
        server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, required=True, help="bundle folder")
    ap.add_argument("--host", default="127.0.0.1", help="only the loopback is accepted")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--ray-replicas", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="the servers' ORT intra-op threads")
    args = ap.parse_args(argv)
    if args.host not in LOOPBACK:
        print(f"error: --host {args.host}: the load test only targets 127.0.0.1", file=sys.stderr)
        return 2
    if not (args.model / "svdprune.json").is_file():
        print(f"error: {args.model} is not a bundle; run `make export` first", file=sys.stderr)
        return 2
    if args.requests < 1 or min(args.concurrency) < 1 or args.max_tokens < 1:
        print("error: --requests, --concurrency and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    OUT.parent.mkdir(parents=True, exist_ok=True)
    uris, load_start = data_uris(), load_average()
    common = ["-m", str(args.model), "--provider", args.provider, "--host", "127.0.0.1"]
    common += ["--max-batch", str(args.max_batch), "--threads", str(args.threads)]
    targets = [("single", [sys.executable, "-m", "runtime.serve", *common])]
    targets += [
        (f"ray-{n}", [sys.executable, "-m", "runtime.serve_ray", *common, "--replicas", str(n)])
        for n in args.ray_replicas
    ]
    rows = [row for name, cmd in targets for row in run_target(name, cmd, args, uris)]
    report = {
        "bundle": str(args.model.resolve()),
        "requests_per_level": args.requests,
        "max_tokens": args.max_tokens,
        "provider": args.provider,
        "max_batch": args.max_batch,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "rows": rows,
    }
    OUT.write_text(json.dumps(report, indent=2))
    header = [
        "target",
        "concurrency",
        "req/s",
        "tokens/s",
        "p50 ms",
        "p95 ms",
        "p50 TTFT ms",
        "errors",
        "peak RSS MiB",
    ]
    table = [
        [
            r["target"],
            r["concurrency"],
            f"{r['req_per_s']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['latency_ms_p50']:.0f}",
            f"{r['latency_ms_p95']:.0f}",
            f"{r['ttft_ms_p50']:.0f}",
            r["errors"],
            _rss(r),
        ]
        for r in rows
    ]
    print(md_table(header, table))
    print(
        f"load average {load_start} at the start, {report['load_average_end']} at the end; "
        f"{args.requests} requests per level, max_tokens {args.max_tokens}; wrote {OUT}"
    )
    return 0


def _rss(r: dict) -> str:
    if r["peak_rss_replicas_mb"]:  # Ray: the replicas, then every process of the instance
        return f"{r['peak_rss_replicas_mb']:.0f} ({r['peak_rss_mb']:.0f} all)"
    return f"{r['peak_rss_mb']:.0f}"


if __name__ == "__main__":
    sys.exit(main())
