"""Small printing helpers shared by the benchmarks: Markdown tables and the environment.

The table and machine helpers are the runtime profiler's (runtime/profile_report.py), so every
report formats and describes the machine the same way; this adds what needs torch.
"""

from __future__ import annotations

import os
import platform

from runtime.profile_report import cpu_model, load_average, md_table

__all__ = ["cpu_model", "environment", "load_average", "md_table", "ok"]


def ok(flag: bool) -> str:
    """'on' / 'off' for a boolean setting."""
    return "on" if flag else "off"


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
