"""Trust: the runtime never unpickles or evaluates code; export never runs a checkpoint's code,
loads weights only through safetensors or `weights_only` torch.load, and two exports to the
same output cannot corrupt each other.

(Runtime side of "loads only manifest-listed files with matching sha256", paths escaping the
bundle and unlisted files: tests/test_bad_inputs_runtime.py.)
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bundle import load_manifest

from .conftest import REPO

UNPICKLERS = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "joblib", "cloudpickle"}
CODE_RUNNERS = {"eval", "exec", "compile", "__import__"}


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    """(dotted callee name, node) for every call in a file: `np.load`, `AutoX.from_pretrained`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            out.append((ast.unparse(node.func), node))
    return out


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return ast.literal_eval(k.value) if isinstance(k.value, ast.Constant) else "dynamic"
    return None


def test_runtime_never_unpickles_or_evaluates() -> None:
    files = sorted((REPO / "runtime").glob("*.py"))
    assert files
    for f in files:
        assert not _imports(f) & (UNPICKLERS | {"torch"}), f"{f.name} imports an unpickler"
        for name, call in _calls(f):
            assert name.split(".")[-1] not in CODE_RUNNERS, f"{f.name} calls {name}"
            if name.endswith(("np.load", "numpy.load")):  # .npy only: pickles stay refused
                assert _kw(call, "allow_pickle") in (None, False), f"{f.name}: {name} pickles"
            assert not name.endswith(("torch.load", "pickle.load", "pickle.loads")), name
            # The chat template comes from the bundle: only jinja2's sandbox may render it.
            if name.endswith(("Environment", "Template")):
                assert name.endswith("SandboxedEnvironment"), f"{f.name}: {name} unsandboxed"


def test_export_never_trusts_remote_code() -> None:
    files = sorted([*(REPO / "export").glob("*.py"), *(REPO / "svdprune_onnx").glob("*.py")])
    loads = 0
    for f in files:
        for name, call in _calls(f):
            if name.endswith(".from_pretrained"):
                loads += 1
                assert _kw(call, "trust_remote_code") in (None, False), f"{f.name}: {name}"
                assert _kw(call, "local_files_only") is True, f"{f.name}: {name} may download"
                assert _kw(call, "weights_only") in (None, True), f"{f.name}: {name}"
            if name.endswith("torch.load"):
                assert _kw(call, "weights_only") is True, f"{f.name}: {name} may unpickle"
    assert loads >= 3, "expected the model, image processor and processor loads"


def _with_remote_code(tiny_clip: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny checkpoint whose configs point at a custom module (auto_map)."""
    import json

    ckpt, sentinel = tmp_path / "remote", tmp_path / "REMOTE_CODE_RAN"
    shutil.copytree(tiny_clip, ckpt)
    (ckpt / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).touch()\n")
    auto_map = {
        "AutoConfig": "evil.Config",
        "AutoModelForImageTextToText": "evil.Model",
        "AutoImageProcessor": "evil.ImageProcessor",
        "AutoProcessor": "evil.Processor",
    }
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        cfg = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps(cfg | {"auto_map": auto_map}))
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    auto_tok = {"auto_map": {"AutoTokenizer": ["evil.Tokenizer", None]}}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg | auto_tok))
    return ckpt, sentinel


def test_checkpoint_code_is_never_imported(tiny_clip: Path, tmp_path: Path) -> None:
    from export.load import load_image_processor, load_llava
    from export.manifest import prompt_section

    ckpt, sentinel = _with_remote_code(tiny_clip, tmp_path)
    load_llava(ckpt)
    load_image_processor(ckpt)
    prompt_section(ckpt)
    assert not sentinel.exists(), "a checkpoint's auto_map module was imported"
    assert "evil" not in sys.modules


class _RunsCode:
    """Unpickling this runs a command: what a malicious pytorch_model.bin contains."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_bin_weights_load_weights_only(tiny_clip: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from export.load import CheckpointError, load_llava

    good = tmp_path / "bin"
    shutil.copytree(tiny_clip, good)
    torch.save(load_file(good / "model.safetensors"), good / "pytorch_model.bin")
    (good / "model.safetensors").unlink()
    load_llava(good)  # plain tensors: weights_only torch.load accepts them

    evil, sentinel = tmp_path / "evil", tmp_path / "PICKLE_RAN"
    shutil.copytree(good, evil)
    with (evil / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"weight": _RunsCode(sentinel)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_llava(evil)
    assert not sentinel.exists(), "a pickled payload ran"


def test_two_concurrent_exports_to_one_output(tiny_clip, photo_paths, tmp_path) -> None:
    """Both start at once: each either finishes a whole bundle (last writer wins, atomically)
    or is refused with one line because the other holds the output's lock; never a mix."""
    out = tmp_path / "shared-out"
    # `norm` keeps each export short; the writer under test is the same for every method.
    argv = [sys.executable, "-m", "export", "-m", str(tiny_clip), "--k", "16", "--method",
            "norm", "-i", str(photo_paths[0]), "-o", str(out)]  # fmt: skip
    procs = [
        subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert "Traceback" not in err
            assert err.strip().splitlines()[-1].startswith("error: another export to"), err
    load_manifest(out)  # every listed file present with its sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared-out"], "temp or lock left"
