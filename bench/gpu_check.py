"""`make gpu-check`: one command that checks a machine's NVIDIA GPU paths end to end.

    no usable CUDA provider ─► say why, exit 0 (a CPU machine has nothing to check)
    medium preset (CLIP ViT-L/14-336 + Qwen2-0.5B shapes) x K = N, 64, 16 x fp32, q4f16
      ├─ export (missing bundles only, --batch 1 for TensorRT, JOBS in parallel)
      ├─ self-test on CPU (the reference), CUDA and TensorRT     runtime.bundle --selftest
      ├─ greedy tokens on CUDA / TensorRT vs CPU, 2 real photos  runtime.run --json
      └─ stage latencies on CUDA                                 runtime.profile
    ─► build/gpu-check/report.{json,md}

Every step runs as a subprocess with a timeout inside an overall budget (8 minutes on a 16-core
machine with one GPU): what does not fit is reported as skipped, never waited for. TensorRT
builds an engine per vision graph (minutes for CLIP-L), so it runs on the K = 16 bundles only.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtime.session import CUDA, TRT, unusable_reason

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "images"
PHOTOS = [IMAGES / "coco_cats.png", IMAGES / "waterview.jpg"]
QUESTION = "What is in the image?"
N_TOKENS = 576


def no_gpu_reason() -> str | None:
    """Why this machine has no GPU to check (no GPU listed, or no loadable CUDA provider)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi not found"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return "nvidia-smi lists no GPU"
    return unusable_reason(CUDA)


def bundle_name(k: int, dtype: str) -> str:
    return f"medium-k{k}-{dtype}"


def _run(cmd: list[str], deadline: float, cap: float) -> dict:
    """Run one step; {ok, rc, seconds, out, err} (err tail), or skipped when out of budget."""
    left = deadline - time.monotonic()
    if left < 10:
        return {"ok": False, "skipped": "out of time budget", "cmd": cmd}
    t = time.monotonic()
    try:
        p = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=min(cap, left), check=False
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "skipped": f"timed out after {min(cap, left):.0f} s", "cmd": cmd}
    return {
        "ok": p.returncode == 0,
        "rc": p.returncode,
        "seconds": round(time.monotonic() - t, 1),
        "out": p.stdout,
        "err": p.stderr[-2000:],
        "cmd": cmd,
    }


def export_step(out: Path, k: int, dtype: str, deadline: float) -> dict:
    bundle = out / "bundles" / bundle_name(k, dtype)
    if (bundle / "svdprune.json").is_file():
        return {"ok": True, "cached": True}
    cmd = [sys.executable, "-m", "export", "--preset", "medium", "--k", str(k), "--dtype", dtype]
    cmd += ["--batch", "1", "-o", str(bundle)]
    if k == N_TOKENS:
        cmd += ["--method", "none"]
    return _run(cmd, deadline, cap=300)


def selftest_step(bundle: Path, provider: str, deadline: float) -> dict:
    cmd = [sys.executable, "-m", "runtime.bundle", str(bundle), "--selftest", "--json"]
    r = _run([*cmd, "--provider", provider], deadline, cap=300)
    if r.get("rc") in (0, 1):  # 1: ran, failed the floors (the report says why)
        r["report"] = json.loads(r["out"].strip().splitlines()[-1])
    return r


def tokens_step(bundle: Path, provider: str, deadline: float) -> dict:
    cmd = [sys.executable, "-m", "runtime.run", "-m", str(bundle), "-p", QUESTION, "--json"]
    for photo in PHOTOS:
        cmd += ["-i", str(photo)]
    r = _run([*cmd, "--provider", provider, "--max-new-tokens", "16"], deadline, cap=300)
    if r["ok"]:
        r["token_ids"] = [json.loads(line)["token_ids"] for line in r["out"].splitlines()]
    return r


def profile_step(bundle: Path, out: Path, deadline: float) -> dict:
    cmd = [sys.executable, "-m", "runtime.profile", "-b", str(bundle), "--provider", "cuda"]
    cmd += ["--reps", "3", "-o", str(out / "profile" / bundle.name)]
    return _run(cmd, deadline, cap=240)


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check(out: Path, ks: list[int], dtypes: list[str], jobs: int, budget_s: float) -> dict:
    """Every step for every bundle; the report as a dict."""
    deadline = time.monotonic() + budget_s
    combos = [(k, d) for k in ks for d in dtypes]
    trt_reason = unusable_reason(TRT)
    report: dict = {"bundles": {}, "tensorrt": trt_reason or "usable", "budget_s": budget_s}
    with ThreadPoolExecutor(jobs) as pool:  # exports are CPU-bound: a few at once
        done = pool.map(lambda c: export_step(out, *c, deadline), combos)
        exports = dict(zip(combos, done, strict=True))
    for (k, dtype), exported in exports.items():
        bundle = out / "bundles" / bundle_name(k, dtype)
        row: dict = {"k": k, "dtype": dtype, "export": _brief(exported)}
        report["bundles"][bundle.name] = row
        if not exported["ok"]:
            continue
        providers = ["cpu", "cuda"] + (["tensorrt"] if k == min(ks) and not trt_reason else [])
        row["selftest"] = {p: _brief(selftest_step(bundle, p, deadline)) for p in providers}
        toks = {p: tokens_step(bundle, p, deadline) for p in providers}
        ref = toks["cpu"].get("token_ids")
        row["tokens_equal_prefix"] = {
            p: [same_prefix(a, b) for a, b in zip(t["token_ids"], ref, strict=True)]
            for p, t in toks.items()
            if p != "cpu" and ref and t.get("token_ids")
        }
        row["profile"] = _brief(profile_step(bundle, out, deadline))
    return report


def _brief(r: dict) -> dict:
    """A step's result without its full output (the selftest report is kept)."""
    keep = ("ok", "rc", "seconds", "skipped", "cached", "report")
    brief = {k: r[k] for k in keep if k in r}
    if not r.get("ok") and r.get("err"):
        brief["err"] = r["err"].strip().splitlines()[-1:]
    return brief


def markdown(report: dict) -> str:
    """The report as a Markdown table, one row per bundle."""
    lines = [
        "| bundle | export s | self-test cpu / cuda / tensorrt | tokens = CPU (prefix per photo) |",
        "|---|---|---|---|",
    ]
    for name, row in report["bundles"].items():
        verdicts = " / ".join(
            "ok" if s.get("ok") else ("skipped" if "skipped" in s else "FAIL")
            for s in row.get("selftest", {}).values()
        )
        prefixes = "; ".join(f"{p}: {v}" for p, v in row.get("tokens_equal_prefix", {}).items())
        exp = row["export"]
        secs = "cached" if exp.get("cached") else exp.get("seconds", exp.get("skipped", "-"))
        lines.append(f"| {name} | {secs} | {verdicts or '-'} | {prefixes or '-'} |")
    return "\n".join(lines) + f"\n\nTensorRT: {report['tensorrt']}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    ap.add_argument("-o", "--out", type=Path, default=REPO / "build" / "gpu-check")
    ap.add_argument("--k", type=int, nargs="+", default=[N_TOKENS, 64, 16])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "q4f16"])
    ap.add_argument("--jobs", type=int, default=3, help="exports at once")
    ap.add_argument("--budget-s", type=float, default=480.0, help="overall time budget")
    args = ap.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: no usable NVIDIA GPU here ({reason}); nothing to check")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    report = check(args.out, args.k, args.dtypes, args.jobs, args.budget_s)
    report["wall_s"] = round(time.monotonic() - t, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'report.json'} and report.md ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
