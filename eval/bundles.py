"""The checkpoint and the bundles an evaluation needs: reuse what exists, export what is missing.

    build/eval/bundles/<model>-none-k<N>     the unpruned reference
    build/eval/bundles/<model>-<method>-k<K> one per exportable method and K
    build/eval/bundles/<model>-<method>-k<K>-<positions>
                                             the same, once per --positions mode (compact /
                                             original); a Qwen2.5-VL reference is always
                                             <model>-none-k<N>-original (the unpruned model's
                                             own M-RoPE positions)
    exact                                    not exportable (torch.linalg.svd): its features come
                                             from PyTorch and run through the text graphs of the
                                             gram bundle at the same K (text graphs do not
                                             depend on the pruning method)

Exports run `python -m export` in a subprocess, so a 7B export's memory is returned before the
evaluation starts. The text graphs of every bundle of one checkpoint are byte-identical (same
sha256 in the manifests), so each new bundle's copies are replaced by hard links to the
reference bundle's files: 22 bundles of a 7B model take the disk of one decoder, not 22. The
positions mode is a runtime setting (manifest pruning.position_ids): the bundles of one (method,
K) in both modes hold the same vision graph too, which is linked to the first one's.
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


def export_args(model: Path | None, preset: str, family: str | None = None) -> list[str]:
    """The checkpoint options of `python -m export`: -m, else the preset (of `family`, the
    export CLI's spelling: qwen2.5-vl; with -m the family is read from config.json)."""
    if model is not None:
        return ["-m", str(model)]
    return ["--preset", preset, *(["--family", family] if family is not None else [])]


def bundle_path(root: Path, src: Path, method: str, k: int, positions: str | None = None) -> Path:
    return root / f"{src.name}-{method}-k{k}{f'-{positions}' if positions else ''}"


def share_files(bundle: Path, *refs: Path) -> int:
    """Hard-link `bundle`'s graph files that are identical (by manifest sha256) to a file of
    one of `refs` (the first that has it). Returns the bytes freed. The manifests' checksums
    stay valid: the content is the same.
    """
    files = json.loads((bundle / C.MANIFEST_FILE).read_text())[C.KEY_FILES]
    ref_files = [(r, json.loads((r / C.MANIFEST_FILE).read_text())[C.KEY_FILES]) for r in refs]
    freed = 0
    for rel, sha in files.items():
        if not rel.startswith(C.ONNX_DIR):
            continue
        theirs = next((r / rel for r, f in ref_files if f.get(rel) == sha), None)
        mine = bundle / rel
        if theirs is None or mine.stat().st_ino == theirs.stat().st_ino:
            continue
        tmp = mine.with_name(mine.name + ".link")
        os.link(theirs, tmp)
        os.replace(tmp, mine)  # atomic: the bundle never lacks the file
        freed += theirs.stat().st_size
    return freed


def ensure_bundle(
    root: Path,
    src: Path,
    args: list[str],
    method: str,
    k: int,
    ref: Path | None = None,
    positions: str | None = None,
    siblings: tuple[Path, ...] = (),
) -> Path:
    """The bundle for (method, K[, positions]), exported unless a matching one is already there.

    `positions` (compact / original) is passed to the export and names the folder; None keeps
    the export's default and the plain name. A new export shares its identical graph files with
    the `ref` bundle and then `siblings` (hard links).
    """
    out = bundle_path(root, src, method, k, positions)
    refs = tuple(r for r in (ref, *siblings) if r is not None)
    manifest = out / C.MANIFEST_FILE
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        p, source = m[C.KEY_PRUNING], Path(m[C.KEY_MODEL]["source"]).resolve()
        have = (p[C.P_METHOD], p[C.P_K], source, p.get(C.P_POSITIONS, C.POSITIONS_COMPACT))
        if have[:3] != (method, k, src) or (positions is not None and have[3] != positions):
            mode = f" ({positions} positions)" if positions else ""
            raise BundleMismatchError(
                f"{out} holds {p[C.P_METHOD]} K={p[C.P_K]} ({have[3]} positions) of {source}, "
                f"not {method} K={k}{mode} of {src}; delete it or pass another --bundles folder"
            )
        if refs:
            share_files(out, *refs)  # bundles exported before sharing existed
        return out
    t = time.perf_counter()
    print(f"exporting {out.name} ...", end=" ", flush=True, file=sys.stderr)
    cmd = [sys.executable, "-m", "export", "--k", str(k), "--method", method, "-o", str(out)]
    cmd += ["--positions", positions] if positions else []
    proc = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ExportFailedError(f"`{' '.join(cmd + args)}` failed:\n{tail}")
    freed = share_files(out, *refs) if refs else 0
    names = ", ".join(r.name for r in refs)
    print(f"{time.perf_counter() - t:.1f} s, {freed / 2**20:.1f} MiB shared with {names}"
          if refs else f"{time.perf_counter() - t:.1f} s", file=sys.stderr)  # fmt: skip
    return out


def host_method(method: str) -> str:
    """The bundle whose graphs a method runs on: exact borrows gram's text graphs."""
    return GRAM if method == EXACT else method
