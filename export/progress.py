"""Progress bars for the long export steps (weight streaming, quantization, parity).

tqdm on stderr while stdout is a terminal; silent otherwise (CI logs, `make test`, pipes), where
the step lines of `python -m export` already say what runs.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def steps(items, desc: str):
    """`items` with a bar of one tick per item (parity batches and decode steps)."""
    items = list(items)
    with bar(len(items), desc) as progress:
        for item in items:
            yield item
            progress.update(1)


def bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A context-managed bar; unit "B" scales to kB/MB/GB."""
    return tqdm(
        total=total,
        desc=f"      {desc}",
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        leave=False,
        dynamic_ncols=True,
        disable=not sys.stdout.isatty(),
    )
