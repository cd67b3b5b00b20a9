"""Write a bundle atomically: build in a hidden temp folder, validate, then rename into place.

    build/.tiny-llava-k16.tmp-<pid>/   <- graphs, side files, manifest (written last)
          │ all parity checks passed
          └─ rename ─► build/tiny-llava-k16/

A failed or interrupted export leaves only a hidden `.tmp-` folder (removed on failure, swept on
the next export), never a folder that looks like a bundle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from runtime import contract as C
from runtime.bundle import sha256_file

PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu")


def package_versions() -> dict[str, str]:
    """Versions of the exporter's packages, for the manifest."""
    out = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the checkpoint's config / tokenizer / processor files that exist; return their names."""
    copied = []
    for name in C.HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_manifest(root: Path, manifest: dict) -> None:
    """Hash every file under `root`, then write svdprune.json (last, so it marks completeness)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != C.MANIFEST_FILE)
    manifest[C.KEY_FILES] = {p.relative_to(root).as_posix(): sha256_file(p) for p in files}
    tmp = root / (C.MANIFEST_FILE + ".part")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / C.MANIFEST_FILE)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it or pass --overwrite")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.tmp-{os.getpid()}-old"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
