"""The runtime is what ships to the device: importing it must not pull in torch & co."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

# ray: the serving scale-out (runtime.serve_ray) imports it lazily, when it runs, never on import
FORBIDDEN = ("torch", "transformers", "optimum", "svdprune_onnx", "export", "ray")


def _imported(code: str) -> str:
    """What `code` (run in a fresh interpreter at the repo root) prints: the unwanted modules."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_runtime_imports_no_torch() -> None:
    code = (
        "import sys, pkgutil, importlib, runtime\n"
        "for m in pkgutil.iter_modules(runtime.__path__):\n"
        "    importlib.import_module('runtime.' + m.name)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    assert (bad := _imported(code)) == "", f"runtime imported {bad}"


def test_device_runtime_does_not_import_the_server() -> None:
    """The bare device install has no fastapi/uvicorn: runtime.run and the pipeline stay
    importable without the `serve` extra, and runtime.serve pulls in no ray or torch."""
    code = (
        "import sys, runtime.run, runtime.generate, runtime.generator\n"
        "bad = [m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules]\n"
        "import runtime.serve\n"
        f"bad += [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    assert (bad := _imported(code)) == "", f"imported {bad}"
