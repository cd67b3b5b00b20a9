"""A built-in tiny Qwen2.5-VL checkpoint made from a config, fully offline.

The Qwen2.5-VL counterpart of svdprune_onnx/tiny.py (same conventions: fixed seed, a byte-level
BPE trained in code on tiny.CORPUS, atomic build, `ensure_*` builds when missing). What matters
for token pruning is real: native-resolution patching (patch 14, temporal patch 2, 2x2 merge, so
an image gives grid_h * grid_w / 4 tokens), window attention over 112-px windows with full
attention in the last block of each group, M-RoPE in the decoder, Qwen's special tokens, chat
template and preprocessing (min/max pixels). Widths and depths are tiny: a build takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    Qwen2VLImageProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from svdprune_onnx.tiny import CORPUS, DEFAULT_MODELS_DIR, Sizes, _is_complete, build_atomically

TINY_NAME = "tiny-qwen2.5-vl"
MODEL_TYPE = "qwen2_5_vl"

# Qwen2.5-VL-3B-Instruct's tower is 32 blocks of 1280 (16 heads, SiLU-gated MLP 3420) with full
# attention in blocks 7, 15, 23, 31 (the last of each group of 8) and window attention elsewhere;
# its decoder is 36 layers of 2048 (16 heads, 2 KV heads), tied embeddings. Here: the same
# structure at the tiny LLaVA's widths, depth 4 with the one full-attention block last.
SIZES = Sizes(
    vision_hidden=64,
    vision_intermediate=128,
    vision_layers=4,
    vision_heads=4,
    text_hidden=64,
    text_intermediate=128,
    text_layers=2,
    text_heads=4,
    text_kv_heads=2,
    tie_embeddings=True,
)
FULLATT_BLOCKS = [3]
# Presets built here: (sizes, full-attention blocks). Qwen2.5-VL-3B's shapes (3.8 B parameters,
# too big to initialise in memory here) are written tensor by tensor by bench/shaped.py.
PRESETS: dict[str, tuple[Sizes, list[int]]] = {"tiny": (SIZES, FULLATT_BLOCKS)}

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
WINDOW_SIZE = 112  # pixels: 8x8 patches, 4x4 merged tokens per window
TOKENS_PER_SECOND = 2  # the real 3B/7B value (the config class defaults to 4)
# The real preprocessor_config.json: 4 merged tokens minimum, 16384 maximum (56^2 and 28^2*16384).
MIN_PIXELS = 3136
MAX_PIXELS = 12845056
# The real head_dim is 128 with mrope_section [16, 24, 24] (temporal, height, width: 64 rotary
# pairs); the tiny head_dim is 16 (64 / 4 heads), so the same split scaled by 1/8.
MROPE_SECTION = [2, 3, 3]

VOCAB_SIZE = 1000  # BPE target for the regular (non-special) tokens
# Qwen2.5's added tokens in their real order; as in the real tokenizer they come right after the
# regular vocabulary (<|endoftext|> first), so their ids are len(regular vocab) + index.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
# The real vocab_size (151936) pads the 151665 tokens to a multiple of 128; so does this one.
VOCAB_MULTIPLE = 128

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5 checkpoint).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-VL-Instruct's chat template (tokenizer_config.json and chat_template.json of the real
# checkpoints, the Qwen2-VL one), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Everything from_pretrained needs (see tiny.REQUIRED_FILES); the real checkpoints' file set, which
# has no video_preprocessor_config.json (the video processor falls back to preprocessor_config).
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "chat_template.json",
)


def _build_tokenizer() -> Qwen2TokenizerFast:
    """Train a deterministic byte-level BPE on tiny.CORPUS with Qwen2's pipeline and tokens."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Qwen adds no BOS: the post-processor only fixes byte-level offsets.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # appended after the regular vocabulary, in order
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        # The Instruct checkpoints' choices: no BOS or UNK, EOS <|im_end|>, pad <|endoftext|>.
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
        errors="replace",
        split_special_tokens=False,
        padding_side="left",  # batched generation needs left padding (as tiny.py)
        clean_up_tokenization_spaces=False,
    )


def image_processor() -> Qwen2VLImageProcessor:
    """Qwen2.5-VL's preprocessing: smart resize to multiples of 28 within [MIN, MAX]_PIXELS."""
    return Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        resample=PILImageResampling.BICUBIC,
    )


