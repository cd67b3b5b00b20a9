"""Small printing helpers shared by the benchmarks: Markdown tables and the environment."""

from __future__ import annotations

import os
import platform


def ok(flag: bool) -> str:
    """'on' / 'off' for a boolean setting."""
    return "on" if flag else "off"


def md_table(head: list[str], body: list[list[object]]) -> str:
    """A GitHub Markdown table with columns padded to equal width."""
    cells = [[str(c) for c in row] for row in [head, *body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    pad = [[c.ljust(w) for c, w in zip(row, widths, strict=True)] for row in cells]
    lines = ["| " + " | ".join(row) + " |" for row in pad]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """1-minute load average: other processes on the machine disturb the timings."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def environment() -> dict[str, object]:
    """What the timings depend on: CPU, cores, package versions, machine load at the start."""
    import onnxruntime as ort
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load average at start": load_average(),
    }
