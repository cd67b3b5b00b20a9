"""Trace the pruned vision module to onnx/vision_encoder.onnx and check it against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from runtime import contract as C
from runtime import parity as P
from svdprune_onnx.vision import PrunedVision

OPSET = 18
# Ops the vision graph may not contain: control flow breaks TensorRT and transformers.js.
FORBIDDEN_OPS = frozenset({"Loop", "If", "Scan"})


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
    _constants_to_initializers(model)
    onnx.save(model, str(path))
    onnx.checker.check_model(model, full_check=True)
    bad = sorted({n.op_type for n in model.graph.node} & FORBIDDEN_OPS)
    if bad:
        raise ExportValidationError(f"vision graph contains control flow {bad}; cannot ship it")


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Top-level Constant nodes -> initializers: the traced graph holds one Constant node per
    scalar literal (hundreds in the pruning steps); as initializers they are data, not nodes
    for the session to plan and the node count reflects the ops that run."""
    keep = []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


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
    """Compare ORT with PyTorch on each batch, relative to scale (runtime.parity).

    Kept indices are judged by agreement and leverage mass against PyTorch's own scores (a
    borderline token may flip between kernels); image_features by the relative difference of
    the rows both kept. The figures go in the manifest; below a floor the export fails.
    """
    worst_abs = worst_rel = 0.0
    picks, ref_picks, ref_scores = [], [], []
    sess = _cpu_session(path)  # once: a pruned CLIP-L graph takes seconds to load
    for pixels in batches:
        x = torch.from_numpy(pixels)
        with torch.no_grad():
            ref_feats, ref_idx = (t.numpy() for t in module(x))
        feats, idx = _run(sess, pixels)
        if idx.dtype != np.int64 or idx.shape != ref_idx.shape:
            raise ExportValidationError(
                f"kept_indices is {idx.dtype}{list(idx.shape)}, expected int64{list(ref_idx.shape)}"
            )
        picks.append(idx)
        ref_picks.append(ref_idx)
        ref_scores.append(module.scores(x).numpy())
        same = idx == ref_idx  # (B, K): rows whose token agrees carry comparable features
        a, b = feats[same], ref_feats[same]
        rel = P.rel_diff(a, b) if a.size else 0.0
        worst_rel = max(worst_rel, rel)
        worst_abs = max(worst_abs, float(np.abs(a - b).max()) if a.size else 0.0)
        if not rel <= P.FEATURE_RTOL:  # also catches NaN
            raise ExportValidationError(
                f"image_features differ from PyTorch by {rel:.3g} of their scale "
                f"(> {P.FEATURE_RTOL}) on a batch of {len(pixels)}"
            )
    fig = P.selection_figures(
        np.concatenate(picks), np.concatenate(ref_picks), np.concatenate(ref_scores)
    )
    if why := P.below_floor(fig):
        raise ExportValidationError(f"ORT and PyTorch keep different tokens: {why}")
    return {
        "image_features_max_abs_diff": worst_abs,
        C.VAL_FEATURES_REL: worst_rel,
        "kept_indices_equal": all(map(np.array_equal, picks, ref_picks)),
        C.VAL_SELECTION: fig,
        "batch_sizes": [len(b) for b in batches],
    }
