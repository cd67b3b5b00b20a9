"""A built-in tiny LLaVA checkpoint made from a config, fully offline.

Tests and `make export` need a real Hugging Face LLaVA folder without any network access, so this
module builds one: random fp32 weights from a fixed seed, a byte-level BPE tokenizer trained in code
on a small built-in corpus, and the matching image processor / processor / chat template. The shapes
that matter for token pruning are realistic (336 px, patch 14 -> 576 image tokens); the widths are
tiny so a build takes seconds on a laptop CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from svdprune_onnx import realistic

TINY_NAME = "tiny-llava"
DEFAULT_MODELS_DIR = Path("build/models")


@dataclass(frozen=True)
class Sizes:
    """Widths and depths of a built-in checkpoint (the token count is always 576)."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab: int | None = None  # None: the tokenizer's size
    tie_embeddings: bool = False
    # Outlier tokens in the tower and massive activations in the decoder, as real checkpoints
    # have (svdprune_onnx/realistic.py): the numerics random weights hide.
    realistic: bool = False


PRESETS: dict[str, Sizes] = {
    # Seconds to build and export on 2 cores: mechanics only.
    "tiny": Sizes(64, 128, 3, 4, 64, 128, 2, 4, 2),
    # The tiny tower with a 512-wide Llama-style decoder (4.8 M weights): big enough that weight
    # bytes, not graph structure, set a decoder file's size (the q4 size test), still seconds.
    "small": Sizes(64, 128, 3, 4, 512, 1408, 2, 8, 2),
    # Weight-dominated: the tiny tower, 2 text layers 1024 wide and a 131,072-token vocabulary
    # (two 512 MiB tables, untied): the export's peak-memory test (tests/test_lean.py).
    "wide": Sizes(64, 128, 3, 4, 1024, 1408, 2, 8, 2, vocab=131072),
    # The tiny shapes with real-checkpoint activation statistics: parity, fidelity and e2e tests.
    "realistic": Sizes(64, 128, 3, 4, 64, 128, 2, 4, 2, realistic=True),
    # Real shapes (random weights): CLIP ViT-L/14-336 + a Qwen2-0.5B-shaped decoder, as
    # llava-interleave-qwen-0.5b deploys; for export cost and latency figures, not for tests.
    "medium": Sizes(1024, 4096, 24, 16, 896, 4864, 24, 14, 2, 151936, True),
}

TOWERS = ("clip", "siglip")
TEXT_MODELS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}

IMAGE_SIZE = 336
PATCH_SIZE = 14
VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKEN = "<image>"

# Everything from_pretrained needs; the folder only appears via an atomic rename, so these existing
# means a finished build, and their absence means someone else's (or a broken) folder.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)

# Small English corpus so the BPE learns real-looking subwords (prompts tokenize to few tokens).
# It is data, not behaviour: changing it changes the vocabulary and therefore every checkpoint.
CORPUS = """\
A cat is sleeping on a red couch next to a window.
Two dogs are running across a green field in the park.
A man is riding a bicycle down a busy city street.
A woman is holding an umbrella while waiting for the bus.
There is a plate of food with rice, broccoli and a carrot on the table.
A group of people are standing near a train station.
The kitchen has a white refrigerator, a microwave and an oven.
A little girl is flying a kite on the beach.
A boat is floating on the calm water of the lake.
A plane is flying over the mountains under a blue sky.
Two cats are lying on a pink blanket with remote controls.
A pizza with cheese and tomatoes sits on a wooden board.
A man in a suit and tie is talking on a cell phone.
A young boy is playing tennis with a racket on a clay court.
A giraffe is eating leaves from a tall tree at the zoo.
An elephant walks slowly through the dry grass.
A bowl of fruit with bananas, apples and oranges is on the counter.
A laptop and a keyboard are on a desk beside a cup of coffee.
Cars and trucks are stopped at a traffic light in the rain.
A skier is going down a snowy hill on a sunny day.
A surfer is riding a big wave in the ocean.
A clock tower stands in the middle of the old town square.
A teddy bear is sitting on a bed with white sheets.
A horse and a cow are grazing in a fenced pasture.
A bathroom with a toilet, a sink and a mirror on the wall.
People are eating sandwiches and drinking wine at a dining table.
A man is ironing clothes on the back of a yellow taxi.
The living room has a television, a vase of flowers and a bookshelf.
A baseball player swings the bat while the catcher waits.
A sheep and a small lamb are resting in the shade of a barn.
Someone left a backpack and a suitcase beside the bench at the airport.
A motorcycle is parked in front of a bakery selling donuts and bread.
Three zebras drink from a muddy river while birds fly above them.
A smiling chef puts a hot dog and some fries into a paper basket.
A person is cutting a cake with a knife at a birthday party.
Is there a dog in the image? Yes, there is a dog. No, there is no dog.
Describe the image in detail. What is in this picture? How many animals are there?
What color is the car? The car is red. Where is the person standing?
USER: What is shown in the image? ASSISTANT: The image shows two cats.
Is there a cat in the image? yes no Is there a person in the image? Answer yes or no.
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign
parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat baseball glove skateboard
surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange
broccoli carrot hot dog pizza donut cake chair couch potted plant bed dining table toilet tv laptop
mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase scissors
teddy bear hair drier toothbrush
"""

