"""Shared fixtures: the real photos from ../shared/data and tiny LLaVA checkpoints built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Verification stamps (runtime/bundle.py) go to a temp cache, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()


SHARED = REPO.parent / "shared" / "data"
IMAGES = SHARED / "images"


def _need(path: Path) -> Path:
    # The shared data is part of the test contract: missing means a broken checkout, so fail.
    if not path.exists():
        pytest.fail(f"shared test data missing: {path} (expected ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    """The three real photos (LLaVA demo images and the COCO cats)."""
    paths = sorted(p for p in _need(IMAGES).iterdir() if p.suffix in {".jpg", ".png"})
    if len(paths) < 3:
        pytest.fail(f"expected 3 photos in {IMAGES}, found {len(paths)}")
    return paths


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="session")
def tiny_clip(models_root: Path) -> Path:
    from svdprune_onnx.tiny import ensure_tiny_llava

    return ensure_tiny_llava(models_root, tower="clip", text="llama")


@pytest.fixture(scope="session")
def tiny_siglip(models_root: Path) -> Path:
    from svdprune_onnx.tiny import ensure_tiny_llava

    return ensure_tiny_llava(models_root, tower="siglip", text="qwen2")


@pytest.fixture(scope="session")
def realistic_clip(models_root: Path) -> Path:
    """tiny CLIP+Llama with real-checkpoint statistics (svdprune_onnx/realistic.py)."""
    from svdprune_onnx.tiny import ensure_tiny_llava

    return ensure_tiny_llava(models_root, tower="clip", text="llama", preset="realistic")


@pytest.fixture(scope="session")
def realistic_siglip(models_root: Path) -> Path:
    from svdprune_onnx.tiny import ensure_tiny_llava

    return ensure_tiny_llava(models_root, tower="siglip", text="qwen2", preset="realistic")


@pytest.fixture(scope="session")
def tiny_qwen(models_root: Path) -> Path:
    """The built-in tiny Qwen2.5-VL checkpoint (svdprune_onnx/tiny_qwen.py)."""
    from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl

    return ensure_tiny_qwen25vl(models_root)


@pytest.fixture(scope="session")
def qwen_model(tiny_qwen: Path):
    """tiny_qwen loaded by transformers, float32, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_qwen, local_files_only=True
    ).eval()


# Tiny Qwen2.5-VL bundles the test modules share (each exported once per session, on demand).
QWEN_BUNDLES = {
    "all": ["--method", "none"],
    "16": ["--k", "16"],
    "64": ["--k", "64"],
    "16c": ["--k", "16", "--positions", "compact"],
    "fixed16": ["--k", "16", "--image-size", "448x448"],
}


LLAVA_BUNDLES = {  # name -> export flags for tiny_clip (llava_bundle)
    "16": ["--k", "16"],
    # `norm` scoring opens in milliseconds where the unrolled iterations take seconds: for tests
    # about everything but the scores (serving, prompts, input handling)
    "16norm": ["--k", "16", "--method", "norm"],
    "16orig": ["--k", "16", "--positions", "original"],
}


def _bundle_getter(ckpt: Path, flags: dict[str, list[str]], root: Path):
    """get(name) -> root/<ckpt name>-k<name>, exported with flags[name] the first time asked."""
    from export.__main__ import cli

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = root / f"{ckpt.name}-k{name}"
            assert cli(["-m", str(ckpt), "-o", str(out), *flags[name]]) == 0
            made[name] = out
        return made[name]

    get.root = root
    return get


@pytest.fixture(scope="session")
def llava_bundle(tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory):
    """llava_bundle(name) -> the tiny LLaVA (CLIP x Llama) bundle LLAVA_BUNDLES[name], exported
    the first time it is asked for. Tests must not modify these bundles (copy them first)."""
    return _bundle_getter(tiny_clip, LLAVA_BUNDLES, tmp_path_factory.mktemp("llava-bundles"))


@pytest.fixture(scope="session")
def qwen_bundle(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory):
    """qwen_bundle(name) -> the tiny Qwen2.5-VL bundle QWEN_BUNDLES[name], exported the first
    time it is asked for, at <root>/tiny-qwen2.5-vl-k<name> (bench.qwen_profile's naming);
    qwen_bundle.root is that folder. Tests must not modify these bundles (copy them first)."""
    return _bundle_getter(tiny_qwen, QWEN_BUNDLES, tmp_path_factory.mktemp("qwen-bundles"))


@pytest.fixture(scope="session")
def clip_pixels(tiny_clip: Path, photo_paths: list[Path]) -> np.ndarray:
    """(3, 3, 336, 336) float32: the real photos through the tiny CLIP checkpoint's processor."""
    from export.load import load_image_processor
    from export.photos import validation_batches

    return validation_batches(load_image_processor(tiny_clip), photo_paths)[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests (tests/test_gpu.py; select them with `pytest -m gpu`) need CUDA: where
    runtime.session says its libraries cannot load, they are skipped with that reason."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    from runtime.session import CUDA, unusable_reason

    reason = unusable_reason(CUDA)
    if reason is not None:
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=f"needs a usable NVIDIA GPU: {reason}"))
