"""Peak memory of an export, per step: where `python -m export` holds the weights twice.

    python -m export ... (a child process, stdout piped)
      "[i/5] ..." step lines ─► the child's peak RSS since the previous step line (VmHWM from
                                /proc/<pid>/status, reset at each step through clear_refs)
      exit ─► the last step's peak: the child's own VmHWM, printed by an atexit hook (wait4's
              ru_maxrss would not do: at exec it inherits the parent's high-water mark, so a
              parent that held a model reports the model), wall time, bundle size on disk

    python -m bench.export_memory [--preset tiny|medium|...] [-- <more export flags>]
    python -m bench.export_memory --shape llava-1.5-7b -- --dtype q4f16   (~14 GB checkpoint)

Linux only (/proc). Every figure is the kernel's own high-water mark, so a short spike between
two samples is not missed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import models, shaped
from bench.report import environment, md_table
from bench.shaped import SHAPES
from runtime.profile import reset_peak_rss, status_kb

OUT_DIR = models.BENCH_DIR / "export_memory"
STEP = re.compile(r"^\[(\d+)/(\d+)\] (.*)")
PEAK = "@@export_memory peak kB "
# `python -m export` whose exit prints its own VmHWM (the last step's peak) on stdout.
_CHILD = (
    "import atexit, runpy, sys\n"
    "from runtime.profile import status_kb\n"
    f"atexit.register(lambda: print({PEAK!r} + str(int(status_kb('VmHWM'))), flush=True))\n"
    "sys.argv[0] = 'export'\n"
    "runpy.run_module('export', run_name='__main__', alter_sys=True)\n"
)
SAMPLE_S = 0.1
GIB = 2**30


def _hwm_bytes(pid: int) -> int | None:
    """The process's peak RSS since its last reset (VmHWM), or None once it has exited."""
    kib = status_kb("VmHWM", pid)
    return None if kib is None else int(kib) * 1024


def _reset_hwm(pid: int) -> None:
    if not reset_peak_rss(pid):
        raise SystemExit(f"error: cannot reset the peak RSS of pid {pid}; needs Linux >= 4.0")


def run_export(export_args: list[str], out: Path) -> dict:
    """Run one export into `out`; returns per-step peaks and seconds, wall time, overall peak."""
    cmd = [sys.executable, "-c", _CHILD, *export_args, "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=models.REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    steps: list[dict] = [{"step": "start (imports)", "peak_bytes": 0, "t0": time.perf_counter()}]
    lock = threading.Lock()

    def sample() -> None:  # keeps the current step's peak while the child runs
        while proc.poll() is None:
            hwm = _hwm_bytes(proc.pid)
            with lock:
                if hwm is not None:
                    steps[-1]["peak_bytes"] = max(steps[-1]["peak_bytes"], hwm)
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t_start = time.perf_counter()
    log = []
    last = 0
    for line in proc.stdout:
        if line.startswith(PEAK):
            last = int(line[len(PEAK) :]) * 1024
            continue
        log.append(line)
        match = STEP.match(line)
        if match:
            with lock:
                hwm = _hwm_bytes(proc.pid)
                if hwm is not None:
                    steps[-1]["peak_bytes"] = max(steps[-1]["peak_bytes"], hwm)
                    _reset_hwm(proc.pid)
                steps.append({"step": match.group(0).strip(), "peak_bytes": 0,
                              "t0": time.perf_counter()})  # fmt: skip
            print(f"  {line.rstrip()}", flush=True)
    status = proc.wait()
    wall = time.perf_counter() - t_start
    sampler.join()
    error = "".join(log[-20:]) if status != 0 else None
    ends = [s["t0"] for s in steps[1:]] + [t_start + wall]
    for s, end in zip(steps, ends, strict=True):
        s["seconds"] = end - s.pop("t0")
    steps[-1]["peak_bytes"] = max(steps[-1]["peak_bytes"], last)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    peak = max(s["peak_bytes"] for s in steps)
    return {"command": cmd[1:], "wall_s": wall, "peak_bytes": peak, "bundle_bytes": size,
            "steps": steps, "error": error}  # fmt: skip


def table(result: dict) -> str:
    body = [[s["step"][:70], f"{s['peak_bytes'] / GIB:.2f}", f"{s['seconds']:.1f}"]
            for s in result["steps"]]  # fmt: skip
    body.append(["whole export (largest step)", f"{result['peak_bytes'] / GIB:.2f}",
                 f"{result['wall_s']:.1f}"])  # fmt: skip
    return md_table(["step", "peak RSS GiB", "seconds"], body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.export_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--preset", default="tiny", help="export's --preset (tiny, medium, ...)")
    ap.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        help="instead of a preset: a checkpoint of this real model's shapes with random fp16 "
        "weights (bench/shaped.py, built once under build/models)",
    )
    ap.add_argument("--k", default="16")
    ap.add_argument("--keep", action="store_true", help="keep the exported bundle")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then more `python -m export` flags")
    args = ap.parse_args(argv)
    extra = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    source = ["--preset", args.preset]
    if args.shape:
        source = ["-m", str(shaped.build(args.shape))]
    name = "-".join([args.shape or args.preset, f"k{args.k}", *[a.lstrip("-") for a in extra]])
    out = OUT_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    result = run_export([*source, "--k", args.k, *extra], out)
    if not args.keep:  # the figures are the product; a medium bundle is 3.5 GB of disk
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{' '.join(result['command'])}: {result['wall_s']:.0f} s, bundle "
          f"{result['bundle_bytes'] / 2**20:.1f} MiB\n")  # fmt: skip
    print(table(result))
    report = OUT_DIR / f"{out.name}.json"
    report.write_text(json.dumps({"environment": env, **result}, indent=1) + "\n")
    print(f"\nwrote {report}")
    if result["error"]:  # the figures up to the failure are printed and saved above
        print(f"\nerror: the export failed:\n{result['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