# LLaVA-1.5 prompt format ("USER: <image>\n... ASSISTANT:"), same shape as llava-hf's template so
# code written against real checkpoints renders identical prompts here.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] + ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE on CORPUS and wrap it for transformers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Byte-level with no prefix space: every byte string is representable, so decode(encode(s))
    # round-trips arbitrary unicode, which a char-level vocab from a tiny corpus could not.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # LLaVA prompts start with BOS; adding it in the post-processor makes tokenizer(...) and the
    # LlavaProcessor agree without callers remembering to prepend it.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        # Exposes tokenizer.image_token / image_token_id, which LlavaProcessor prefers.
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="left",  # batched generation needs left padding
        # No token_type_ids: LLaVA's forward/generate reject unknown inputs.
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,  # the cleanup would break the exact round-trip
    )


def llava15_image_processor() -> CLIPImageProcessor:
    """LLaVA-1.5's preprocessing: shortest edge 336, center crop 336, OpenAI mean/std, bicubic."""
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        resample=PILImageResampling.BICUBIC,
    )


def _vision_parts(tower: str, size: Sizes) -> tuple[object, int | list[int], str, object, int]:
    """Vision config, feature layer, select strategy, image processor, extra (CLS) tokens."""
    sizes = dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
    )
    if tower == "clip":
        # llava-1.5 recipe: penultimate layer, drop CLS ("default") -> 576 of 577 positions.
        image_processor = llava15_image_processor()
        clip = CLIPVisionConfig(projection_dim=64, hidden_act="quick_gelu", **sizes)
        return clip, -2, "default", image_processor, 1
    # SigLIP has no CLS token, so all 576 positions are image tokens ("full").
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=PILImageResampling.BICUBIC,
    )
    return SiglipVisionConfig(**sizes), -1, "full", image_processor, 0


def _is_complete(path: Path, required: tuple[str, ...] = REQUIRED_FILES) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in required)


def _matches(path: Path, tower: str, text: str) -> bool:
    """Whether a finished folder holds the requested tower/text (seed is not recorded)."""
    cfg = json.loads((path / "config.json").read_text())
    return (
        cfg["vision_config"]["model_type"] == f"{tower}_vision_model"
        and cfg["text_config"]["model_type"] == text
    )


def _write_checkpoint(dst: Path, tower: str, text: str, seed: int, preset: str) -> None:
    """Build tokenizer, processor and model and save them all into `dst` (an existing dir)."""
    tokenizer = _build_tokenizer()
    size = PRESETS[preset]
    vision_config, feature_layer, strategy, image_processor, extra = _vision_parts(tower, size)
    text_config = TEXT_MODELS[text](
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=2048 if preset in ("tiny", "realistic") else 32768,
        vocab_size=size.vocab or len(tokenizer),
        tie_word_embeddings=size.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=size.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seed deterministically without clobbering the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    if size.realistic:
        realistic.perturb(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(dst, safe_serialization=True)

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=extra,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(dst)  # also writes the tokenizer files and chat template


def build_tiny_llava(
    out_dir: Path, *, tower: str = "clip", text: str = "llama", seed: int = 0, preset: str = "tiny"
) -> Path:
    """Build a tiny random LLaVA checkpoint folder at `out_dir` and return it.

    Same seed -> bitwise-identical weights. An already complete `out_dir` holding the same
    tower/text is returned as is; any other existing `out_dir` raises FileExistsError. The folder
    is built next to `out_dir` and renamed into place, so a failed build leaves nothing behind.
    """
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if text not in TEXT_MODELS:
        raise ValueError(f"text must be one of {tuple(TEXT_MODELS)}, got {text!r}")
    return build_atomically(
        Path(out_dir),
        lambda dst: _write_checkpoint(dst, tower, text, seed, preset),
        lambda path: _is_complete(path) and _matches(path, tower, text),
        f"tiny-llava-{tower}-{text}",
    )


def build_atomically(
    out_dir: Path, write: Callable[[Path], None], done: Callable[[Path], bool], what: str
) -> Path:
    """Return `out_dir`, filling it with `write(tmp_dir)` first unless it exists already.

    An existing `out_dir` for which `done` holds is returned as is; any other existing `out_dir`
    raises FileExistsError. The folder is written next to `out_dir` and renamed into place, so a
    failed build leaves nothing behind.
    """
    if out_dir.exists():
        if done(out_dir):
            return out_dir
        raise FileExistsError(f"{out_dir} exists but is not a complete {what}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent -> same filesystem, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Lost a race with a concurrent build of the same folder: theirs is as good as ours.
            if not done(out_dir):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def tiny_name(
    *, tower: str = "clip", text: str = "llama", seed: int = 0, preset: str = "tiny"
) -> str:
    """Folder name for a variant: plain TINY_NAME for the default, suffixed otherwise."""
    base = TINY_NAME if preset == "tiny" else f"{preset}-llava"
    name = base if (tower, text) == ("clip", "llama") else f"{base}-{tower}-{text}"
    # The seed is part of the name so a cached folder is never mistaken for another seed's weights.
    return name if seed == 0 else f"{name}-seed{seed}"


def ensure_tiny_llava(models_dir: Path = DEFAULT_MODELS_DIR, **kw) -> Path:
    """Return `models_dir / <variant name>`, building it first if it is missing."""
    out_dir = Path(models_dir) / tiny_name(**kw)
    if not _is_complete(out_dir):
        print(f"building tiny LLaVA checkpoint at {out_dir}", flush=True)
    return build_tiny_llava(out_dir, **kw)
