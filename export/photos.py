"""Validation inputs: real photos through the checkpoint's own image processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from runtime.preprocess import load_image


def synthetic_photo(size: int = 400) -> Image.Image:
    """A deterministic structured picture, used only when no real photo is available."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(9 * x) * 0.5 + 0.5, y, (x * y * 7) % 1.0], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def validation_batches(processor, paths: list[Path], big: int = 3) -> list[np.ndarray]:
    """[batch of 1, batch of `big`] pixel_values (float32) from `paths` (cycled if fewer)."""
    images = [load_image(p) for p in paths] or [synthetic_photo()]
    images = [images[i % len(images)] for i in range(big)]
    pixels = processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
    return [pixels[:1], pixels]
