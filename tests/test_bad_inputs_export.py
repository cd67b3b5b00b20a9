"""Bad input to `python -m export`: one `error: ...` line, exit 2, nothing half-written left.

Complements tests/test_export_cli.py (K = 0 / K > N, bad --rank text, rank > N, a missing or
non-LLaVA -m, bad -i images, a failed re-export, an interrupted first export) with: partial
checkpoints, rank > K, unknown method, an output path that is not a bundle, a busy output
(another export holds its lock), a full disk, an interrupted re-export, and image processors
(classes, options, values) the runtime does not reproduce bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import export.vision
from export.__main__ import cli
from export.bundle import OutputError, atomic_dir, output_lock
from export.load import CheckpointError
from runtime import contract as C

from .conftest import REPO


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes): "untouched" means equal snapshots."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temp folders or lock files an export may leave beside its output: must be none."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or p.suffix == ".lock")


@pytest.fixture
def old_bundle(tmp_path: Path) -> Path:
    """A previous bundle at the output path (only svdprune.json marks a bundle to the writer)."""
    out = tmp_path / "bundle"
    (out / C.ONNX_DIR).mkdir(parents=True)
    (out / C.VISION_ONNX).write_bytes(b"previous graph")
    (out / C.MANIFEST_FILE).write_text(json.dumps({C.KEY_SCHEMA: C.SCHEMA_VERSION}))
    return out


def _partial(tiny_clip: Path, tmp_path: Path, case: str) -> Path:
    """A damaged copy of the tiny checkpoint."""
    d = tmp_path / case
    if case == "config-only":
        d.mkdir()
        shutil.copy2(tiny_clip / "config.json", d / "config.json")
        return d
    shutil.copytree(tiny_clip, d)
    weights = d / "model.safetensors"
    if case == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "missing-tensors":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        kept = {k: v for k, v in tensors.items() if ".layers.0." not in k}
        save_file(kept, weights, metadata={"format": "pt"})
    elif case == "bad-config-json":
        (d / "config.json").write_text("{ not json")
    elif case == "no-preprocessor":
        (d / "preprocessor_config.json").unlink()
    return d


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("config-only", "cannot load weights"),
        ("truncated-weights", "cannot load weights"),
        ("missing-tensors", "lacks 25 weights"),
        ("bad-config-json", "is not valid JSON"),
        ("no-preprocessor", "no usable preprocessor_config.json"),
    ],
)
def test_partial_checkpoint(tiny_clip, tmp_path, capsys, case: str, message: str) -> None:
    ckpt = _partial(tiny_clip, tmp_path, case)
    out = tmp_path / "out"
    assert cli(["-m", str(ckpt), "--k", "16", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "-1"], "K must be in 1..576"),
        (["--k", "4", "--rank", "8"], "rank must be in 1..K=4"),  # explicit rank > K
        (["--k", "16", "--rank", "17"], "rank must be in 1..K=16"),
        (["--k", "16", "--rank", "0"], "rank must be in 1..576"),
        (["--k", "576", "--method", "gram", "--rank", "577"], "rank must be in 1..576"),
    ],
)
def test_bad_pruning_flags(tiny_clip, tmp_path, capsys, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    assert cli(["-m", str(tiny_clip), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_unknown_method_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli(["--method", "svd"])
    assert info.value.code == 2
    assert "invalid choice: 'svd'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_output_that_is_not_a_bundle_is_refused(tiny_clip, tmp_path, capsys, kind) -> None:
    out = tmp_path / "mydata"
    if kind == "file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
    before = snapshot(tmp_path)
    assert cli(["-m", str(tiny_clip), "--k", "16", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists and is not a bundle" in err and "pass another -o" in err and "\n" not in err
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_busy_output_is_refused(tiny_clip, old_bundle, capsys) -> None:
    before = snapshot(old_bundle)
    with output_lock(old_bundle):  # as if another export were writing this bundle now
        assert cli(["-m", str(tiny_clip), "--k", "16", "-o", str(old_bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: another export to") and "\n" not in err, err
    assert snapshot(old_bundle) == before and leftovers(old_bundle.parent) == []


def test_disk_full_keeps_the_previous_bundle(tiny_clip, old_bundle, monkeypatch, capsys) -> None:
    before = snapshot(old_bundle)

    def full_disk(module, path: Path, *args, **kwargs) -> None:
        path.write_bytes(b"\0" * 4096)  # a half-written graph, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(export.vision, "export_vision", full_disk)
    assert cli(["-m", str(tiny_clip), "--k", "16", "-o", str(old_bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export to") and "No space left on device" in err, err
    assert "free space" in err and "\n" not in err
    assert snapshot(old_bundle) == before and leftovers(old_bundle.parent) == []


def test_interrupted_reexport_keeps_the_previous_bundle(tiny_clip, old_bundle, monkeypatch):
    before = snapshot(old_bundle)

    def interrupted(*args, **kwargs) -> None:
        raise KeyboardInterrupt  # Ctrl-C during the export

    monkeypatch.setattr(export.vision, "export_vision", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli(["-m", str(tiny_clip), "--k", "16", "-o", str(old_bundle)])
    assert snapshot(old_bundle) == before and leftovers(old_bundle.parent) == []


def test_atomic_dir_rules(tmp_path: Path, old_bundle: Path) -> None:
    """The writer itself: full disk late in the write, an empty folder is replaceable."""
    before = snapshot(old_bundle)

    def write_until_full() -> None:
        with atomic_dir(old_bundle) as tmp:
            (tmp / C.ONNX_DIR).mkdir()
            (tmp / C.DECODER_ONNX).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / C.MANIFEST_FILE))

    with pytest.raises(OutputError, match="No space left"):
        write_until_full()
    assert snapshot(old_bundle) == before and leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / C.MANIFEST_FILE).write_text("{}")
    assert snapshot(empty) == {C.MANIFEST_FILE: b"{}"} and leftovers(tmp_path) == []
    stale = tmp_path / f".{old_bundle.name}.tmp-999999"  # left by a killed export
    stale.mkdir()
    with atomic_dir(old_bundle) as tmp:
        (tmp / C.MANIFEST_FILE).write_text("{}")
    assert leftovers(tmp_path) == []


def test_real_cli_no_traceback_unless_debug(tiny_clip, tmp_path) -> None:
    ckpt = _partial(tiny_clip, tmp_path, "truncated-weights")
    argv = [sys.executable, "-m", "export", "-m", str(ckpt), "-o", str(tmp_path / "o")]
    plain = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert plain.returncode == 2, plain.stderr
    assert "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: cannot load weights")
    assert leftovers(tmp_path) == [] and not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError):  # --debug: the exception (and traceback) surfaces
        cli(["-m", str(ckpt), "-o", str(tmp_path / "o"), "--debug"])


def test_real_ctrl_c_mid_export(tiny_clip, old_bundle) -> None:
    """SIGINT while the vision graph is being exported: one line, exit 130, old bundle intact."""
    before = snapshot(old_bundle)
    argv = [sys.executable, "-m", "export", "-m", str(tiny_clip), "-o", str(old_bundle)]
    # A terminal's Ctrl-C reaches a process whose SIGINT is at its default. Under a background
    # job (`make test &`, nohup) the shell ignores SIGINT for the whole tree, and a Python
    # started that way installs no KeyboardInterrupt handler: restore the default for the child.
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # step lines are flushed as they start
        if line.startswith("[2/5]"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted")
    assert snapshot(old_bundle) == before and leftovers(old_bundle.parent) == []


# --- image processors the runtime does not reproduce (export/processor.py) ----------------------

CLIP15 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
SQUARE = {"size": {"height": 336, "width": 336}}


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        ("ViTImageProcessor", {}, "image processor ViTImageProcessor is not modelled"),
        ("CLIPImageProcessor", {**CLIP15, "do_pad": True}, "CLIPImageProcessor does not pad"),
        ("SiglipImageProcessor", {**SQUARE, "do_pad": True}, "SiglipImageProcessor does not pad"),
        ("SiglipImageProcessor", {**SQUARE, "do_center_crop": True}, "has no center crop"),
        ("SiglipImageProcessor", {**SQUARE, "crop_size": 336}, "has no center crop"),
        ("SiglipImageProcessor", {"size": 336}, "size=336 on SiglipImageProcessor is not a"),
        ("CLIPImageProcessor", {**CLIP15, "size": {"longest_edge": 336}}, "not a modelled form"),
        ("CLIPImageProcessor", {**CLIP15, "crop_size": {"shortest_edge": 336}}, "crop_size="),
        ("CLIPImageProcessor", {**CLIP15, "resample": 7}, "resample=7 on CLIPImageProcessor"),
        ("CLIPImageProcessor", {**CLIP15, "resample": None}, "resample=None"),
        ("CLIPImageProcessor", {**CLIP15, "image_grid_pinpoints": [[336, 672]]}, "anyres"),
        ("LlavaImageProcessor", {**CLIP15, "do_reduce_labels": True}, "do_reduce_labels=True"),
        ("CLIPImageProcessor", {**CLIP15, "do_resize": "false"}, "not true, false or null"),
        ("CLIPImageProcessor", {**CLIP15, "do_center_crop": False}, "its own size"),
        ("CLIPImageProcessor", {**CLIP15, "do_resize": False, "do_center_crop": False}, "own size"),
        ("CLIPImageProcessor", {**CLIP15, "image_mean": [0.5] * 4}, "not one number or 3"),
        ("CLIPImageProcessor", {**CLIP15, "image_std": [0.5, 0, 0.5]}, "divides by zero"),
        ("CLIPImageProcessor", {**CLIP15, "rescale_factor": float("nan")}, "not a finite number"),
        ("LlavaImageProcessor", {**CLIP15, "do_pad": True, "image_mean": 0.5}, "3-colour fill"),
        ("CLIPImageProcessor", {"size": 224, "crop_size": 224}, "not the vision tower's 336x336"),
    ],
)
def test_unmodelled_processor_is_refused(cls: str, options: dict, message: str) -> None:
    import transformers

    from export.processor import ImageProcessorError, preprocessing_facts

    with pytest.raises(ImageProcessorError) as info:
        preprocessing_facts(getattr(transformers, cls)(**options), [336, 336])
    text = str(info.value)
    assert message in text and text.startswith(C.HF_PREPROCESSOR_CONFIG) and "\n" not in text


def test_unset_unknown_options_are_ignored() -> None:
    from transformers import CLIPImageProcessor

    from export.processor import preprocessing_facts

    proc = CLIPImageProcessor(**CLIP15, do_reduce_labels=False, image_grid_pinpoints=None)
    assert preprocessing_facts(proc, [336, 336])[C.V_IMAGE_SIZE] == [336, 336]


def _with_processor(tiny_clip: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the tiny checkpoint whose preprocessor_config.json has `changes`."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_clip, ckpt)
    path = ckpt / C.HF_PREPROCESSOR_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return ckpt


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_processor_type": "ViTImageProcessor"}, "ViTImageProcessor is not modelled"),
        ({"do_pad": True}, "do_pad=True but CLIPImageProcessor does not pad"),
        (
            {"image_processor_type": "LlavaImageProcessor", "image_grid_pinpoints": [[336, 672]]},
            "image_grid_pinpoints=[[336, 672]] asks for LLaVA-NeXT anyres",
        ),
    ],
)
def test_checkpoint_with_unmodelled_processor(tiny_clip, tmp_path, capsys, changes, message):
    ckpt = _with_processor(tiny_clip, tmp_path, **changes)
    out = tmp_path / "out"
    assert cli(["-m", str(ckpt), "--k", "16", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {C.HF_PREPROCESSOR_CONFIG}: ") and "\n" not in err, err
    assert message in err, err
    assert not out.exists() and leftovers(tmp_path) == []


def test_runtime_pixels_that_differ_never_export(tiny_clip, tmp_path, capsys, monkeypatch):
    import runtime.preprocess

    real = runtime.preprocess.preprocess
    monkeypatch.setattr(runtime.preprocess, "preprocess", lambda im, v: real(im, v) + 1e-6)
    out = tmp_path / "out"
    assert cli(["-m", str(tiny_clip), "--k", "16", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "runtime preprocessing differs from the checkpoint's CLIPImageProcessor" in err, err
    assert "\n" not in err and not out.exists() and leftovers(tmp_path) == []
