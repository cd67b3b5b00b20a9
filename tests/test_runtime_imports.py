"""The runtime is what ships to the device: importing it must not pull in torch & co."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

FORBIDDEN = ("torch", "transformers", "optimum", "svdprune_onnx", "export")


def test_runtime_imports_no_torch() -> None:
    code = (
        "import sys, pkgutil, importlib, runtime\n"
        "for m in pkgutil.iter_modules(runtime.__path__):\n"
        "    importlib.import_module('runtime.' + m.name)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"runtime imported {proc.stdout.strip()}"
