"""Checkpoints with a real model's shapes and random weights, written tensor by tensor.

    python -m bench.shaped llava-1.5-7b      -> build/models/llava-1.5-7b-shaped (~14 GB fp16)
    python -m bench.shaped qwen2.5-vl-3b     -> build/models/qwen2.5-vl-3b-shaped (~7 GB fp16;
                                                also `--family qwen2.5-vl --preset medium`)

For export dry runs at a size no built-in preset reaches (bench/export_memory.py --shape): the
model is never materialised (its parameters are listed on the meta device), every tensor is drawn,
cast to float16 and written to its safetensors shard on its own, so building a 7B checkpoint needs
the memory of one tensor. The tokenizer, processor and chat template are the tiny preset's
(token ids below its vocabulary; the extra rows of the embedding are just unused).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.models import REPO_ROOT
from runtime import contract as C

MODELS = REPO_ROOT / "build" / "models"
SHARD_BYTES = 4 * 2**30

# vision (CLIP ViT-L/14-336) and text sizes of the real checkpoints, from their config.json
SHAPES = {
    "llava-1.5-7b": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                   "projection_dim": 768},
        "text": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                 "head_dim": 128, "tie_word_embeddings": False},
    },
    # Qwen2.5-VL-3B-Instruct: 32 tower blocks of 1280 (full attention in 7, 15, 23, 31), 36
    # decoder layers of 2048 (2 KV heads), tied embeddings, the real 151,936-token vocabulary.
    "qwen2.5-vl-3b": {
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "out_hidden_size": 2048, "fullatt_block_indexes": [7, 15, 23, 31]},
        "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                 "tie_word_embeddings": True,
                 "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    },
}  # fmt: skip
QWEN = ("qwen2.5-vl-3b",)


def _draw(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """fp16 weights at a trained model's scale: norms near 1, everything else ~N(0, 0.02)."""
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= 0.02
    if "norm" in name and name.endswith("weight"):
        values += 1.0
    return values.astype(np.float16)


def build(shape: str, models: Path = MODELS, seed: int = 0) -> Path:
    """The `shape` checkpoint folder under `models`, built first if missing (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from export.safetensors_io import INDEX_FILE, write_shard
    from svdprune_onnx.tiny import ensure_tiny_llava
    from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl

    out = models / f"{shape}-shaped"
    if (out / INDEX_FILE).is_file():
        return out
    tiny = ensure_tiny_qwen25vl(models) if shape in QWEN else ensure_tiny_llava(models)
    cfg = json.loads((tiny / C.HF_CONFIG).read_text())
    cfg["vision_config"].update(SHAPES[shape]["vision"])
    cfg["text_config"].update(SHAPES[shape]["text"])
    cfg["text_config"].pop("layer_types", None)  # one per tiny layer: rebuilt for the new depth
    cfg["tie_word_embeddings"] = SHAPES[shape]["text"]["tie_word_embeddings"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=models))
    try:
        for name in C.HF_SIDE_FILES:  # tokenizer, processor, chat template, generation config
            if (tiny / name).is_file() and name != C.HF_CONFIG:
                shutil.copy2(tiny / name, tmp / name)
        (tmp / C.HF_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tmp))
        params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        count = sum(int(np.prod(dims)) for _, dims in params)
        print(f"{shape}: {count / 1e9:.2f} B parameters, {2 * count / 2**30:.1f} GiB in fp16")
        shards, current, size = [], [], 0
        for name, dims in params:  # ~SHARD_BYTES per file, as hub checkpoints are split
            nbytes = 2 * int(np.prod(dims))
            if current and size + nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
            current.append((name, dims, np.float16))
            size += nbytes
        shards.append(current)
        rng = np.random.default_rng(seed)
        weight_map, total = {}, 0
        for i, specs in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            produce = (_draw(rng, name, dims) for name, dims, _ in specs)
            total += write_shard(tmp / file, specs, produce)
            weight_map |= dict.fromkeys((name for name, _, _ in specs), file)
            print(f"  {file}: {len(specs)} tensors", flush=True)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.shaped", description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=tuple(SHAPES))
    print(build(ap.parse_args(argv).shape))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
