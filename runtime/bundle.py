"""Read and verify a bundle's manifest (svdprune.json): schema version and every file's sha256.

Trust rules (what `load_manifest` enforces before the runtime opens anything else):
  - the manifest is a UTF-8 JSON object of this schema version;
  - every path in its `files` map is relative, stays inside the bundle folder (no `..`, no
    absolute path, no symlink resolving outside) and matches its sha256;
  - the files the runtime opens (RUNTIME_FILES) must be listed, so an unlisted file is never
    loaded; files present but unlisted are ignored (never opened, never hashed).

Verify once: a file whose sha256 matched is recorded in a stamp in the user's cache
(`$XDG_CACHE_HOME/svdprune-onnx/verified/`, else `<bundle>.verified.json` beside the bundle;
never inside it) with its size, mtime, ctime, inode and device, under the manifest's sha256.
A later open hashes only the files whose stat() differs from the stamp (changed, replaced, cut):
like git's index, the stamp trusts the filesystem's metadata. `full=True` (`--verify`) hashes
every file. A corrupt or foreign stamp counts as none; a file changed too close to its hashing
for the filesystem clock to tell ("racy", git's word) is not recorded, so it is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

from runtime import contract as C


class BundleError(ValueError):
    """The bundle folder is missing, incomplete, altered or from another schema version."""


# What the runtime opens from a bundle: each must be listed in the manifest (and so verified).
RUNTIME_FILES = (C.VISION_ONNX, C.EMBED_ONNX, C.DECODER_ONNX, C.TOKENIZER_FILE)
# A file changed within this long of its hashing may keep its mtime/ctime (coarse filesystem
# clocks: a jiffy on Linux, 2 s on FAT), so the stamp does not vouch for it: it is hashed again.
RACY_NS = 2_000_000_000
STAMP_MAX_BYTES = 64 << 20  # a stamp holds ~250 bytes per listed file


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed (graphs can be gigabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle: Path, verify: bool = True, *, full: bool = False) -> dict:
    """The manifest of `bundle`; with `verify`, every listed file must match its sha256: hashed
    unless the verification stamp vouches for its unchanged stat(); `full` hashes them all."""
    bundle = Path(bundle)
    path = bundle / C.MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"{bundle} has no {C.MANIFEST_FILE}: not a bundle (or an interrupted export); "
            "re-run `make export`"
        )
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
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
        _verify(bundle, files, hashlib.sha256(raw).hexdigest(), full)
    return manifest


def _verify(bundle: Path, files: dict[str, str], manifest_sha: str, full: bool) -> None:
    """Every listed file matches its sha256: hashed, or vouched for by the stamp (not `full`)."""
    known = {} if full else read_stamp(bundle, manifest_sha)
    entries: dict[str, dict] = {}
    for rel, digest in files.items():
        f = inside(bundle, rel)
        st = _stat(f)
        if st is None:
            raise BundleError(f"{bundle}: {rel} is missing; copy the whole bundle folder")
        entry = {C.SK_SHA256: digest, **_identity(st)}
        if entry in known.get(rel, ()):
            entries[rel] = entry
            continue
        start = time.time_ns()
        if sha256_file(f) != digest:
            raise BundleError(f"{bundle}: {rel} does not match its sha256; re-copy or re-export")
        after = _stat(f)  # unchanged while hashed, and old enough for its clock to tell a change
        same = after is not None and _identity(after) == _identity(st)
        if same and max(st.st_mtime_ns, st.st_ctime_ns) < start - RACY_NS:
            entries[rel] = entry
    if not all(entries.get(rel) in known.get(rel, ()) for rel in files):
        write_stamp(bundle, manifest_sha, entries)


def _stat(f: Path) -> os.stat_result | None:
    try:
        st = f.stat()
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _identity(st: os.stat_result) -> dict[str, int]:
    return {k: getattr(st, f"st_{k}") for k in C.SK_STAT}


def stamp_paths(bundle: Path) -> list[Path]:
    """Where the verification stamp of `bundle` may live: the user's cache (per user, so nobody
    else vouches for a file; the bundle's parent stays untouched), then, when no cache folder
    is writable, beside the bundle folder. Never inside the bundle."""
    root = Path(bundle).resolve()
    paths = [root.parent / f"{root.name}{C.STAMP_SUFFIX}"] if root.name else []
    try:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory: beside the bundle only
        return paths
    key = hashlib.sha256(str(root).encode()).hexdigest()[:32]
    return [cache / C.STAMP_CACHE_DIR / f"{key}.json", *paths]


def read_stamp(bundle: Path, manifest_sha: str) -> dict[str, list[dict]]:
    """{relative path: [entries a stamp records]} for this bundle and manifest; an absent,
    unreadable, corrupt or foreign stamp gives nothing (so the files are hashed)."""
    root = str(Path(bundle).resolve())
    known: dict[str, list[dict]] = {}
    for path in stamp_paths(bundle):
        try:
            st = path.stat()
            if st.st_size > STAMP_MAX_BYTES or st.st_uid != getattr(os, "getuid", lambda: 0)():
                continue  # not ours: another user's word, or a huge file, vouches for nothing
            stamp = json.loads(path.read_bytes().decode("utf-8"))
            if (
                stamp[C.SK_VERSION] != C.STAMP_VERSION
                or stamp[C.SK_BUNDLE] != root
                or stamp[C.SK_MANIFEST] != manifest_sha
            ):
                continue
            for rel, entry in stamp[C.SK_FILES].items():
                if isinstance(entry, dict):
                    known.setdefault(rel, []).append(entry)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            continue
    return known


def write_stamp(bundle: Path, manifest_sha: str, entries: dict[str, dict]) -> Path | None:
    """Record `entries` (verified files) atomically (temp file + os.replace) in the first
    writable stamp location; returns it, or None (with a note) when none is writable."""
    stamp = {
        C.SK_VERSION: C.STAMP_VERSION,
        C.SK_BUNDLE: str(Path(bundle).resolve()),
        C.SK_MANIFEST: manifest_sha,
        C.SK_FILES: entries,
    }
    data = (json.dumps(stamp, indent=1, sort_keys=True) + "\n").encode()
    errors = []
    for path in stamp_paths(bundle):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return path
        except OSError as e:
            errors.append(f"{path.parent} ({e.strerror or e})")
    print(
        f"note: cannot record the verification of {bundle} in {' or '.join(errors)}; "
        "it is hashed again next time",
        file=sys.stderr,
    )
    return None


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
    ap.add_argument(
        "--verify", action="store_true", help="hash every file (always, here: the full check)"
    )
    args = ap.parse_args(argv)
    from runtime.session import ProviderError, SessionConfig  # bound before the except below

    try:
        m = load_manifest(args.bundle, full=True)  # the explicit check: never the stamp alone
        p = m[C.KEY_PRUNING]
        kept = f"K={p[C.P_K]} of N={p[C.P_N]}"
        if m.get(C.KEY_MODEL, {}).get("family") == C.FAMILY_QWEN25VL:  # N follows the image
            k = m[C.KEY_TEXT][C.T_IMAGE_TOKENS]
            kept = "all of each image's merged tokens" if k is None else f"K={k} per image"
        print(f"ok: {len(m[C.KEY_FILES])} files verified; {kept}, {p[C.P_METHOD]}")
        if not args.selftest:
            return 0
        from runtime.generate import Pipeline
        from runtime.selftest import describe, run_selftest

        cfg = SessionConfig(provider=args.provider, trt_fp16=args.fp16)
        report = run_selftest(Pipeline(args.bundle, cfg, verify=False))  # verified above
    except (BundleError, ProviderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else describe(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
