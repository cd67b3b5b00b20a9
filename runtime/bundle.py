"""Read and verify a bundle's manifest (svdprune.json): schema version and every file's sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from runtime import contract as C


class BundleError(ValueError):
    """The bundle folder is missing, incomplete, altered or from another schema version."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed (graphs can be gigabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle: Path, verify: bool = True) -> dict:
    """The manifest of `bundle`; with `verify`, every listed file must match its sha256."""
    bundle = Path(bundle)
    path = bundle / C.MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{bundle} has no {C.MANIFEST_FILE}: not a bundle (or an interrupted export); "
            "re-run `make export`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e}); re-run `make export`") from e
    version = manifest.get(C.KEY_SCHEMA)
    if version != C.SCHEMA_VERSION:
        raise BundleError(
            f"{path} has schema_version {version!r}, this runtime reads {C.SCHEMA_VERSION}; "
            "re-export the bundle with this version of svdprune-onnx"
        )
    if verify:
        for rel, digest in manifest.get(C.KEY_FILES, {}).items():
            f = bundle / rel
            if not f.is_file():
                raise BundleError(f"{bundle}: {rel} is missing; copy the whole bundle folder")
            if sha256_file(f) != digest:
                raise BundleError(
                    f"{bundle}: {rel} does not match its sha256; re-copy or re-export"
                )
    return manifest


if __name__ == "__main__":  # python -m runtime.bundle BUNDLE: verify a copied bundle on the device
    import sys

    try:
        m = load_manifest(Path(sys.argv[1]))
    except (BundleError, IndexError) as e:
        print(f"error: {e or 'usage: python -m runtime.bundle BUNDLE_DIR'}", file=sys.stderr)
        sys.exit(2)
    p = m[C.KEY_PRUNING]
    print(
        f"ok: {len(m[C.KEY_FILES])} files verified; K={p[C.P_K]} of N={p[C.P_N]}, {p[C.P_METHOD]}"
    )
