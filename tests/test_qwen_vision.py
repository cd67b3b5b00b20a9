"""Qwen2.5-VL vision graph: ORT vs PyTorch vs transformers on real photos at two resolutions,
pruned (K = 16, 64) and unpruned, dynamic and fixed-size, and the in-graph window/rotary maths
vs transformers' own Python."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from export.qwen_vision import export_qwen_vision, qwen_vision_refs, run_qwen_vision
from export.qwen_vision import validate_qwen_vision as validate
from export.vision import FORBIDDEN_OPS
from runtime import contract as C
from runtime.mrope import grid_positions
from runtime.parity import rel_diff
from runtime.preprocess_qwen import preprocess_qwen, preprocess_qwen_fixed, vision_from_processor
from runtime.qwen_vision_inputs import GridError, check_grid, check_inputs
from svdprune_onnx import qwen_vision as QV
from svdprune_onnx.select import PruneConfig, PruneError, select_topk, spatial_priority

SIZES = [(448, 448), (640, 480)]  # (W, H) PIL resizes: grids 32x32 and 34x46 (644x476)
FIXED = (448, 448)
RTOL = 1e-5  # image_features vs PyTorch / transformers, relative to their scale


@pytest.fixture(scope="module")
def ckpt(tiny_qwen: Path) -> Path:
    return tiny_qwen


@pytest.fixture(scope="module")
def model(qwen_model):
    return qwen_model


@pytest.fixture(scope="module")
def facts(ckpt: Path) -> dict:
    return vision_from_processor(AutoImageProcessor.from_pretrained(ckpt, use_fast=False).to_dict())


@pytest.fixture(scope="module")
def samples(photo_paths: list[Path], facts: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every photo at every size, as runtime.preprocess_qwen feeds the graph."""
    photos = [Image.open(p).convert("RGB") for p in photo_paths]
    return [preprocess_qwen(im.resize(size), facts) for size in SIZES for im in photos]


@pytest.fixture(scope="module")
def hf_features(model, samples) -> list[np.ndarray]:
    """transformers' own get_image_features per image: (N, D) each."""
    with torch.no_grad():
        return [
            model.model.get_image_features(torch.from_numpy(p), torch.from_numpy(g))[0].numpy()
            for p, g in samples
        ]


def _module(model, k: int, method: str = "purify", fixed=None, site=QV.SCORE_SITE, iters=None):
    n = QV.token_count(model, fixed)
    cfg = PruneConfig(k=n if method == "none" else k, n=n, method=method, iterations=iters)
    return QV.PrunedQwenVision(model, cfg, site=site, fixed_size=fixed).eval()


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory) -> dict:
    """{name: (module, path)}: dynamic none / K=16 / K=64 and the fixed 448x448 K=16 graph."""
    out = tmp_path_factory.mktemp("qwen-vision")
    specs = {"none": (0, "none", None), 16: (16, "purify", None), 64: (64, "purify", None)}
    specs["fixed16"] = (16, "purify", FIXED)
    built = {}
    for name, (k, method, fixed) in specs.items():
        module = _module(model, k, method, fixed)
        path = out / f"{name}.onnx"
        export_qwen_vision(module, path)
        built[name] = (module, path)
    return built


