"""Read and verify a bundle's manifest (svdprune.json): schema version and every file's sha256.

Trust rules (what `load_manifest` enforces before the runtime opens anything else):
  - the manifest is a UTF-8 JSON object of this schema version;
  - every path in its `files` map is relative, stays inside the bundle folder (no `..`, no
    absolute path, no symlink resolving outside) and matches its sha256;
  - the files the runtime opens (RUNTIME_FILES) must be listed, so an unlisted file is never
    loaded; files present but unlisted are ignored (never opened, never hashed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from runtime import contract as C


class BundleError(ValueError):
    """The bundle folder is missing, incomplete, altered or from another schema version."""


# What the runtime opens from a bundle: each must be listed in the manifest (and so verified).
RUNTIME_FILES = (C.VISION_ONNX, C.EMBED_ONNX, C.DECODER_ONNX, C.TOKENIZER_FILE)


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
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid UTF-8 JSON ({e}); re-run `make export`") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a JSON object; re-run `make export`")
    version = manifest.get(C.KEY_SCHEMA)
    if version not in C.READ_SCHEMAS:
        raise BundleError(
            f"{path} has schema_version {version!r}, this runtime reads "
            f"{', '.join(map(str, C.READ_SCHEMAS))}; "
            "re-export the bundle with this version of svdprune-onnx"
        )
    files = manifest.get(C.KEY_FILES)
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise BundleError(f"{path}: '{C.KEY_FILES}' must map relative paths to sha256 hex strings")
    unlisted = [f for f in RUNTIME_FILES if f not in files]
    if unlisted:
        raise BundleError(
            f"{path} does not list {', '.join(unlisted)}; the runtime loads only files listed "
            "with their sha256: re-export the bundle"
        )
    if verify:
        for rel, digest in files.items():
            f = inside(bundle, rel)
            if not f.is_file():
                raise BundleError(f"{bundle}: {rel} is missing; copy the whole bundle folder")
            if sha256_file(f) != digest:
                raise BundleError(
                    f"{bundle}: {rel} does not match its sha256; re-copy or re-export"
                )
    return manifest


def inside(bundle: Path, rel: str) -> Path:
    """`bundle / rel`, refusing a path that is absolute, has `..` or resolves outside `bundle`
    (a symlink pointing elsewhere): a manifest may only name files inside its own folder."""
    parts = PurePosixPath(rel).parts
    if not rel or "\\" in rel or PurePosixPath(rel).is_absolute() or ".." in parts or ":" in rel:
        raise BundleError(
            f"{bundle}: manifest path {rel!r} is not a plain relative path inside the bundle; "
            "refusing it (re-export the bundle)"
        )
    root = Path(bundle).resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        raise BundleError(
            f"{bundle}: {rel} resolves to {target}, outside the bundle folder (a symlink?); "
            "refusing it: copy the real file into the bundle"
        )
    return target


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.bundle BUNDLE [--selftest] [--provider P]`: verify a copied bundle on
    the device, and with --selftest run its reference photos and prompt (runtime/selftest.py)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m runtime.bundle", description=main.__doc__)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--selftest", action="store_true", help="run the bundle's self-test")
    ap.add_argument(
        "--provider", default="auto", choices=("auto", "cuda", "tensorrt", "cpu"), help="auto"
    )
    ap.add_argument("--fp16", action="store_true", help="TensorRT fp16 for the vision graph")
    ap.add_argument("--json", action="store_true", help="print the self-test report as JSON")
    args = ap.parse_args(argv)
    try:
        m = load_manifest(args.bundle)
        p = m[C.KEY_PRUNING]
        print(f"ok: {len(m[C.KEY_FILES])} files verified; K={p[C.P_K]} of N={p[C.P_N]}, "
              f"{p[C.P_METHOD]}")  # fmt: skip
        if not args.selftest:
            return 0
        from runtime.generate import Pipeline
        from runtime.selftest import describe, run_selftest
        from runtime.session import ProviderError, SessionConfig

        cfg = SessionConfig(provider=args.provider, trt_fp16=args.fp16)
        report = run_selftest(Pipeline(args.bundle, cfg, verify=False))  # verified above
    except (BundleError, ProviderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else describe(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
