"""What runtime.profile writes and prints: environment, JSON/CSV/PNG, Markdown tables, targets.

    rows (one per bundle: K, method, every figure) + environment + settings
      ─► latency.json {rows, environment, settings, targets}
      ─► latency.csv (one line per row)
      ─► latency.png (matplotlib, optional): stacked stages per K + TTFT line | decode tokens/s
      ─► Markdown table + targets (PASS / MISS) on stdout

Runtime-only (stdlib + onnxruntime); matplotlib is imported only for the PNG, with a clear note
when it is missing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PRUNING_TARGET_PCT = 2.0
TTFT_TOLERANCE = 0.10
# Stacked in this order in latency.png; "pruning" is carved out of "vision" by the profiler's %.
PLOT_STAGES = ("preprocess", "vision", "pruning", "embed", "prefill", "decode", "other")
LEGEND = {"vision": "vision graph (tower + projector)", "pruning": "pruning (in vision graph)",
          "embed": "embed + scatter", "other": "other (host)"}  # fmt: skip


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 28) -> None:
        self.total, self.n, self.width, self.last = total, 0, width, 0
        self.tty = sys.stderr.isatty()

    def _draw(self, text: str) -> None:
        fill = round(self.width * self.n / max(self.total, 1))
        line = f"[{'#' * fill}{'.' * (self.width - fill)}] {self.n}/{self.total} {text}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.last))
            self.last = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def step(self, text: str) -> None:
        self.n += 1
        self._draw(text)

    def note(self, text: str) -> None:
        self._draw(text)

    def print(self, line: str) -> None:
        """A full line of output without breaking the bar."""
        if self.tty:
            sys.stderr.write("\r" + " " * self.last + "\r")
            self.last = 0
        print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- environment -----------------------------------------------------------------------------
def _cmd(*argv: str) -> str | None:
    """stdout of a command, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str | None:
    """nvidia-smi's GPU name(s), else a Jetson's device-tree model, else None."""
    names = _cmd("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader")
    if names:
        return "; ".join(names.splitlines())
    try:
        model = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
    except OSError:
        return None
    return model if "NVIDIA" in model or "Jetson" in model else None


def device_memory_mb() -> float | None:
    """GPU memory this process holds (nvidia-smi's per-process figure), None where unreported
    (no nvidia-smi, or a Jetson's integrated memory, which nvidia-smi does not list per process)."""
    out = _cmd(
        "nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"
    )
    if not out:
        return None
    mine = [line.split(",") for line in out.splitlines()]
    used = [float(m) for pid, m in mine if pid.strip() == str(os.getpid()) and m.strip().isdigit()]
    return sum(used) if used else None


def load_average() -> float | None:
    """1-minute load average: other processes on the machine disturb the timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def environment(rows: list[dict], load_at_start: float | None = None) -> dict:
    """What the figures depend on: CPU, cores, GPU, providers really used, versions, power mode."""
    import onnxruntime as ort

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu_model(),
        "providers_used": sorted(
            {r["provider_vision"] for r in rows} | {r["provider_text"] for r in rows}
        ),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers_available": ort.get_available_providers(),
        "jetson_power_mode": _cmd("nvpmodel", "-q"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": load_average(),
    }


# --- targets ---------------------------------------------------------------------------------
def targets(rows: list[dict]) -> list[dict]:
    """The issue's runtime targets: TTFT ratio vs the compute-only ideal, pruning share <= 2%."""
    out = []
    full = [r for r in rows if r["k"] == r["n"]]
    pruned = sorted((r for r in rows if r["k"] < r["n"]), key=lambda r: (r["k"] != 16, r["k"]))
    if full and pruned:
        f, p = full[0], pruned[0]
        actual = p["ttft_ms"] / f["ttft_ms"]
        # Ideal: only the graphs that K changes, vision + prefill; orchestration adds nothing.
        ideal = (p["vision_ms"] + p["prefill_ms"]) / (f["vision_ms"] + f["prefill_ms"])
        bare = (p["ttft_ms"] - p["preprocess_ms"]) / (f["ttft_ms"] - f["preprocess_ms"])
        dev, dev_bare = actual / ideal - 1, bare / ideal - 1
        out.append({
            "target": f"TTFT(K={p['k']}) / TTFT(K={f['k']}) within 10% of ideal "
                      "(vision + prefill)",
            "value": f"{actual:.3f} vs ideal {ideal:.3f} ({dev:+.1%}); "
                     f"without preprocess {bare:.3f} ({dev_bare:+.1%})",
            "pass": abs(dev) <= TTFT_TOLERANCE,
        })  # fmt: skip
    else:
        out.append({"target": "TTFT ratio vs ideal", "value": "needs K = N and a pruned K",
                    "pass": None})  # fmt: skip
    for r in pruned:
        out.append({
            "target": f"pruning share of the vision graph <= 2% (K={r['k']}, {r['method']})",
            "value": f"{r['pruning_pct']:.2f}% ({r['pruning_ms']:.2f} ms of "
                     f"{r['vision_profiled_ms']:.1f} ms)",
            "pass": r["pruning_pct"] <= PRUNING_TARGET_PCT,
        })  # fmt: skip
    return out


