"""Verify once, not every call: the stamp beside the bundle lets a later open stat() the files
instead of hashing them; any change to a file (content, replacement, truncation, deletion), the
manifest or the stamp itself means hashing again, and the altered file is refused as before."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import runtime.bundle as B
from runtime import contract as C
from runtime.bundle import BundleError, load_manifest, stamp_paths

FILES = (*B.RUNTIME_FILES, "config.json")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """The user cache dir of these tests (never the real ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / C.STAMP_CACHE_DIR


@pytest.fixture
def hashed(monkeypatch, cache) -> list[str]:
    """The files sha256_file hashes; files count as old enough to be recorded (no racy window)."""
    calls: list[str] = []
    real = B.sha256_file

    def counting(path: Path, *a, **k) -> str:
        calls.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(B, "sha256_file", counting)
    monkeypatch.setattr(B, "RACY_NS", 0)
    return calls


def make_bundle(root: Path) -> Path:
    """A minimal bundle for load_manifest: the runtime files (random bytes) and a manifest."""
    files = {}
    for i, rel in enumerate(FILES):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(1000 + i))
        files[rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    pruning = {C.P_K: 16, C.P_N: 576, C.P_METHOD: "gram"}
    manifest = {C.KEY_SCHEMA: C.SCHEMA_VERSION, C.KEY_FILES: files, C.KEY_PRUNING: pruning}
    (root / C.MANIFEST_FILE).write_text(json.dumps(manifest))
    return root


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "b")


def test_verified_once(bundle: Path, hashed: list[str], cache: Path) -> None:
    load_manifest(bundle)
    assert len(hashed) == len(FILES)
    (stamp,) = cache.glob("*.json")  # in the user's cache: nothing beside or inside the bundle
    assert stamp == stamp_paths(bundle)[0]
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["b", "cache"]
    assert set(json.loads(stamp.read_text())[C.SK_FILES]) == set(FILES)
    hashed.clear()
    load_manifest(bundle)
    load_manifest(bundle)
    assert hashed == [], "a verified, unchanged bundle is not hashed again"


def test_racy_files_are_hashed_again(bundle: Path, hashed: list[str], monkeypatch) -> None:
    """A file written within the clock's resolution of its hashing could change unseen
    (git's racy-clean case): the stamp leaves it out, so the next open hashes it again."""
    monkeypatch.setattr(B, "RACY_NS", 3600 * 10**9)  # every file here is "just written"
    load_manifest(bundle)
    load_manifest(bundle)
    assert len(hashed) == 2 * len(FILES)


def _content(f: Path) -> None:  # same size, new bytes, a new mtime
    st = f.stat()
    f.write_bytes(bytes(b ^ 1 for b in f.read_bytes()))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _replace(f: Path) -> None:  # another file (new inode) of the same size and mtime
    st = f.stat()
    tmp = f.with_name(f.name + ".new")
    tmp.write_bytes(bytes(b ^ 1 for b in f.read_bytes()))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, f)


def _truncate(f: Path) -> None:
    with f.open("r+b") as h:
        h.truncate(10)


ALTER = {"content": _content, "replace": _replace, "truncate": _truncate, "delete": Path.unlink}


@pytest.mark.parametrize("how", ALTER)
@pytest.mark.parametrize("rel", [C.DECODER_ONNX, "config.json"])
def test_altered_after_verification_is_refused(
    bundle: Path, hashed: list[str], how: str, rel: str
) -> None:
    load_manifest(bundle)
    hashed.clear()
    ALTER[how](bundle / rel)
    with pytest.raises(BundleError, match="missing" if how == "delete" else "sha256"):
        load_manifest(bundle)
    with pytest.raises(BundleError):  # and on every later call
        load_manifest(bundle)
    # only the changed file is hashed (a missing one is refused before any hashing)
    assert set(hashed) == (set() if how == "delete" else {Path(rel).name})


def test_manifest_change_means_hashing_everything(bundle: Path, hashed: list[str]) -> None:
    load_manifest(bundle)
    m = json.loads((bundle / C.MANIFEST_FILE).read_text())
    (bundle / C.MANIFEST_FILE).write_text(json.dumps(m, indent=2))  # same files, other bytes
    hashed.clear()
    load_manifest(bundle)
    assert len(hashed) == len(FILES)
    m[C.KEY_FILES][C.VISION_ONNX] = "0" * 64  # a manifest that now disagrees with the file
    (bundle / C.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="sha256"):
        load_manifest(bundle)


def test_full_verify_hashes_every_file(bundle: Path, hashed: list[str], capsys) -> None:
    load_manifest(bundle)
    hashed.clear()
    load_manifest(bundle, full=True)
    assert len(hashed) == len(FILES)
    hashed.clear()
    assert B.main([str(bundle)]) == 0  # python -m runtime.bundle: the explicit, full check
    assert len(hashed) == len(FILES) and "verified" in capsys.readouterr().out
    assert B.main([str(bundle.parent / "nope")]) == 2  # an error message, not a traceback
    assert "not a bundle" in capsys.readouterr().err
    hashed.clear()
    load_manifest(bundle, verify=False)
    assert hashed == []