def make_config(
    tokenizer: Qwen2TokenizerFast, size: Sizes = SIZES, fullatt: list[int] = FULLATT_BLOCKS
) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-3B-Instruct config.json at `size`'s widths and depths."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = size.vocab or -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    vision = dict(
        depth=size.vision_layers,
        hidden_size=size.vision_hidden,
        hidden_act="silu",
        intermediate_size=size.vision_intermediate,
        num_heads=size.vision_heads,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        tokens_per_second=TOKENS_PER_SECOND,
        window_size=WINDOW_SIZE,
        out_hidden_size=size.text_hidden,  # the merger projects straight to the decoder width
        fullatt_block_indexes=fullatt,
    )
    text = dict(
        vocab_size=vocab,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,  # as the real ones: full causal attention in every layer
        rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION},
        tie_word_embeddings=size.tie_embeddings,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids(IMAGE_TOKEN),
        video_token_id=ids(VIDEO_TOKEN),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=size.tie_embeddings,
    )


def _matches(path: Path) -> bool:
    return json.loads((path / "config.json").read_text()).get("model_type") == MODEL_TYPE


def _write_checkpoint(dst: Path, seed: int, preset: str = "tiny") -> None:
    """Build tokenizer, processor and model and save them all into `dst` (an existing dir)."""
    tokenizer = _build_tokenizer()
    config = make_config(tokenizer, *PRESETS[preset])
    # fork_rng: seed deterministically without clobbering the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    # The real generation_config.json's token ids; greedy (the real one samples with top_k=1,
    # which is greedy too, plus a repetition penalty that would only blur parity checks).
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        do_sample=False,
    )
    model.save_pretrained(dst, safe_serialization=True)

    # The processor's files, laid out as in the real checkpoints. Qwen2_5_VLProcessor itself
    # cannot be built here: transformers 4.57 requires its video processor, which needs
    # torchvision, so each part is saved on its own, tagged with the processor class.
    image = image_processor()
    for part in (tokenizer, image):
        part._set_processor_class("Qwen2_5_VLProcessor")
    image.save_pretrained(dst)  # preprocessor_config.json
    # The real tokenizer_config.json carries the template (tokenizer-only consumers and
    # transformers.js read it there); save_jinja_files=True would move it to chat_template.jinja.
    tokenizer.save_pretrained(dst, save_jinja_files=False)
    (dst / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False) + "\n"
    )


def _done(path: Path) -> bool:
    return _is_complete(path, REQUIRED_FILES) and _matches(path)


def build_tiny_qwen25vl(out_dir: Path, *, seed: int = 0, preset: str = "tiny") -> Path:
    """Build a tiny random Qwen2.5-VL checkpoint folder at `out_dir` and return it.

    Same seed -> bitwise-identical weights. An already complete Qwen2.5-VL `out_dir` is returned
    as is; any other existing `out_dir` raises FileExistsError. Atomic like tiny.build_tiny_llava.
    """
    return build_atomically(
        Path(out_dir), lambda dst: _write_checkpoint(dst, seed, preset), _done, TINY_NAME
    )


def tiny_name(*, seed: int = 0, preset: str = "tiny") -> str:
    """Folder name: TINY_NAME (medium-qwen2.5-vl for that preset), suffixed with the seed
    unless it is 0."""
    base = TINY_NAME if preset == "tiny" else f"{preset}-qwen2.5-vl"
    return base if seed == 0 else f"{base}-seed{seed}"


def ensure_tiny_qwen25vl(
    models_dir: Path = DEFAULT_MODELS_DIR, *, seed: int = 0, preset: str = "tiny"
) -> Path:
    """Return `models_dir / tiny-qwen2.5-vl` (or the preset's folder), building it if missing."""
    if preset not in PRESETS:
        raise ValueError(f"Qwen2.5-VL presets are {', '.join(PRESETS)}, not {preset!r}")
    out_dir = Path(models_dir) / tiny_name(seed=seed, preset=preset)
    if not _is_complete(out_dir, REQUIRED_FILES):
        print(f"building {preset} Qwen2.5-VL checkpoint at {out_dir}", flush=True)
    return build_tiny_qwen25vl(out_dir, seed=seed, preset=preset)