def format_targets(items: list[dict]) -> str:
    word = {True: "PASS", False: "MISS", None: "n/a "}
    return "\n".join(f"{word[t['pass']]}  {t['target']}: {t['value']}" for t in items)


# --- tables ----------------------------------------------------------------------------------
def fmt(x: object) -> str:
    """3 significant figures for floats, '-' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return str(x)


def md_table(head: list[str], body: list[list[object]]) -> str:
    """A GitHub Markdown table."""
    cells = [[fmt(c) for c in row] for row in [head, *body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]  # fmt: skip
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def stage_table(rows: list[dict]) -> str:
    """The per-stage medians (ms) per K, TTFT with its min-max, memory and compute."""
    head = ["K", "method", "prompt tok", "preprocess", "vision", "pruning %", "embed", "prefill",
            "TTFT [min-max]", "decode ms/tok", "tok/s", "e2e", "peak RSS MiB", "KV MiB",
            "prefill GFLOP"]  # fmt: skip
    body = [[r["k"], r["method"], r["prompt_tokens"], r["preprocess_ms"], r["vision_ms"],
             r["pruning_pct"], r["embed_ms"], r["prefill_ms"],
             f"{fmt(r['ttft_ms'])} [{fmt(r['ttft_ms_min'])}-{fmt(r['ttft_ms_max'])}]",
             r["decode_ms_per_token"], r["decode_tokens_per_s"], r["e2e_ms"], r["peak_rss_mb"],
             r["kv_cache_bytes"] / 2**20, r["prefill_gflops"]] for r in rows]  # fmt: skip
    return md_table(head, body)


# --- files -----------------------------------------------------------------------------------
def _clean(x: object) -> object:
    """NaN -> None so latency.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(_clean(r) for r in rows)


def write_png(rows: list[dict], path: Path) -> Path | None:
    """Panel 1: stacked stage medians per K and the TTFT line; panel 2: decode tokens/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {path.name} was not written "
              "(pip install matplotlib)", file=sys.stderr)  # fmt: skip
        return None
    labels = [f"K={r['k']}\n{r['method']}" for r in rows]
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    bottom = [0.0] * len(rows)
    for stage in PLOT_STAGES:
        vals = []
        for r in rows:
            prune = r["vision_ms"] * r["pruning_pct"] / 100
            v = {"vision": r["vision_ms"] - prune, "pruning": prune}.get(stage)
            vals.append(max(0.0, r[f"{stage}_ms"] if v is None else v))
        ax1.bar(x, vals, bottom=bottom, label=LEGEND.get(stage, stage))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax1.plot(x, [r["ttft_ms"] for r in rows], "k-o", label="time to first token")
    ax1.set(xticks=x, xticklabels=labels, ylabel="ms (median)",
            title=f"where the time goes ({rows[0]['new_tokens']} new tokens)")  # fmt: skip
    ax1.legend(fontsize=8)
    others = {k for r in rows for k in r if k.endswith("_decode_tokens_per_s")}
    series = ["decode_tokens_per_s", *sorted(others)]  # e.g. torch_decode_tokens_per_s
    width = 0.8 / len(series)
    for i, key in enumerate(series):
        name = "ONNX Runtime" if key == "decode_tokens_per_s" else key.split("_decode")[0]
        name = {"torch": "PyTorch eager"}.get(name, name)
        ax2.bar([v + i * width for v in x], [r.get(key) or 0 for r in rows], width, label=name)
    ax2.set(xticks=[v + (len(series) - 1) * width / 2 for v in x], xticklabels=labels,
            ylabel="tokens/s (median)", title="decode")  # fmt: skip
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(
    rows: list[dict],
    env: dict,
    settings: dict,
    out: Path,
    extra_targets: list[dict] | None = None,
    extra_tables: list[str] | None = None,
) -> dict:
    """latency.json, latency.csv, latency.png in `out`; table and targets on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    goals = targets(rows) + (extra_targets or [])
    doc = _clean({"rows": rows, "environment": env, "settings": settings, "targets": goals})
    (out / "latency.json").write_text(json.dumps(doc, indent=1))
    write_csv(rows, out / "latency.csv")
    png = write_png(rows, out / "latency.png")
    print(stage_table(rows))
    for table in extra_tables or []:
        print("\n" + table)
    print("\n" + format_targets(goals))
    where = ", ".join(str(p) for p in (out / "latency.json", out / "latency.csv", png) if p)
    print(f"\nwrote {where}  ({env['cpu']}, {env['cores']} cores, "
          f"providers {', '.join(env['providers_used'])})")  # fmt: skip
    return doc
