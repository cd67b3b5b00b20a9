"""Trace the pruned vision module to onnx/vision_encoder.onnx and check it against PyTorch."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.lean import Weights, capture, finalize
from export.lean_ir import export_program, save_ir
from export.progress import steps
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
    weights: Weights | None = None,
) -> None:
    """Export with a dynamic batch axis (or a fixed `batch`); checker-clean, no Loop/If/Scan.

    With `weights` (the lean export, export/lean.py) `module` holds stand-ins: torchscript traces
    them and the real weights are streamed in after; dynamo reads each weight from the checkpoint
    as the graph is saved (export/lean_ir.py).

    A fixed batch leaves no symbolic dimension in the graph: TensorRT then builds one engine
    for one shape, with no optimisation profiles and no rebuilds.

    `torchscript` (the default, the route optimum takes too) traces the unrolled iterations in
    ~1-2 s; `dynamo` (torch.export) gives the same graph but takes ~20x longer on the thousands
    of small ops that unrolled Gram-Schmidt produces.
    """
    dummy = torch.zeros(batch or 2, 3, *image_size)
    names = {"input_names": [C.PIXEL_VALUES], "output_names": [C.IMAGE_FEATURES, C.KEPT_INDICES]}
    lean = weights is not None and exporter == "torchscript"
    with (
        capture(weights) if lean else contextlib.nullcontext({}) as captured,
        warnings.catch_warnings(),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dim = torch.export.Dim(C.AXIS_BATCH, min=1, max=1024)
            program = export_program(
                module,
                (dummy,),
                weights,
                opset_version=OPSET,
                dynamic_shapes={C.PIXEL_VALUES: {0: dim}} if batch is None else None,
                **names,
            )
            if weights is None:
                program.save(str(path))
            else:  # each weight read from the checkpoint as it is written
                save_ir(program.model, path)
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
    shapes = _output_shapes(module.prune.k, module.out_dim, batch)
    finish_vision_graph(path, shapes, captured if lean else None, weights)


def finish_vision_graph(path: Path, shapes: dict, captured: dict | None, weights) -> None:
    """The traced vision graph at `path` made shippable (both families): output shapes stated,
    Constant nodes as initializers, lean weights streamed in (`captured`: export/lean.py
    capture(), None when the trace held real weights), checker-clean, no control flow."""
    model = onnx.load(str(path), load_external_data=False)  # lean: the weightless graph
    set_output_shapes(model, shapes)
    _constants_to_initializers(model)
    onnx.save(model, str(path))
    if captured is not None:
        finalize(path, captured, weights, C.VISION_ONNX)
    onnx.checker.check_model(str(path), full_check=True)
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


def _output_shapes(k: int, dim: int, batch: int | None) -> dict[str, list]:
    # TorchScript names derived axes "Addimage_features_dim_1"; K and D are static, and clients
    # (TensorRT, transformers.js) read these shapes, so state them.
    b = C.AXIS_BATCH if batch is None else batch
    return {C.IMAGE_FEATURES: [b, k, dim], C.KEPT_INDICES: [b, k]}


def set_output_shapes(model: onnx.ModelProto, shapes: dict[str, list]) -> None:
    """Each graph output's dims as `shapes` states them (int: fixed, str: a named axis)."""
    for out in model.graph.output:
        for d, value in zip(out.type.tensor_type.shape.dim, shapes[out.name], strict=True):
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = value


def run_vision(path: Path, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime CPU run: (B,3,H,W) -> image_features (B,K,D), kept_indices (B,K)."""
    return _run(cpu_session(path), pixel_values)


def cpu_session(path: Path) -> ort.InferenceSession:
    """An export-time check's CPU session. No weight prepacking: MLAS would copy every MatMul
    weight into packed panels (1x the graph's weights more), while unpacked the weights stay in
    the page cache's map of <graph>_data; results differ by float rounding only (8.6e-7 abs on
    the medium vision features)."""
    opts = ort.SessionOptions()
    opts.add_session_config_entry(C.ORT_DISABLE_PREPACKING, "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats, idx = sess.run([C.IMAGE_FEATURES, C.KEPT_INDICES], {C.PIXEL_VALUES: pixel_values})
    return feats, idx


def vision_refs(module: PrunedVision, batches: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
    """PyTorch's (features, kept indices, scores) per batch, for validate_vision: computed
    before the ONNX Runtime session opens (the lean export releases the weights between)."""
    out = []
    with torch.no_grad():
        for pixels in batches:
            x = torch.from_numpy(pixels)
            feats, idx = module(x)
            out.append((feats.numpy(), idx.numpy(), module.scores(x).numpy()))
    return out


def validate_vision(
    path: Path, batches: list[np.ndarray], refs: list[tuple[np.ndarray, ...]]
) -> dict:
    """Compare ORT with PyTorch's `refs` (vision_refs) on each batch, relative to scale.

    Kept indices are judged by agreement and leverage mass against PyTorch's own scores (a
    borderline token may flip between kernels); image_features by the relative difference of
    the rows both kept. The figures go in the manifest; below a floor the export fails.
    """
    worst_abs = worst_rel = 0.0
    picks, ref_picks, ref_scores = [], [], []
    sess = cpu_session(path)  # once: a pruned CLIP-L graph takes seconds to load
    for pixels, (ref_feats, ref_idx, scores) in steps(zip(batches, refs, strict=True), "parity"):
        feats, idx = _run(sess, pixels)
        if idx.dtype != np.int64 or idx.shape != ref_idx.shape:
            raise ExportValidationError(
                f"kept_indices is {idx.dtype}{list(idx.shape)}, expected int64{list(ref_idx.shape)}"
            )
        picks.append(idx)
        ref_picks.append(ref_idx)
        ref_scores.append(scores)
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
