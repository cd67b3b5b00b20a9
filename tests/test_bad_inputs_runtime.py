"""Bad input to `python -m runtime.run`: one `error: ...` line naming the fix, exit 2; odd but
usable images are accepted (documented successes).

Complements tests/test_runtime_cli.py (no bundle, checksum, schema, missing/empty/text image,
--max-new-tokens overflow, CUDA) and tests/test_preprocess.py (load_image on each bad file) with
the bundle's trust rules (paths escaping the folder, unlisted files, a broken manifest), every
image kind through the CLI, prompts (empty, not UTF-8, too long) and flag values.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.__main__ import cli as export_cli
from runtime import contract as C
from runtime.bundle import RUNTIME_FILES
from runtime.preprocess import load_image
from runtime.run import cli

from .conftest import REPO

BASE = ["--provider", "cpu", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def bundle(tiny_clip: Path, photo_paths: list[Path], tmp_path_factory) -> Path:
    # `norm` scoring: these tests are about input handling, and a small vision graph opens in
    # milliseconds where the unrolled `gram` iterations take seconds per Pipeline.
    out = tmp_path_factory.mktemp("bad-rt") / "tiny-k16"
    argv = ["-m", str(tiny_clip), "--k", "16", "--method", "norm", "-i", str(photo_paths[0])]
    argv += ["-o", str(out)]
    assert export_cli(argv) == 0
    return out


def run(capsys, *argv) -> tuple[int, str, list[str]]:
    code = cli([*map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def assert_one_line_error(code: int, err: list[str], message: str) -> None:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "Traceback" not in err[0]


# --- the bundle: trust rules ---------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy(bundle: Path, tmp: Path) -> tuple[Path, dict]:
    bad = tmp / "bundle"
    shutil.copytree(bundle, bad)
    return bad, json.loads((bad / C.MANIFEST_FILE).read_text())


def _save(bad: Path, manifest: dict) -> Path:
    (bad / C.MANIFEST_FILE).write_text(json.dumps(manifest))
    return bad


def _escape_dotdot(bad: Path, m: dict) -> Path:
    outside = bad.parent / "outside.bin"  # a real file with the right sha: only the path is bad
    outside.write_bytes(b"secret")
    return _save(bad, m | {C.KEY_FILES: m[C.KEY_FILES] | {"../outside.bin": _sha(b"secret")}})


def _escape_absolute(bad: Path, m: dict) -> Path:
    outside = bad.parent / "outside.bin"
    outside.write_bytes(b"secret")
    return _save(bad, m | {C.KEY_FILES: m[C.KEY_FILES] | {str(outside): _sha(b"secret")}})


def _escape_symlink(bad: Path, m: dict) -> Path:
    # Same bytes (so the sha256 matches) but the listed path is a link leaving the folder.
    outside = bad.parent / "tokenizer-elsewhere.json"
    shutil.move(bad / C.TOKENIZER_FILE, outside)
    (bad / C.TOKENIZER_FILE).symlink_to(outside)
    return bad


def _unlisted_runtime_file(bad: Path, m: dict) -> Path:
    files = {k: v for k, v in m[C.KEY_FILES].items() if k != C.TOKENIZER_FILE}
    return _save(bad, m | {C.KEY_FILES: files})


def _missing_file(bad: Path, m: dict) -> Path:
    (bad / C.DECODER_ONNX).unlink()
    return bad


def _manifest_bytes(data: bytes) -> Callable[[Path, dict], Path]:
    def write(bad: Path, m: dict) -> Path:
        (bad / C.MANIFEST_FILE).write_bytes(data)
        return bad

    return write


BUNDLE_CASES = {
    "path-dotdot": (_escape_dotdot, "'../outside.bin' is not a plain relative path"),
    "path-absolute": (_escape_absolute, "is not a plain relative path inside the bundle"),
    "path-symlink-outside": (_escape_symlink, "outside the bundle folder"),
    "runtime-file-unlisted": (_unlisted_runtime_file, "does not list tokenizer.json"),
    "file-missing": (_missing_file, "decoder_model_merged.onnx is missing"),
    "manifest-not-utf8": (_manifest_bytes(b'{"a": "\xff"}'), "is not valid UTF-8 JSON"),
    "manifest-not-object": (_manifest_bytes(b"[1, 2]"), "is not a JSON object"),
    "manifest-files-not-a-map": (
        _manifest_bytes(json.dumps({C.KEY_SCHEMA: 1, C.KEY_FILES: ["x"]}).encode()),
        "must map relative paths to sha256",
    ),
}


@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_bad_bundle(bundle, photo_paths, tmp_path, capsys, case: str) -> None:
    alter, message = BUNDLE_CASES[case]
    bad = alter(*_copy(bundle, tmp_path))
    code, _, err = run(capsys, "-m", bad, "-i", photo_paths[0], "-p", "hi", *BASE)
    assert_one_line_error(code, err, message)


def test_extra_files_are_never_opened(bundle, photo_paths, tmp_path, capsys, monkeypatch) -> None:
    """Unlisted files in the bundle are ignored: the run succeeds, never opens them, opens
    only listed (and so sha256-verified) files, and unpickles nothing."""
    import onnxruntime

    import runtime.generate

    bad, m = _copy(bundle, tmp_path)
    extras = ["onnx/extra.onnx", "onnx/decoder_model_merged.onnx_data", "model.pkl", "evil.py"]
    for rel in extras:
        (bad / rel).write_bytes(b"\x80\x04 not for loading")
    opened: list[str] = []
    real_session, real_tokenizer = onnxruntime.InferenceSession, runtime.generate.Tokenizer

    class Tokenizer:
        @staticmethod
        def from_file(path: str):
            opened.append(path)
            return real_tokenizer.from_file(path)

    def session(path, *args, **kwargs):
        opened.append(str(path))
        return real_session(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(runtime.generate, "Tokenizer", Tokenizer)
    sys.addaudithook(_audit)  # Python-level opens (manifest, hashing); hooks cannot be removed
    _AUDIT.clear()
    _AUDIT.append(opened)
    try:
        code, out, err = run(capsys, "-m", bad, "-i", photo_paths[0], "-p", "hi", *BASE, "--json")
    finally:
        _AUDIT.clear()
    assert code == 0, err
    assert len(json.loads(out)["kept_indices"]) == 16
    assert not [p for p in opened if p.startswith("UNPICKLED")]
    root = bad.resolve()
    inside = [Path(p).resolve() for p in opened if Path(p).resolve().is_relative_to(root)]
    rel = {p.relative_to(root).as_posix() for p in inside}  # <bundle>.selftest/ is beside it
    assert set(RUNTIME_FILES) <= rel, rel
    assert rel <= set(m[C.KEY_FILES]) | {C.MANIFEST_FILE}, rel - set(m[C.KEY_FILES])
    assert not rel & set(extras)


_AUDIT: list[list[str]] = []


def _audit(event: str, args: tuple) -> None:
    if not _AUDIT:
        return
    if event == "open" and isinstance(args[0], str | Path):
        _AUDIT[0].append(str(args[0]))
    elif event == "pickle.find_class":  # an unpickler resolving a global: never in the runtime
        _AUDIT[0].append(f"UNPICKLED {args}")


# --- images --------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    """A valid greyscale PNG of zeros: 20000 x 20000 (400 MP) compresses to ~1.7 MB, a real
    decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    z, rows = zlib.compressobj(1), 500
    block = b"\0" * ((width + 1) * rows)  # each row: filter byte 0 + width zeros
    body = b"".join(z.compress(block) for _ in range(height // rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _photo(photo: Path) -> Image.Image:
    return Image.open(photo).convert("RGB").resize((96, 72))


def _animated(photo: Path, path: Path) -> None:
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


BAD_IMAGES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "truncated-jpeg": (
        lambda photo, p: p.write_bytes(photo.read_bytes()[:2000]),
        "is not a readable image",
    ),
    "pdf-not-image": (
        lambda photo, p: p.write_bytes(b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n<<>>\nendobj\n"),
        "is not a readable image",
    ),
    "folder": (lambda photo, p: p.mkdir(), "is not a file"),
    "10000x10000-bomb": (
        lambda photo, p: p.write_bytes(_png(10000, 10000)),
        "10000x10000 = 100.0 megapixels, above the max_pixels limit of 64.0",
    ),
    "20000x20000-bomb": (  # past Pillow's own hard limit (2 x 89.5 MP): refused at open
        lambda photo, p: p.write_bytes(_png(20000, 20000)),
        "too large to decode safely",
    ),
    "20000x1-strip": (
        lambda photo, p: Image.new("RGB", (20000, 1)).save(p, "PNG"),
        "aspect ratio too extreme",
    ),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image(bundle, photo_paths, tmp_path, capsys, case: str) -> None:
    make, message = BAD_IMAGES[case]
    image = tmp_path / "input.png"
    make(photo_paths[-1], image)
    code, _, err = run(capsys, "-m", bundle, "-i", image, "-p", "hi", *BASE)
    assert_one_line_error(code, err, message)


GOOD_IMAGES: dict[str, Callable[[Path, Path], None]] = {
    "1x1": lambda photo, p: Image.new("RGB", (1, 1), (200, 10, 10)).save(p, "PNG"),
    "cmyk-jpeg": lambda photo, p: _photo(photo).convert("CMYK").save(p, "JPEG"),
    "16bit-png": lambda photo, p: Image.fromarray(
        np.linspace(0, 65535, 96 * 72).reshape(72, 96).astype(np.uint16)
    ).save(p, "PNG"),
    "palette-transparent-png": lambda photo, p: (
        _photo(photo).quantize(16).save(p, "PNG", transparency=0)
    ),
    "grey-alpha-png": lambda photo, p: _photo(photo).convert("LA").save(p, "PNG"),
    "animated-gif": _animated,
}


@pytest.mark.parametrize("case", GOOD_IMAGES)
def test_odd_images_are_accepted(bundle, photo_paths, tmp_path, capsys, case: str) -> None:
    image = tmp_path / "input.img"
    GOOD_IMAGES[case](photo_paths[-1], image)
    code, out, err = run(capsys, "-m", bundle, "-i", image, "-p", "hi", *BASE, "--json")
    assert code == 0 and err == [], err
    answer = json.loads(out)
    assert len(answer["kept_indices"]) == 16 and len(answer["token_ids"]) >= 1


def test_animated_image_uses_its_first_frame(photo_paths, tmp_path) -> None:
    path = tmp_path / "anim.gif"
    _animated(photo_paths[0], path)
    assert Image.open(path).n_frames == 2
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((10, 10)) == (255, 0, 0)


# --- prompts and flags ---------------------------------------------------------------------

PROMPTS = {
    "empty": ("", "-p is empty"),
    "blank": ("  \n\t", "-p is empty"),
    "not-utf8": ("caf\udce9?", "-p is not valid UTF-8"),  # argv bytes b"caf\xe9?" (Latin-1)
    "overflows-context": ("cat " * 3000, "positions, the model has 2048"),
}


@pytest.mark.parametrize("case", PROMPTS)
def test_bad_prompt(bundle, photo_paths, capsys, case: str) -> None:
    prompt, message = PROMPTS[case]
    code, _, err = run(capsys, "-m", bundle, "-i", photo_paths[0], "-p", prompt, *BASE)
    assert_one_line_error(code, err, message)


JSONL = {
    "not-utf8": (b'{"image": "a.jpg", "prompt": "caf\xe9"}\n', "is not valid UTF-8"),
    "empty-prompt": (b'{"image": "a.jpg", "prompt": ""}\n', "batch.jsonl:1 prompt is empty"),
    "no-rows": (b"\n\n", "has no rows"),
}


@pytest.mark.parametrize("case", JSONL)
def test_bad_batch_file(bundle, tmp_path, capsys, case: str) -> None:
    data, message = JSONL[case]
    batch = tmp_path / "batch.jsonl"
    batch.write_bytes(data)
    code, _, err = run(capsys, "-m", bundle, "--jsonl", batch, *BASE)
    assert_one_line_error(code, err, message)


FLAGS = {
    "max-new-tokens-0": (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    "max-new-tokens-neg": (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    "temperature-neg": (["--temperature", "-1"], "--temperature must be >= 0"),
    "top-p-0": (["--top-p", "0"], "--top-p must be in (0, 1]"),
    "top-k-neg": (["--top-k", "-2"], "--top-k must be >= 0"),
    "threads-neg": (["--threads", "-1"], "--threads must be >= 0"),
}


@pytest.mark.parametrize("case", FLAGS)
def test_bad_flag_value(bundle, photo_paths, capsys, case: str) -> None:
    extra, message = FLAGS[case]
    argv = ["-m", bundle, "-i", photo_paths[0], "-p", "hi", "--provider", "cpu", *extra]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, message)


def test_unknown_provider_is_an_argparse_error(bundle, photo_paths, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli(["-m", str(bundle), "-i", str(photo_paths[0]), "-p", "hi", "--provider", "gpu"])
    assert info.value.code == 2
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_chat_stdin_not_utf8(bundle, photo_paths, capsys, monkeypatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe broken\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    code, _, err = run(capsys, "-m", bundle, "-i", photo_paths[0], *BASE)
    assert_one_line_error(code, err, "stdin is not valid UTF-8")


def test_debug_shows_the_traceback(bundle, photo_paths, capsys) -> None:
    code, _, err = run(capsys, "-m", bundle, "-i", photo_paths[0], "-p", "", *BASE, "--debug")
    assert code == 2 and err[0].startswith("Traceback") and err[-1].startswith("error: ")


def test_real_cli_invalid_utf8_argv(bundle, photo_paths) -> None:
    """Real argv bytes that are not UTF-8: exit 2, one line, no traceback."""
    argv = [sys.executable, "-m", "runtime.run", "-m", str(bundle), "-i", str(photo_paths[0])]
    proc = subprocess.run(
        [*argv, "-p", b"caf\xe9?", *BASE], cwd=REPO, capture_output=True, text=True
    )
    err = proc.stderr.strip().splitlines()
    assert_one_line_error(proc.returncode, err, "-p is not valid UTF-8")


def test_ctrl_c_is_one_line(bundle, photo_paths, capsys, monkeypatch) -> None:
    import runtime.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.run, "Pipeline", interrupted)
    code, _, err = run(capsys, "-m", bundle, "-i", photo_paths[0], "-p", "hi", *BASE)
    assert code == 130 and err == ["error: interrupted"]
