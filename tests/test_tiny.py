"""The built-in tiny LLaVA: builds offline, reloads through the normal HF APIs, runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

from svdprune_onnx import tiny

IMAGES = Path(__file__).resolve().parents[1].parent / "shared/data/images"
N_IMAGE_TOKENS = 576  # (336 / 14) ** 2, for both towers
PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
VARIANTS = [
    ("clip", "llama"),
    ("siglip", "llama"),
    ("clip", "qwen2"),
    ("clip", "mistral"),
    ("siglip", "mistral"),
]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def built(models_dir: Path) -> dict[tuple[str, str], Path]:
    # Built once per session: every test below reads these folders and never writes them.
    return {
        (tower, text): tiny.ensure_tiny_llava(models_dir, tower=tower, text=text)
        for tower, text in VARIANTS
    }


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    path = IMAGES / "coco_cats.png"
    # A missing fixture image is a broken checkout, not an optional feature: fail loudly.
    if not path.is_file():
        pytest.fail(
            f"test image missing: {path} (expected the shared data folder next to the repo)"
        )
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize(("tower", "text"), VARIANTS)
def test_variant_reloads_and_generates(built, photo, tower: str, text: str) -> None:
    path = built[tower, text]
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(processor, LlavaProcessor)
    assert model.config.vision_config.model_type == f"{tower}_vision_model"
    assert model.config.text_config.model_type == text
    assert model.dtype == torch.float32

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPT

    inputs = processor(images=photo, text=PROMPT, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    ids = inputs["input_ids"]
    assert int((ids == model.config.image_token_index).sum()) == N_IMAGE_TOKENS
    assert ids[0, 0] == processor.tokenizer.bos_token_id

    with torch.no_grad():
        logits = model(**inputs).logits
        # min_new_tokens: random weights may emit EOS early; the shape must not depend on luck.
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert out.shape == (1, ids.shape[1] + 5)


def test_default_name_and_reuse(built, models_dir: Path, capsys) -> None:
    assert built["clip", "llama"] == models_dir / tiny.TINY_NAME
    assert built["siglip", "mistral"].name == "tiny-llava-siglip-mistral"
    # Already built: returned as is, without announcing a build.
    assert tiny.ensure_tiny_llava(models_dir) == models_dir / tiny.TINY_NAME
    assert capsys.readouterr().out == ""


def test_seed_determinism(built, tmp_path: Path) -> None:
    ref = load_file(built["clip", "llama"] / "model.safetensors")
    same = load_file(tiny.build_tiny_llava(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(tiny.build_tiny_llava(tmp_path / "other", seed=1) / "model.safetensors")
    assert ref.keys() == same.keys() == other.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], other[k]) for k in ref)


@pytest.mark.parametrize(
    "s",
    [
        "",
        "a",
        " leading and trailing ",
        "Héllo wörld! 猫が2匹 🐱\n\ttabs  and . , ? spacing",
        "x\r\n\x00",
    ],
)
def test_tokenizer_round_trip(built, s: str) -> None:
    tok = AutoTokenizer.from_pretrained(built["clip", "llama"])
    assert len(tok) == tiny.VOCAB_SIZE
    ids = tok(s)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == s


def test_existing_folder(built, tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(FileExistsError):
        tiny.build_tiny_llava(tmp_path / "half")
    # Complete but a different variant: refusing beats silently returning the wrong model.
    with pytest.raises(FileExistsError):
        tiny.build_tiny_llava(built["clip", "llama"], tower="siglip")


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    # The model is already saved into the temp dir when the processor save fails.
    monkeypatch.setattr(LlavaProcessor, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        tiny.build_tiny_llava(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tower"):
        tiny.build_tiny_llava(tmp_path / "m", tower="vit")
    with pytest.raises(ValueError, match="text"):
        tiny.build_tiny_llava(tmp_path / "m", text="gpt2")
