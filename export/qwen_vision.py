"""Trace the pruned Qwen2.5-VL vision module to vision_encoder.onnx and check it against PyTorch.

    dynamic (default)  pixel_values (num_patches, C*T*P*P) float32 + image_grid_thw (1, 3) int64
                       -> image_features (K, D), kept_indices (K,) int64; method none: N rows
    static (fixed_size=(H, W), e.g. 448x448 for TensorRT)  pixel_values (H*W/P^2, C*T*P*P)
                       only: the grid, window mask and rotary tables are graph constants

The runtime checks a grid against the graph before it runs it (runtime/qwen_vision_inputs.py);
`python -m export.qwen_sites` prints the score-site comparison behind SITE_CHOICE.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.lean import Weights, capture
from export.vision import (
    OPSET,
    ExportValidationError,
    cpu_session,
    finish_vision_graph,
)
from runtime import contract as C
from runtime import parity as P
from runtime.qwen_vision_inputs import check_inputs
from svdprune_onnx.qwen_vision import PrunedQwenVision
from svdprune_onnx.select import NONE

Sample = tuple[np.ndarray, np.ndarray]  # (pixel_values (P, C*T*ps*ps), image_grid_thw (1, 3))


def _dummy(module: PrunedQwenVision) -> Sample:
    """Trace inputs: the static grid, or a non-square grid with at least min_tokens tokens."""
    if module.fixed:
        grid = module.grid.numpy()
    else:
        side = max(2, math.ceil(math.sqrt(module.min_tokens)))
        grid = np.array([[1, side * module.merge, (side + 1) * module.merge]], np.int64)
    dim = module.visual.patch_embed.proj.weight[0].numel()
    gen = torch.Generator().manual_seed(0)
    return torch.randn(int(grid.prod()), dim, generator=gen).numpy(), grid


def export_qwen_vision(
    module: PrunedQwenVision, path: Path, weights: Weights | None = None
) -> None:
    """Export (dynamic resolution, or the module's fixed_size); checker-clean, no Loop/If/Scan.
    `weights` (lean): `module` holds stand-ins; each weight is streamed from the checkpoint as
    the graph is written (export/lean.py), as export.vision does for LLaVA."""
    pixels, grid = _dummy(module)
    args = (torch.from_numpy(pixels),)
    inputs = [C.PIXEL_VALUES]
    axes = {}
    if not module.fixed:
        args += (torch.from_numpy(grid),)
        inputs.append(C.IMAGE_GRID_THW)
        axes[C.PIXEL_VALUES] = {0: C.AXIS_PATCHES}
        if module.prune.method == NONE:
            axes[C.IMAGE_FEATURES] = axes[C.KEPT_INDICES] = {0: C.AXIS_IMAGE_TOKENS}
    lean = weights is not None
    with (
        capture(weights) if lean else contextlib.nullcontext({}) as captured,
        warnings.catch_warnings(),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET, dynamic_axes=axes,
            input_names=inputs, output_names=[C.IMAGE_FEATURES, C.KEPT_INDICES],
        )  # fmt: skip
    finish_vision_graph(path, _output_shapes(module), captured if lean else None, weights)


def _output_shapes(module: PrunedQwenVision) -> dict[str, list]:
    # TorchScript names derived axes "Gatherimage_features_dim_0"; state the real ones.
    if module.prune.method != NONE:
        rows = module.prune.k
    else:
        rows = module.prune.n if module.fixed else C.AXIS_IMAGE_TOKENS
    return {C.IMAGE_FEATURES: [rows, module.out_dim], C.KEPT_INDICES: [rows]}


def run_qwen_vision(
    sess: ort.InferenceSession | Path, pixel_values: np.ndarray, image_grid_thw: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One image through the graph: (image_features (K, D), kept_indices (K,)). The grid is
    fed only where the graph has that input (the static graph has it built in)."""
    sess = sess if isinstance(sess, ort.InferenceSession) else cpu_session(Path(sess))
    feed = {C.PIXEL_VALUES: pixel_values}
    if C.IMAGE_GRID_THW in {i.name for i in sess.get_inputs()}:
        feed[C.IMAGE_GRID_THW] = image_grid_thw
    feats, idx = sess.run([C.IMAGE_FEATURES, C.KEPT_INDICES], feed)
    return feats, idx


def qwen_vision_refs(module: PrunedQwenVision, samples: list[Sample]) -> list[tuple]:
    """PyTorch's (features, kept indices, scores) per image, for validate_qwen_vision."""
    out = []
    with torch.no_grad():
        for pixels, grid in samples:
            x, g = torch.from_numpy(pixels), torch.from_numpy(grid)
            out.append(tuple(t.numpy() for t in module.outputs(x, g)))
    return out


def validate_qwen_vision(
    path: Path, module: PrunedQwenVision, samples: list[Sample], refs: list[tuple]
) -> dict:
    """ORT vs PyTorch's `refs` on each image (each at its own resolution), relative to scale.

    As export.vision.validate_vision: features compared on the rows both kept (FEATURE_RTOL of
    their scale), kept indices by agreement and leverage mass against PyTorch's own scores."""
    sess = cpu_session(path)
    worst_rel, equal, figs = 0.0, True, []
    for (pixels, grid), (ref_feats, ref_idx, scores) in zip(samples, refs, strict=True):
        check_inputs(pixels, grid, module.merge, module.min_tokens, module.n_max)
        feats, idx = run_qwen_vision(sess, pixels, grid)
        if idx.dtype != np.int64 or idx.shape != ref_idx.shape:
            raise ExportValidationError(
                f"kept_indices is {idx.dtype}{list(idx.shape)}, expected int64{list(ref_idx.shape)}"
            )
        same = idx == ref_idx
        rel = P.rel_diff(feats[same], ref_feats[same]) if same.any() else 0.0
        if not rel <= P.FEATURE_RTOL:  # also catches NaN
            raise ExportValidationError(
                f"image_features differ from PyTorch by {rel:.3g} of their scale "
                f"(> {P.FEATURE_RTOL}) on a {grid[0, 1]}x{grid[0, 2]}-patch image"
            )
        worst_rel, equal = max(worst_rel, rel), equal and bool(same.all())
        figs.append(P.selection_figures(idx[None], ref_idx[None], scores[None]))
    fig = {key: min(f[key] for f in figs) for key in ("agreement_min", "mass_min")}
    if why := P.below_floor(fig):
        raise ExportValidationError(f"ORT and PyTorch keep different tokens: {why}")
    return {C.VAL_FEATURES_REL: worst_rel, "kept_indices_equal": equal, C.VAL_SELECTION: fig}
