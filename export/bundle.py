"""Write a bundle atomically: build in a hidden temp folder, validate, then rename into place.

    build/.tiny-llava-k16.tmp-<pid>/   <- graphs, side files, manifest (written last)
          │ all parity checks passed
          └─ rename ─► build/tiny-llava-k16/

A failed or interrupted export leaves only a hidden `.tmp-` folder (removed on failure, swept on
the next export), never a folder that looks like a bundle.

Safety rules:
  - `out` is replaced only when it is a bundle (has svdprune.json) or an empty folder; any other
    existing path is user data and is refused, never deleted;
  - one export per output at a time: `build/.tiny-llava-k16.lock` is held (flock) from the
    temp folder's creation to the rename; a second export to the same `out` fails at once with
    a clear error instead of sweeping the first one's temp folder. Exports that do not overlap
    replace each other atomically (last writer wins; each result is a complete bundle);
  - a full disk (ENOSPC/EDQUOT) or an unwritable output becomes an OutputError naming the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from runtime import contract as C
from runtime.bundle import sha256_file


class OutputError(RuntimeError):
    """The output folder cannot be written (exists and is not a bundle, busy, disk full)."""


# OSErrors that the user fixes (space, permissions), reported as one line instead of a traceback.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}

# Graphs whose weights pass this are saved with external data: protobuf caps a file at 2 GiB,
# and the graph itself needs room beside the weights.
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def data_file(graph: Path) -> Path:
    """The external-data file of an ONNX graph (`x.onnx` -> `x.onnx_data`), present or not."""
    return graph.with_name(graph.name + C.EXTERNAL_DATA_SUFFIX)


# pillow: its resize is part of the pixels (Pillow 13 changed the pass order of some resizes)
PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "pillow")


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


def write_manifest(root: Path, manifest: dict, only: str | None = None) -> None:
    """Hash every file under `root` (or just the new file `only`, the others being hashed
    already), then write svdprune.json (last, so it marks completeness)."""
    if only is not None:
        manifest[C.KEY_FILES][only] = sha256_file(root / only)
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != C.MANIFEST_FILE)
        manifest[C.KEY_FILES] = {p.relative_to(root).as_posix(): sha256_file(p) for p in files}
    tmp = root / (C.MANIFEST_FILE + ".part")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / C.MANIFEST_FILE)


def _check_replaceable(out: Path) -> None:
    # Only a bundle or an empty folder may be replaced: anything else is somebody's data.
    if not out.exists() and not out.is_symlink():
        return
    is_folder = out.is_dir() and not out.is_symlink()
    if is_folder and ((out / C.MANIFEST_FILE).is_file() or not any(out.iterdir())):
        return
    raise OutputError(
        f"{out} exists and is not a bundle (no {C.MANIFEST_FILE}); refusing to replace it: "
        "pass another -o, or move it away yourself"
    )


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out` (non-blocking flock) or raise OutputError if busy."""
    path = out.parent / f".{out.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder unlinks the file on release: a lock on an unlinked inode guards nothing.
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError) as e:
            raise OutputError(
                f"another export to {out} is running (lock {path}); wait for it to finish or "
                "pass another -o"
            ) from e
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            _check_replaceable(out)
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out} exists; remove it or pass --overwrite")
            for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed export
                shutil.rmtree(stale, ignore_errors=True)
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
            try:
                os.replace(tmp, out)
            except BaseException:  # interrupted between the two renames: put the old one back
                if old.exists() and not out.exists():
                    os.replace(old, out)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except OutputError:
        raise
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise
        fix = (
            "free space (an export needs about the bundle's size free beside it)"
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check that path's permissions"
        )
        raise OutputError(
            f"export to {out} failed: {e.strerror or e} ({e.filename or out}); {fix} or pass "
            "-o on another disk; nothing was left behind and the previous bundle, if any, is intact"
        ) from e