STAMPS = {
    "garbage": b"\x00\xff not json",
    "truncated": b'{"stamp_version": 1, "files": {',
    "list": b"[1, 2]",
    "deeply nested": b"[" * 100_000,
    "wrong types": json.dumps({C.SK_VERSION: 1, C.SK_FILES: [1], C.SK_BUNDLE: 3}).encode(),
    "other version": None,  # filled below from a real stamp
    "other bundle": None,
    "entries not dicts": None,
}


@pytest.mark.parametrize("kind", STAMPS)
def test_corrupt_or_foreign_stamp_means_full_verify(
    bundle: Path, hashed: list[str], kind: str
) -> None:
    load_manifest(bundle)
    stamp = stamp_paths(bundle)[0]
    good = json.loads(stamp.read_text())
    data = STAMPS[kind]
    if kind == "other version":
        data = json.dumps(good | {C.SK_VERSION: 99}).encode()
    elif kind == "other bundle":
        data = json.dumps(good | {C.SK_BUNDLE: "/elsewhere"}).encode()
    elif kind == "entries not dicts":
        data = json.dumps(good | {C.SK_FILES: {rel: "x" for rel in FILES}}).encode()
    stamp.write_bytes(data)
    hashed.clear()
    load_manifest(bundle)  # never a crash
    assert len(hashed) == len(FILES)
    hashed.clear()
    load_manifest(bundle)  # and the stamp was rewritten
    assert hashed == []


def test_stamp_of_another_user_is_ignored(bundle: Path, hashed: list[str], monkeypatch) -> None:
    load_manifest(bundle)
    monkeypatch.setattr(B.os, "getuid", lambda: os.getuid() + 1, raising=False)
    hashed.clear()
    load_manifest(bundle)
    assert len(hashed) == len(FILES)


def test_stamp_of_another_folder_is_ignored(bundle: Path, hashed: list[str]) -> None:
    load_manifest(bundle)
    other = bundle.parent / "c"
    shutil.copytree(bundle, other)  # copy2 keeps mtimes; the inodes are new
    shutil.copy(stamp_paths(bundle)[0], stamp_paths(other)[0])
    hashed.clear()
    load_manifest(other)
    assert len(hashed) == len(FILES)


def test_no_writable_cache_stamps_beside_the_bundle(
    bundle: Path, hashed: list[str], cache: Path, monkeypatch, capsys
) -> None:
    real = B.tempfile.mkstemp
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the cache folder should be")  # mkdir fails, even for root

    load_manifest(bundle)
    stamp = bundle.parent / f"b{C.STAMP_SUFFIX}"
    assert stamp.is_file() and stamp_paths(bundle)[1] == stamp.resolve()
    assert not list(bundle.rglob(f"*{C.STAMP_SUFFIX}")), "never inside the bundle"
    hashed.clear()
    load_manifest(bundle)
    assert hashed == []
    # nowhere writable (nor the bundle's parent): a note, no crash, hashed again next time
    stamp.unlink()

    def mkstemp(*a, dir=None, **k):
        if Path(dir) == bundle.parent.resolve():
            raise PermissionError(13, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(B.tempfile, "mkstemp", mkstemp)
    load_manifest(bundle)
    assert "cannot record the verification" in capsys.readouterr().err
    hashed.clear()
    load_manifest(bundle)
    assert len(hashed) == len(FILES)
    assert not [p for p in bundle.parent.iterdir() if p.name.endswith(".tmp")]


# --- the CLI: --verify and the `load` timing ---------------------------------------------------


@pytest.fixture(scope="module")
def real_bundle(tiny_clip: Path, tmp_path_factory) -> Path:
    from export.__main__ import cli as export_cli

    out = tmp_path_factory.mktemp("vo") / "k16"
    assert export_cli(["-m", str(tiny_clip), "--k", "16", "-o", str(out)]) == 0
    return out


def test_cli_verify_flag_and_load_timing(
    real_bundle: Path, photo_paths, hashed: list[str], capsys
) -> None:
    from runtime.run import cli

    argv = ["-m", str(real_bundle), "-i", str(photo_paths[0]), "-p", "What is in the image?",
            "--provider", "cpu", "--max-new-tokens", "2"]  # fmt: skip
    n = len(load_manifest(real_bundle, verify=False)[C.KEY_FILES])
    assert cli([*argv, "--json"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert out["timings_ms"]["load"] > 0
    assert out["timings_ms"]["load"] <= out["timings_ms"]["total"]
    hashed.clear()
    assert cli([*argv, "--timings"]) == 0
    assert hashed == [], "the second call checks the stamp only"
    assert "timings: load " in capsys.readouterr().err
    assert cli([*argv, "--verify", "--json"]) == 0
    assert len(hashed) == n, "--verify hashes every listed file (once)"
    capsys.readouterr()