def test_positions_and_windows_match_transformers(model) -> None:
    """The graph's rotary angles equal rot_pos_emb exactly, and its window slots group the
    patches as get_window_index / cu_window_seqlens do, on square, padded and tall grids:
    `back` inverts `gather`, every patch has one valid slot, windows are the same sets."""
    visual = model.model.visual
    module = _module(model, 4)
    for h, w in [(32, 32), (34, 46), (8, 10), (2, 2), (4, 62), (60, 6), (18, 18)]:
        grid = torch.tensor([[1, h, w]])
        rot = module.positions(grid, torch.tensor(h * w))
        assert torch.equal(rot, visual.rot_pos_emb(grid))
        gather, valid, back = module.window_slots(grid, torch.tensor(h * w))
        assert torch.equal(gather[back], torch.arange(h * w)) and int(valid.sum()) == h * w
        assert bool(valid.reshape(-1)[back].all())
        window = back // valid.shape[1]  # (P,) the window of each patch's slot
        index, cu = visual.get_window_index(grid)  # merged tokens in window order, bounds
        label = torch.empty(h * w // 4, dtype=torch.int64)
        bounds = torch.tensor(cu).unique_consecutive() // 4
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            label[index[a:b]] = i
        ours = window[::4]  # (N,): the 4 patches of a merged token share its window
        assert torch.equal(window.reshape(-1, 4), ours[:, None].expand(-1, 4))
        pairs = set(zip(label.tolist(), ours.tolist(), strict=True))
        assert len(pairs) == len(set(label.tolist())) == len(set(ours.tolist()))


def test_unpruned_equals_transformers(model, samples, hf_features, graphs) -> None:
    module, path = graphs["none"]
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == list(C.QWEN_VISION_INPUTS)
    for i, ((pixels, grid), ref) in enumerate(zip(samples, hf_features, strict=True)):
        if i % len(SIZES) == 0:  # PyTorch once per resolution (the tower is the slow part)
            with torch.no_grad():
                feats, _ = module(torch.from_numpy(pixels), torch.from_numpy(grid))
            assert rel_diff(feats.numpy(), ref) <= RTOL
        ort_feats, ort_idx = run_qwen_vision(path, pixels, grid)  # one graph, every resolution
        assert ort_feats.shape == ref.shape and rel_diff(ort_feats, ref) <= RTOL
        np.testing.assert_array_equal(ort_idx, np.arange(len(ref)))


@pytest.mark.parametrize("k", [16, 64])
def test_pruned_ort_matches_pytorch(graphs, samples, hf_features, k: int) -> None:
    module, path = graphs[k]
    if k == 64:  # every photo once, both resolutions: p0 and p2 at 448, p1 at 644x476
        samples, hf_features = samples[::2], hf_features[::2]
    refs = qwen_vision_refs(module, samples)
    fig = validate(path, module, samples, refs)
    assert fig["kept_indices_equal"] and fig[C.VAL_FEATURES_REL] <= RTOL
    for (feats, idx, _), full in zip(refs, hf_features, strict=True):
        assert idx.shape == (k,) and idx.dtype == np.int64 and (np.diff(idx) > 0).all()
        assert rel_diff(feats, full[idx]) <= RTOL  # the kept rows are transformers' rows
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    assert not {n.op_type for n in graph.graph.node} & FORBIDDEN_OPS
    dims = [
        [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
        for o in graph.graph.output
    ]
    assert dims == [[k, module.out_dim], [k]]


def test_fixed_size_graph(graphs, photo_paths, facts) -> None:
    """448x448 static graph: pixel_values only, no symbolic axis, the dynamic graph's tokens."""
    module, path = graphs["fixed16"]
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == [C.PIXEL_VALUES]
    for value in (*graph.graph.input, *graph.graph.output):
        assert all(d.dim_value > 0 for d in value.type.tensor_type.shape.dim), value.name
    onnx.checker.check_model(graph, full_check=True)
    assert not {n.op_type for n in graph.graph.node} & FORBIDDEN_OPS
    _, dynamic = graphs[16]
    fixed_samples = [preprocess_qwen_fixed(Image.open(p), facts, FIXED) for p in photo_paths]
    refs = qwen_vision_refs(module, fixed_samples)
    assert validate(path, module, fixed_samples, refs)["kept_indices_equal"]
    for pixels, grid in fixed_samples:
        feats, idx = run_qwen_vision(path, pixels, grid)
        dyn_feats, dyn_idx = run_qwen_vision(dynamic, pixels, grid)
        np.testing.assert_array_equal(idx, dyn_idx)
        assert rel_diff(feats, dyn_feats) <= RTOL
    with pytest.raises(GridError, match="preprocess_qwen_fixed"):
        module(torch.from_numpy(fixed_samples[0][0]), torch.tensor([[1, 34, 46]]))


def test_k_above_token_count_refused(model, graphs, photo_paths, facts) -> None:
    with pytest.raises(PruneError, match="fix --k"):  # static: at export
        PruneConfig(k=QV.token_count(model, FIXED) + 1, n=QV.token_count(model, FIXED))
    module, _ = graphs[64]
    pixels, grid = preprocess_qwen(Image.open(photo_paths[0]).resize((112, 112)), facts)
    assert grid.tolist() == [[1, 8, 8]]  # 16 tokens < K = 64: at run time, before ORT
    with pytest.raises(GridError, match="smaller K"):
        check_inputs(pixels, grid, module.merge, module.min_tokens, module.n_max)
    with pytest.raises(GridError, match="smaller K"):
        module(torch.from_numpy(pixels), torch.from_numpy(grid))
    with pytest.raises(GridError, match="multiples of"):
        QV.token_count(model, (450, 448))


@pytest.mark.parametrize(
    ("site", "method"),
    [
        (QV.MERGER_INPUT, "norm"),
        (QV.MERGER_INPUT, "uniform"),
        (QV.PATCHES, "random"),
        (QV.MERGED, "gram"),
    ],
)
def test_other_sites_and_methods(model, samples, tmp_path: Path, site: str, method: str) -> None:
    """Each site and the methods whose constants are sliced to N (random, gram) export and
    keep PyTorch's tokens (one photo per resolution)."""
    module = _module(model, 16, method, site=site, iters=4)  # gram: a smaller graph
    export_qwen_vision(module, tmp_path / "v.onnx")
    two = [samples[0], samples[-1]]
    fig = validate(tmp_path / "v.onnx", module, two, qwen_vision_refs(module, two))
    assert fig["kept_indices_equal"]


def test_select_tokens_is_select_topk() -> None:
    """The graph's selector keeps what select.select_topk keeps, ties included, at any N."""
    gen = torch.Generator().manual_seed(0)
    for n, grid, k in [(256, (16, 16), 16), (391, (17, 23), 64), (20, (4, 5), 16)]:
        prio = spatial_priority(n, grid, k)
        rank = torch.round(prio * (n + 1)).long()
        for scores in (torch.rand(1, n, generator=gen), torch.ones(1, n),
                       torch.randint(0, 3, (1, n), generator=gen).float()):  # fmt: skip
            got = QV.select_tokens(scores[0], k, rank)
            assert torch.equal(got, select_topk(scores, k, prio)[0])


def test_morton_rank_spreads() -> None:
    rank = QV.morton_rank(torch.tensor(16), torch.tensor(16), torch.tensor(256))
    assert sorted(rank.tolist()) == list(range(1, 257))
    first = torch.topk(rank, 16).indices  # the 16 kept first: every 4th row and column
    assert sorted((first // 16 % 4 + first % 4).tolist()) == [0] * 16


def test_grid_checks_and_positions() -> None:
    assert check_grid(np.array([[1, 34, 46]]), 2, 16, QV.N_MAX) == 391
    bad_grids = [([[2, 8, 8]], "still image"), ([[1, 7, 8]], "merge size"),
                 ([[1, 8, 8], [1, 8, 8]], "one image"), ([[1, 512, 512]], "cap")]  # fmt: skip
    for bad, match in bad_grids:
        with pytest.raises(GridError, match=match):
            check_grid(np.array(bad), 2, 16, QV.N_MAX)
    with pytest.raises(GridError, match="preprocess_qwen's two outputs"):
        check_inputs(np.zeros((10, 1176), np.float32), np.array([[1, 8, 8]]), 2, 4, QV.N_MAX)
    # kept_indices are row-major over the merged grid, as runtime.mrope reads them
    pos = grid_positions(np.array([[1, 34, 46]]), 2)[:, [0, 22, 23, 390]]
    np.testing.assert_array_equal(pos.T, [[0, 0, 0], [0, 0, 22], [0, 1, 0], [0, 16, 22]])
