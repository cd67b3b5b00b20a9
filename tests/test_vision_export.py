"""vision_encoder.onnx vs PyTorch: identical kept_indices, features within FEATURE_RTOL of their
scale, on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.load import load_image_processor, load_llava
from export.photos import validation_batches
from export.vision import FORBIDDEN_OPS, export_vision, run_vision
from runtime import contract as C
from runtime.parity import FEATURE_RTOL, rel_diff
from svdprune_onnx.select import EXPORTABLE_METHODS, NONE, PruneConfig
from svdprune_onnx.vision import PrunedVision

SIZE = (336, 336)


def llava_rows(model, pixels: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """transformers' own LLaVA image features, (B, N, D), gathered at the kept indices."""
    with torch.no_grad():
        full = torch.stack(list(model.get_image_features(torch.from_numpy(pixels))))
    return full.gather(1, idx.unsqueeze(-1).expand(-1, -1, full.shape[-1]))


@pytest.fixture(scope="module")
def clip_model(tiny_clip: Path):
    return load_llava(tiny_clip)


@pytest.mark.parametrize("method", EXPORTABLE_METHODS)
def test_ort_matches_pytorch(clip_model, clip_pixels, tmp_path: Path, method: str) -> None:
    k = 576 if method == NONE else 16
    module = PrunedVision(clip_model, PruneConfig(k=k, n=576, method=method)).eval()
    path = tmp_path / "vision.onnx"
    export_vision(module, path, SIZE)
    for pixels in (clip_pixels[:1], clip_pixels):  # batch 1 and 3, one graph
        with torch.no_grad():
            ref_feats, ref_idx = module(torch.from_numpy(pixels))
        feats, idx = run_vision(path, pixels)
        assert idx.dtype == np.int64 and idx.shape == (len(pixels), k)
        np.testing.assert_array_equal(idx, ref_idx.numpy())
        assert rel_diff(feats, ref_feats.numpy()) <= FEATURE_RTOL
        # ... and the module itself equals LLaVA's own features at those rows
        torch.testing.assert_close(ref_feats, llava_rows(clip_model, pixels, ref_idx))


def test_graph_contract(clip_model, tmp_path: Path) -> None:
    module = PrunedVision(clip_model, PruneConfig(k=32, n=576)).eval()
    path = tmp_path / "vision.onnx"
    export_vision(module, path, SIZE)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert not {n.op_type for n in model.graph.node} & FORBIDDEN_OPS

    def dims(vi) -> list:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,) = model.graph.input
    outs = {o.name: o for o in model.graph.output}
    assert inp.name == C.PIXEL_VALUES and dims(inp) == [C.AXIS_BATCH, 3, 336, 336]
    assert dims(outs[C.IMAGE_FEATURES]) == [C.AXIS_BATCH, 32, 64]
    assert dims(outs[C.KEPT_INDICES]) == [C.AXIS_BATCH, 32]
    assert outs[C.KEPT_INDICES].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_projected_scoring_and_rank_k(clip_model, clip_pixels, tmp_path: Path) -> None:
    cfg = PruneConfig(k=16, n=576, rank=16, scored_features=C.SCORED_PROJECTED, iterations=6)
    module = PrunedVision(clip_model, cfg).eval()
    export_vision(module, tmp_path / "v.onnx", SIZE)
    with torch.no_grad():
        ref_feats, ref_idx = module(torch.from_numpy(clip_pixels))
    feats, idx = run_vision(tmp_path / "v.onnx", clip_pixels)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    assert rel_diff(feats, ref_feats.numpy()) <= FEATURE_RTOL


def test_siglip_tower(tiny_siglip: Path, photo_paths, tmp_path: Path) -> None:
    """SigLIP has no [CLS]: strategy "full", all 576 patches scored."""
    model = load_llava(tiny_siglip)
    pixels = validation_batches(load_image_processor(tiny_siglip), photo_paths)[1]
    for method in ("gram", "cls_attn"):
        module = PrunedVision(model, PruneConfig(k=16, n=576, method=method)).eval()
        export_vision(module, tmp_path / f"{method}.onnx", SIZE)
        with torch.no_grad():
            ref_feats, ref_idx = module(torch.from_numpy(pixels))
        feats, idx = run_vision(tmp_path / f"{method}.onnx", pixels)
        np.testing.assert_array_equal(idx, ref_idx.numpy())
        assert rel_diff(feats, ref_feats.numpy()) <= FEATURE_RTOL
        torch.testing.assert_close(ref_feats, llava_rows(model, pixels, ref_idx))


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_graph_results(clip_model, clip_pixels, tmp_path) -> None:
    module = PrunedVision(clip_model, PruneConfig(k=16, n=576, iterations=4)).eval()
    export_vision(module, tmp_path / "d.onnx", SIZE, exporter="dynamo")
    with torch.no_grad():
        ref_feats, ref_idx = module(torch.from_numpy(clip_pixels))
    feats, idx = run_vision(tmp_path / "d.onnx", clip_pixels)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    assert rel_diff(feats, ref_feats.numpy()) <= FEATURE_RTOL
