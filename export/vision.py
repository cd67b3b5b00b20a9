"""Trace the pruned vision module to onnx/vision_encoder.onnx and check it against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from runtime import contract as C
from svdprune_onnx.vision import PrunedVision

OPSET = 18
# Ops the vision graph may not contain: control flow breaks TensorRT and transformers.js.
FORBIDDEN_OPS = frozenset({"Loop", "If", "Scan"})
# Parity tolerance of image_features against PyTorch (float32, same algorithm).
FEATURE_ATOL = 1e-5


class ExportValidationError(RuntimeError):
    """The exported graph disagrees with PyTorch; nothing is written."""


EXPORTERS = ("torchscript", "dynamo")


def export_vision(
    module: PrunedVision,
    path: Path,
    image_size: tuple[int, int],
    exporter: str = "torchscript",
    batch: int | None = None,
) -> None:
    """Export with a dynamic batch axis (or a fixed `batch`); checker-clean, no Loop/If/Scan.

    A fixed batch leaves no symbolic dimension in the graph: TensorRT then builds one engine
    for one shape, with no optimisation profiles and no rebuilds.

    `torchscript` (the default, the route optimum takes too) traces the unrolled iterations in
    ~1-2 s; `dynamo` (torch.export) gives the same graph but takes ~20x longer on the thousands
    of small ops that unrolled Gram-Schmidt produces.
    """
    dummy = torch.zeros(batch or 2, 3, *image_size)
    names = {"input_names": [C.PIXEL_VALUES], "output_names": [C.IMAGE_FEATURES, C.KEPT_INDICES]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dim = torch.export.Dim(C.AXIS_BATCH, min=1, max=1024)
            program = torch.onnx.export(
                module,
                (dummy,),
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes={C.PIXEL_VALUES: {0: dim}} if batch is None else None,
                **names,
            )
            program.save(str(path))
        elif exporter == "torchscript":
            axes = {
                name: {0: C.AXIS_BATCH}
                for name in (C.PIXEL_VALUES, C.IMAGE_FEATURES, C.KEPT_INDICES)
            }
            torch.onnx.export(
                module, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                dynamic_axes=axes if batch is None else None, **names,
            )  # fmt: skip
        else:
            raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    model = onnx.load(str(path))
    _fix_output_shapes(model, module.prune.k, module.out_dim, batch)
    onnx.save(model, str(path))
    onnx.checker.check_model(model, full_check=True)
    bad = sorted({n.op_type for n in model.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise ExportValidationError(f"vision graph contains control flow {bad}; cannot ship it")


def _fix_output_shapes(model: onnx.ModelProto, k: int, dim: int, batch: int | None) -> None:
    # TorchScript names derived axes "Addimage_features_dim_1"; K and D are static, and clients
    # (TensorRT, transformers.js) read these shapes, so state them.
    b = C.AXIS_BATCH if batch is None else batch
    shapes = {C.IMAGE_FEATURES: [b, k, dim], C.KEPT_INDICES: [b, k]}
    for out in model.graph.output:
        for d, value in zip(out.type.tensor_type.shape.dim, shapes[out.name], strict=True):
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = value


def run_vision(path: Path, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime CPU run: (B,3,H,W) -> image_features (B,K,D), kept_indices (B,K)."""
    return _run(_cpu_session(path), pixel_values)


def _cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats, idx = sess.run([C.IMAGE_FEATURES, C.KEPT_INDICES], {C.PIXEL_VALUES: pixel_values})
    return feats, idx


def validate_vision(module: PrunedVision, path: Path, batches: list[np.ndarray]) -> dict:
    """Compare ORT with PyTorch on each batch; raise on any index or feature mismatch.

    Returns the largest differences seen, for the manifest and the console summary.
    """
    worst = 0.0
    sess = _cpu_session(path)  # once: a pruned CLIP-L graph takes seconds to load
    for pixels in batches:
        with torch.no_grad():
            ref_feats, ref_idx = module(torch.from_numpy(pixels))
        feats, idx = _run(sess, pixels)
        if idx.dtype != np.int64 or not np.array_equal(idx, ref_idx.numpy()):
            rows = np.where((idx != ref_idx.numpy()).any(axis=1))[0].tolist()
            raise ExportValidationError(
                f"kept_indices differ from PyTorch for images {rows} of a batch of {len(pixels)}"
            )
        diff = float(np.abs(feats - ref_feats.numpy()).max())
        worst = max(worst, diff)
        if not diff <= FEATURE_ATOL:  # also catches NaN
            raise ExportValidationError(
                f"image_features differ from PyTorch by {diff:.3g} (> {FEATURE_ATOL})"
            )
    return {
        "image_features_max_abs_diff": worst,
        "kept_indices_equal": True,
        "batch_sizes": [len(b) for b in batches],
    }
