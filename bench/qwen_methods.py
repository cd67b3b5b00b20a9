"""Which leverage method a Qwen2.5-VL bundle gets: each approximation vs float64 SVD, and its cost.

    python -m bench.qwen_methods [QWEN2.5-VL CHECKPOINT DIR]   (default: the built-in tiny one)

The merged features (what the language model receives, SCORE_SITE) of the shared photos at
their own size, at 1008x1008 and at 2 MP (N = 2542 tokens) are scored by exact leverage and by
purify / gram / power (their default iterations, r = 8); for K = 16 and 64 it prints the kept
set's agreement with exact and the exact leverage mass it keeps, and the scoring time in
PyTorch. The result is svdprune_onnx/qwen_vision.py's DEFAULT_METHOD.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

from runtime import parity as P
from runtime.preprocess import load_image
from runtime.preprocess_qwen import preprocess_qwen, vision_from_processor
from svdprune_onnx import qwen_vision as QV
from svdprune_onnx.select import PruneConfig, token_scores
from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
RESIZES = ((1008, 1008), (1732, 1155))  # (W, H) of the last photo: 1296 and 2542 tokens
METHODS = ("purify", "gram", "power")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ckpt = Path(argv[0]) if argv else ensure_tiny_qwen25vl()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(ckpt, use_fast=False, local_files_only=True)
    facts = vision_from_processor(processor.to_dict())
    module = QV.PrunedQwenVision(model.eval(), PruneConfig(k=16, n=QV.N_MAX)).eval()
    photos = [load_image(p) for p in sorted(IMAGES.glob("*"))]
    images = photos + [photos[-1].resize(size, Image.Resampling.BICUBIC) for size in RESIZES]
    print(
        "| image | N | K | method | agreement | leverage mass | ms |\n|---|---|---|---|---|---|---|"
    )
    for image in images:
        pixels, grid = preprocess_qwen(image, facts)
        with torch.no_grad():
            _, z = module.merger_input(torch.from_numpy(pixels), torch.from_numpy(grid))
            feats = module.visual.merger.mlp(z)[None]  # (1, N, D)
            n = feats.shape[1]
            rank = QV.morton_rank(grid[0, 1] // 2, grid[0, 2] // 2, torch.tensor(n))
            for k in (16, 64):
                exact = token_scores(feats, PruneConfig(k=k, n=n, method="exact"))[0]
                want = QV.select_tokens(exact, k, rank).numpy()[None]
                for method in METHODS:
                    t = time.perf_counter()
                    s = token_scores(feats, PruneConfig(k=k, n=n, method=method))[0]
                    ms = (time.perf_counter() - t) * 1e3
                    got = QV.select_tokens(s, k, rank).numpy()[None]
                    fig = P.selection_figures(got, want, exact.double().numpy()[None])
                    print(f"| {image.width}x{image.height} | {n} | {k} | {method} | "
                          f"{fig['agreement_min']:.3f} | {fig['mass_min']:.4f} | {ms:.0f} |",
                          flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
