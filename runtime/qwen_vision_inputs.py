"""What a Qwen2.5-VL vision graph accepts, checked before the session runs (numpy only).

The graph (export/qwen_vision.py) computes window order, attention masks and rotary positions
itself from image_grid_thw, so the runtime feeds exactly what runtime.preprocess_qwen returns.
What the graph cannot check (ONNX has no assertions) is checked here, with errors that name the
fix: one still image (t = 1), a grid the 2x2 merger divides, at least K tokens (ONNX Runtime
would fail in TopK with "k argument ... should not be greater than ..."), at most the graph's
token cap, and pixel rows that match the grid. kept_indices index the merged grid row-major
over (t, h/m, w/m): runtime.mrope.grid_positions(grid)[:, kept_indices] are their positions.
"""

from __future__ import annotations

import numpy as np


class GridError(ValueError):
    """An image_grid_thw / pixel_values pair this vision graph cannot take; says what to change."""


def check_grid(grid_thw, merge: int, min_tokens: int, n_max: int) -> int:
    """Merged tokens N of one image's grid (1, 3) = (t, h, w) in patches, or GridError."""
    grid = np.asarray(grid_thw)
    if grid.shape != (1, 3) or not np.issubdtype(grid.dtype, np.integer):
        raise GridError(
            f"image_grid_thw must be one image's integer (1, 3) (t, h, w), got "
            f"{grid.dtype}{list(grid.shape)}; run one image per call"
        )
    t, h, w = (int(v) for v in grid[0])
    if t != 1:
        raise GridError(f"grid t = {t}: this vision graph takes one still image (t = 1), no video")
    if h < merge or w < merge or h % merge or w % merge:
        raise GridError(
            f"grid {h}x{w} patches is not a multiple of the merge size {merge}; preprocess with "
            "runtime.preprocess_qwen (sides are multiples of patch_size * merge_size)"
        )
    n = h * w // (merge * merge)
    if n < min_tokens:
        raise GridError(
            f"the image gives {n} tokens but this graph keeps K = {min_tokens}; use a larger "
            f"image (min_pixels >= {min_tokens} x 28^2) or a bundle exported with a smaller K"
        )
    if n > n_max:
        raise GridError(
            f"the image gives {n} tokens, above this graph's cap of {n_max}; lower max_pixels "
            "or export with a larger n_max"
        )
    return n


def check_inputs(pixel_values, grid_thw, merge: int, min_tokens: int, n_max: int) -> int:
    """check_grid, and pixel_values (h*w, C*T*P*P) float32 rows matching it. Returns N."""
    n = check_grid(grid_thw, merge, min_tokens, n_max)
    pixels = np.asarray(pixel_values)
    rows = int(np.prod(np.asarray(grid_thw)[0]))
    if pixels.ndim != 2 or pixels.shape[0] != rows or pixels.dtype != np.float32:
        raise GridError(
            f"pixel_values is {pixels.dtype}{list(pixels.shape)}, expected float32 [{rows}, "
            "C*T*P*P] for this grid; pass preprocess_qwen's two outputs together"
        )
    return n
