"""`make run` runs the bundle that `make export` writes for the same variables (MODEL or PRESET,
K, DTYPE, OUT): both name it through `python -m export --print-out` (export.__main__.bundle_path),
so nothing here exports; the make test swaps PY for a stub that records the commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.__main__ import bundle_path, cli, parse_args
from runtime import contract as C

from .conftest import REPO

BUILD = REPO / "build"


@pytest.fixture
def no_preset_builds(monkeypatch, tmp_path: Path) -> Path:
    """Presets resolve to their folder under a temp MODELS without being built."""
    import export.load
    import svdprune_onnx.tiny

    monkeypatch.setattr(export.load, "MODELS", tmp_path / "models")
    monkeypatch.setattr(svdprune_onnx.tiny, "build_tiny_llava", lambda out_dir, **kw: out_dir)
    return tmp_path / "models"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], BUILD / "tiny-llava-k16"),
        (["--k", "32", "--dtype", "q4"], BUILD / "tiny-llava-k32-q4"),
        (["--dtype", "fp32"], BUILD / "tiny-llava-k16"),
        (["--preset", "medium"], BUILD / "medium-llava-clip-qwen2-k16"),
        (["--preset", "medium", "--k", "64", "--dtype", "q4f16"],
         BUILD / "medium-llava-clip-qwen2-k64-q4f16"),
        (["-m", "ckpts/llava-1.5-7b-hf/", "--k", "8"], BUILD / "llava-1.5-7b-hf-k8"),
        (["-m", "ckpts/llava-1.5-7b-hf", "--dtype", "int8"], BUILD / "llava-1.5-7b-hf-k16-int8"),
        (["--dtype", "q4", "-o", "somewhere/b"], Path("somewhere/b")),  # OUT wins as given
    ],
)  # fmt: skip
def test_bundle_path(no_preset_builds, argv: list[str], expected: Path) -> None:
    assert bundle_path(parse_args(argv)) == expected


def test_print_out_prints_the_path_alone(no_preset_builds, capsys) -> None:
    """stdout is the path and nothing else, even when a preset is built (its note -> stderr)."""
    assert cli(["--preset", "medium", "--dtype", "q4", "--print-out"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{BUILD / 'medium-llava-clip-qwen2-k16-q4'}\n"
    assert "building tiny LLaVA checkpoint" in captured.err  # not built: only resolved
    assert not (no_preset_builds / "medium-llava-clip-qwen2").exists()


# The stub records every python call but the path query, which runs the real CLI.
STUB = """#!/bin/sh
case " $* " in
  *" --print-out "*) exec {python} "$@" ;;
  *" runtime.run "*) echo "RUN $*" ;;
  *) echo "EXPORT $*" ;;
esac
"""


def make_run(tmp_path: Path, **variables: str) -> list[str]:
    """`make run VAR=...` with PY stubbed and no venv step; the commands it ran, in order."""
    if shutil.which("make") is None:
        pytest.skip("no `make` on this machine")
    stub = tmp_path / "py"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    # A parent make (`make test K=32`) passes its variables down through MAKEFLAGS/environment.
    names = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "K", "MODEL", "PRESET", "DTYPE", "OUT",
             "QUALITY_GATE")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in names}
    args = [f"{k}={v}" for k, v in {"PY": str(stub), "STAMP": "", **variables}.items()]
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO), "run", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines()


def test_make_run_exports_the_missing_bundle_it_then_runs(tmp_path: Path) -> None:
    model = tmp_path / "my-llava"  # only its name matters: nothing is loaded
    lines = make_run(tmp_path, MODEL=str(model), K="8", DTYPE="q4", PROMPT="Any cats?")
    export, run = lines
    assert export.split() == ["EXPORT", "-m", "export", "--k", "8", "-m", str(model),
                              "--dtype", "q4"]  # fmt: skip
    assert f" -m {BUILD / 'my-llava-k8-q4'} " in run and run.startswith("RUN -m runtime.run")
    assert "-p Any cats?" in run


def test_make_run_uses_an_existing_out_bundle(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / C.MANIFEST_FILE).write_text("{}")
    (run,) = make_run(tmp_path, OUT=str(out), DTYPE="int8")  # exists: no export
    assert f"RUN -m runtime.run -m {out} -i " in run


def test_make_passes_the_quality_gate(tmp_path: Path) -> None:
    """QUALITY_GATE=warn reaches the export (a variant past its tolerance is kept, recorded)."""
    export, _ = make_run(tmp_path, MODEL=str(tmp_path / "m"), DTYPE="q4", QUALITY_GATE="warn")
    assert export.split()[-2:] == ["--quality-gate", "warn"]
