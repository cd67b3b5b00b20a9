"""The checkpoint and the bundles an evaluation needs: reuse what exists, export what is missing.

    build/eval/bundles/<model>-none-k<N>     the unpruned reference
    build/eval/bundles/<model>-<method>-k<K> one per exportable method and K
    exact                                    not exportable (torch.linalg.svd): its features come
                                             from PyTorch and run through the text graphs of the
                                             gram bundle at the same K (text graphs do not
                                             depend on the pruning method)

Exports run `python -m export` in a subprocess, so a 7B export's memory is returned before the
evaluation starts. The text graphs of every bundle of one checkpoint are byte-identical (same
sha256 in the manifests), so each new bundle's copies are replaced by hard links to the
reference bundle's files: 22 bundles of a 7B model take the disk of one decoder, not 22.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from runtime import contract as C

REPO = Path(__file__).resolve().parents[1]
EXACT, GRAM, NONE = "exact", "gram", "none"


class BundleMismatchError(ValueError):
    """An existing bundle folder holds something else; the message says what to delete."""


class ExportFailedError(RuntimeError):
    """`python -m export` failed; the message carries its last output lines."""


def export_args(model: Path | None, preset: str) -> list[str]:
    return ["-m", str(model)] if model is not None else ["--preset", preset]


def bundle_path(root: Path, src: Path, method: str, k: int) -> Path:
    return root / f"{src.name}-{method}-k{k}"


def share_files(bundle: Path, ref: Path) -> int:
    """Hard-link `bundle`'s graph files that are identical (by manifest sha256) to `ref`'s.

    Returns the bytes freed. The manifests' checksums stay valid: the content is the same.
    """
    files = json.loads((bundle / C.MANIFEST_FILE).read_text())[C.KEY_FILES]
    ref_files = json.loads((ref / C.MANIFEST_FILE).read_text())[C.KEY_FILES]
    freed = 0
    for rel, sha in files.items():
        mine, theirs = bundle / rel, ref / rel
        if not rel.startswith(C.ONNX_DIR) or ref_files.get(rel) != sha:
            continue
        if mine.stat().st_ino == theirs.stat().st_ino:
            continue
        tmp = mine.with_name(mine.name + ".link")
        os.link(theirs, tmp)
        os.replace(tmp, mine)  # atomic: the bundle never lacks the file
        freed += theirs.stat().st_size
    return freed


def ensure_bundle(
    root: Path, src: Path, args: list[str], method: str, k: int, ref: Path | None = None
) -> Path:
    """The bundle for (method, K), exported unless a matching one is already there.

    A new export shares its identical graph files with the `ref` bundle (hard links).
    """
    out = bundle_path(root, src, method, k)
    manifest = out / C.MANIFEST_FILE
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        p, source = m[C.KEY_PRUNING], Path(m[C.KEY_MODEL]["source"]).resolve()
        if (p[C.P_METHOD], p[C.P_K], source) != (method, k, src):
            raise BundleMismatchError(
                f"{out} holds {p[C.P_METHOD]} K={p[C.P_K]} of {source}, not {method} K={k} of "
                f"{src}; delete it or pass another --bundles folder"
            )
        if ref is not None:
            share_files(out, ref)  # bundles exported before sharing existed
        return out
    t = time.perf_counter()
    print(f"exporting {out.name} ...", end=" ", flush=True, file=sys.stderr)
    cmd = [sys.executable, "-m", "export", "--k", str(k), "--method", method, "-o", str(out)]
    proc = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ExportFailedError(f"`{' '.join(cmd + args)}` failed:\n{tail}")
    freed = share_files(out, ref) if ref is not None else 0
    print(f"{time.perf_counter() - t:.1f} s, {freed / 2**20:.1f} MiB shared with {ref.name}"
          if ref is not None else f"{time.perf_counter() - t:.1f} s", file=sys.stderr)  # fmt: skip
    return out


def host_method(method: str) -> str:
    """The bundle whose graphs a method runs on: exact borrows gram's text graphs."""
    return GRAM if method == EXACT else method
