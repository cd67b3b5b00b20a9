"""Node count of the pruning subgraph in the exported vision graph (issue: session creation
grew with the thousands of nodes of unrolled Gram-Schmidt). The default `purify` adds a fixed
number of nodes per step whatever the rank, so r = K = 64 costs what r = 8 does."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from export.load import load_llava
from export.vision import export_vision
from svdprune_onnx import leverage as lev
from svdprune_onnx.select import PruneConfig
from svdprune_onnx.vision import PrunedVision

N = 576
MAX_PRUNING_NODES = 300  # the pruning subgraph at the shipped iterations, any rank


def _nodes(model, cfg: PruneConfig, path: Path) -> int:
    export_vision(PrunedVision(model, cfg).eval(), path, (336, 336))
    graph = onnx.load(str(path), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "Constant"], "constants are initializers"
    return len(graph.node)


@pytest.fixture(scope="module")
def counts(tiny_clip: Path, tmp_path_factory) -> dict[str, int]:
    model = load_llava(tiny_clip)
    root = tmp_path_factory.mktemp("graph-size")
    cfgs = {
        "none": PruneConfig(k=N, n=N, method="none"),
        "default": PruneConfig(k=16, n=N),
        "r=K=64": PruneConfig(k=64, n=N, rank=64),
        "gram": PruneConfig(k=16, n=N, method=lev.GRAM),
    }
    return {name: _nodes(model, cfg, root / f"{name}.onnx") for name, cfg in cfgs.items()}


def test_default_is_purify() -> None:
    cfg = PruneConfig(k=16, n=N)
    assert cfg.method == lev.PURIFY and cfg.iterations == lev.DEFAULT_ITERATIONS[lev.PURIFY]


@pytest.mark.parametrize("name", ["default", "r=K=64"])
def test_pruning_subgraph_is_small(counts: dict[str, int], name: str) -> None:
    added = counts[name] - counts["none"]
    assert 0 < added <= MAX_PRUNING_NODES, f"{name}: pruning adds {added} nodes"


def test_node_count_does_not_grow_with_rank(counts: dict[str, int]) -> None:
    assert counts["r=K=64"] == counts["default"]
    # the unrolled Gram-Schmidt of gram at its defaults, for scale: ~10x as many (2,536 vs 263)
    assert counts["gram"] - counts["none"] > 8 * (counts["default"] - counts["none"])
