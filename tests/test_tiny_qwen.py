"""The built-in tiny Qwen2.5-VL: builds offline, reloads through the normal HF APIs, generates on a
real photo at two resolutions with Qwen's real patching, windowing and prompt format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.utils import is_torchvision_available

from svdprune_onnx import tiny_qwen
from svdprune_onnx.families import FAMILIES

SIZES = [(448, 448), (640, 480)]  # (width, height): a square grid and one the windows must pad
NEW_TOKENS = 8
PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


class _ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor: transformers 4.57 insists on one, and the
    only one (Qwen2VLVideoProcessor) needs torchvision, which the export environment lacks."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen.ensure_tiny_qwen25vl(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def processor(built: Path) -> Qwen2_5_VLProcessor:
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(built, local_files_only=True, use_fast=False)
    # The same parts AutoProcessor would load, from the same files.
    tokenizer = AutoTokenizer.from_pretrained(built, local_files_only=True)
    return _ImageOnlyProcessor(
        image_processor=AutoImageProcessor.from_pretrained(
            built, local_files_only=True, use_fast=False
        ),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


@pytest.fixture(scope="module")
def model(built: Path) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(built, local_files_only=True).eval()


@pytest.fixture(scope="module")
def photo(photo_paths: list[Path]) -> Image.Image:
    return Image.open(photo_paths[0]).convert("RGB")


def test_config_mirrors_the_real_structure(model) -> None:
    cfg = model.config
    assert cfg.model_type in FAMILIES
    assert type(model).__name__ == FAMILIES[cfg.model_type].hf_class
    assert cfg.vision_config.model_type in FAMILIES[cfg.model_type].towers
    assert cfg.text_config.model_type in FAMILIES[cfg.model_type].text_models
    v = cfg.vision_config
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (14, 2, 2)
    assert v.window_size == 112 and v.hidden_act == "silu"
    assert v.out_hidden_size == cfg.text_config.hidden_size
    # Window attention in most blocks, full attention in some (the last), as in the real tower.
    full = set(v.fullatt_block_indexes)
    assert full and full < set(range(v.depth)) and v.depth - 1 in full
    assert len(model.model.visual.blocks) == v.depth
    t = cfg.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    assert sum(t.rope_scaling["mrope_section"]) * 2 == head_dim
    assert t.num_key_value_heads < t.num_attention_heads  # GQA, as the real decoder
    assert model.dtype == torch.float32


def test_special_tokens_and_prompt(built: Path, processor, model) -> None:
    tok = processor.tokenizer
    cfg = model.config
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny_qwen.SPECIAL_TOKENS}
    assert None not in ids.values() and len(set(ids.values())) == len(ids)
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert model.generation_config.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert len(tok) <= cfg.text_config.vocab_size
    # Special tokens are single tokens; Qwen adds no BOS.
    assert tok("<|im_start|>user")["input_ids"][0] == ids["<|im_start|>"]
    s = "Héllo wörld! 猫が2匹 🐱\n\ttabs  and . , ? spacing"
    assert tok.decode(tok(s)["input_ids"]) == s

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPT
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == PROMPT
    pre = AutoImageProcessor.from_pretrained(built, local_files_only=True, use_fast=False)
    assert (pre.min_pixels, pre.max_pixels) == (3136, 12845056)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_generates_at_native_resolution(processor, model, photo, size) -> None:
    inputs = processor(images=photo.resize(size), text=PROMPT, return_tensors="pt")
    h, w = smart_resize(size[1], size[0], factor=28, min_pixels=3136, max_pixels=12845056)
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, h // 14, w // 14]]
    n_patches = h // 14 * (w // 14)
    assert inputs["pixel_values"].shape == (n_patches, 3 * 2 * 14 * 14)
    ids = inputs["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == n_patches // 4

    # More than one 112-px window (so window attention really partitions the image).
    _, cu_window_seqlens = model.model.visual.get_window_index(grid)
    assert len(torch.unique_consecutive(torch.tensor(cu_window_seqlens))) - 1 > 1

    with torch.no_grad():
        # min_new_tokens: random weights may emit EOS early; the shape must not depend on luck.
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert out.shape == (1, ids.shape[1] + NEW_TOKENS)
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_auto_processor(built: Path) -> None:
    """Where torchvision is installed AutoProcessor loads the folder; where it is not, it fails
    exactly as for the real checkpoints (transformers 4.57 needs it for the video processor)."""
    if is_torchvision_available():
        assert isinstance(
            AutoProcessor.from_pretrained(built, local_files_only=True, use_fast=False),
            Qwen2_5_VLProcessor,
        )
    else:
        with pytest.raises(ImportError, match=r"(?i)torchvision"):
            AutoProcessor.from_pretrained(built, local_files_only=True, use_fast=False)


def test_deterministic_and_reused(built: Path, tmp_path: Path, capsys) -> None:
    again = tiny_qwen.build_tiny_qwen25vl(tmp_path / "again")
    weights = "model.safetensors"
    assert (again / weights).read_bytes() == (built / weights).read_bytes()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_text() == (built / name).read_text()
    other = tiny_qwen.build_tiny_qwen25vl(tmp_path / tiny_qwen.tiny_name(seed=1), seed=1)
    assert (other / weights).read_bytes() != (built / weights).read_bytes()

    # Already built: returned as is, without announcing (or doing) a build.
    stamp = (built / weights).stat().st_mtime_ns
    capsys.readouterr()
    assert tiny_qwen.ensure_tiny_qwen25vl(built.parent) == built
    assert capsys.readouterr().out == ""
    assert (built / weights).stat().st_mtime_ns == stamp


def test_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(FileExistsError):
        tiny_qwen.build_tiny_qwen25vl(tmp_path / "half")
