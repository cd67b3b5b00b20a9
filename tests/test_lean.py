"""The lean export (export/lean.py) writes the same graphs as the full-load one, in less memory.

Same graphs (torchscript and dynamo routes alike): per graph file, the same nodes in the same
order (the exporter's Identity nodes for equal-valued weights compared as a set: their order is
the exporter's hash order), the same graph inputs and outputs, and every initializer
bit-identical, for both decoder routes and every dtype.
Less memory: a weight-dominated checkpoint's export peaks below 1.5x its largest graph's weights
over the process's own baseline, and the full-load route on the same checkpoint does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.__main__ import FULL, LEAN
from export.__main__ import cli as export_cli
from export.bundle import data_file
from export.dtypes import graph_bytes
from export.safetensors_io import ShardError, Shards, write_shard
from runtime import contract as C


def signature(path: Path) -> tuple:
    """(nodes but Identity, Identity (input, output) pairs sorted, inputs, outputs, weights)."""
    g = onnx.load(str(path)).graph  # external data too
    nodes = [
        (n.op_type, tuple(n.input), tuple(n.output), tuple(str(a) for a in n.attribute))
        for n in g.node
        if n.op_type != "Identity"
    ]
    twins = sorted((tuple(n.input), tuple(n.output)) for n in g.node if n.op_type == "Identity")
    weights = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    return nodes, twins, [str(v) for v in g.input], [str(v) for v in g.output], weights


def assert_same_graphs(a: Path, b: Path) -> None:
    for graph in C.GRAPH_FILES:
        *structure_a, weights_a = signature(a / graph)
        *structure_b, weights_b = signature(b / graph)
        assert structure_a == structure_b, graph
        assert weights_a.keys() == weights_b.keys(), graph
        for name, value in weights_a.items():
            other = weights_b[name]
            assert value.dtype == other.dtype and np.array_equal(value, other), (graph, name)


def bundle(ckpt: Path, out: Path, *flags: str) -> Path:
    assert export_cli(["-m", str(ckpt), "--k", "16", "-o", str(out), *flags]) == 0
    return out


@pytest.mark.parametrize(
    ("model", "route", "dtype"),
    [
        ("tiny_clip", "optimum", "fp32"),
        ("tiny_clip", "torch", "fp32"),
        ("tiny_siglip", "optimum", "q4f16"),
        ("tiny_siglip", "torch", "q4"),
        ("tiny_clip", "optimum", "fp16"),
        ("tiny_clip", "optimum", "int8"),
    ],
)
def test_lean_equals_full(
    request, tmp_path: Path, monkeypatch, model: str, route: str, dtype: str
) -> None:
    """The lean bundle is written with external data even for these tiny graphs (as a real
    model's are), so its dtype pass takes the streamed conversion (export/restream.py) while
    the full bundle's graphs convert in memory: the graphs must still be the same."""
    import export.lean

    ckpt = request.getfixturevalue(model)
    flags = ("--decoder-exporter", route, "--dtype", dtype)
    if (route, dtype) == ("torch", "fp32"):  # the dynamo vision route too (~20x slower trace)
        flags += ("--vision-exporter", "dynamo")
    full = bundle(ckpt, tmp_path / "full", *flags, "--export-memory", FULL)
    monkeypatch.setattr(export.lean, "INLINE_BYTES", 0)
    lean = bundle(ckpt, tmp_path / "lean", *flags, "--export-memory", LEAN)
    assert any(lean.rglob("*" + C.EXTERNAL_DATA_SUFFIX))
    assert_same_graphs(lean, full)


def test_bin_checkpoint_takes_the_full_route(tiny_clip: Path, tmp_path: Path, capsys) -> None:
    """No safetensors: lean cannot stream, and the step line says the full route runs instead."""
    import shutil

    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "bin-ckpt"
    shutil.copytree(tiny_clip, ckpt)
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    out = bundle(ckpt, tmp_path / "b")
    assert "loading the whole model instead (full)" in capsys.readouterr().out
    manifest = __import__("json").loads((out / C.MANIFEST_FILE).read_text())
    assert manifest[C.KEY_EXPORTER]["export_memory"] == FULL


def test_shards_read_every_dtype(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {
        "bf16": torch.randn(300, 1000).to(torch.bfloat16),  # > 1 MiB: its own mapping
        "fp16": torch.randn(7, 3).to(torch.float16),
        "fp32": torch.randn(600, 700),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    shards = Shards(tmp_path)
    for key, value in tensors.items():
        got = shards.read(key)
        assert got.dtype == np.float32 and np.array_equal(got, value.float().numpy()), key
    specs = [(k, tuple(v.shape), np.float32) for k, v in tensors.items()]
    write_shard(tmp_path / "w.safetensors", specs, (v.float().numpy() for v in tensors.values()))
    from safetensors.numpy import load_file

    back = load_file(tmp_path / "w.safetensors")
    assert all(np.array_equal(back[k], v.float().numpy()) for k, v in tensors.items())


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1000, 100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ShardError, match="truncated"):
        Shards(tmp_path)


def _graph_bytes(bundle: Path) -> int:
    return max(graph_bytes(bundle / graph) for graph in C.GRAPH_FILES)


# What an export holds besides weights, above the RSS of its first step: modules imported later
# (optimum, onnxruntime.transformers: ~65 MiB), activations, the tokenizer, numpy references.
FIXED_BYTES = 128 * 2**20


def test_peak_rss_within_one_and_a_half_weights(models_root: Path, tmp_path: Path) -> None:
    """The weight-dominated `wide` preset (decoder graph ~570 MiB, embedding 512 MiB): the lean
    export's peak RSS stays within baseline + FIXED_BYTES + 1.5x the largest graph's weights; the
    full-load route on the same checkpoint exceeds that bound (the test measures, it can fail)."""
    from bench.export_memory import run_export, table
    from svdprune_onnx.tiny import ensure_tiny_llava

    ckpt = ensure_tiny_llava(models_root, preset="wide")
    runs = {}
    for memory in (LEAN, FULL):
        args = ["-m", str(ckpt), "--k", "16", "--method", "norm", "--export-memory", memory]
        runs[memory] = run_export(args, tmp_path / memory)
        assert runs[memory]["error"] is None, runs[memory]["error"]
    largest = _graph_bytes(tmp_path / LEAN)
    assert largest > 4 * FIXED_BYTES  # weight-dominated, as intended
    for memory, run in runs.items():
        # the process after imports and reading the config: what every export pays anyway
        baseline = max(s["peak_bytes"] for s in run["steps"][:2])
        over = (run["peak_bytes"] - baseline - FIXED_BYTES) / largest
        print(f"{memory}: peak {run['peak_bytes'] / 2**20:.0f} MiB, baseline "
              f"{baseline / 2**20:.0f} MiB, {over:.2f}x the largest graph over both")  # fmt: skip
        print(table(run))
        runs[memory] = over
    assert runs[LEAN] <= 1.5
    assert runs[FULL] > 1.5


@pytest.mark.parametrize("route", ["optimum", "torch"])
def test_big_decoder_is_checked_on_a_slice(
    tiny_clip: Path, tmp_path: Path, monkeypatch, route: str
) -> None:
    """A decoder too big for a PyTorch copy beside the rest (forced here) gets its parity and
    its variant's quality on its first layers, exported by the same code; the slice never
    reaches the bundle. Its q4f16 graph is written straight from the checkpoint: no float32
    decoder weights on disk when the conversion runs, and the same graph as the fp32 route's."""
    import json

    import export.__main__ as cli_module
    import export.dtypes
    import export.lean

    flags = ("--dtype", "q4f16", "--decoder-exporter", route)
    monkeypatch.setattr(export.lean, "INLINE_BYTES", 0)  # the streamed path, as a 7B takes
    whole = bundle(tiny_clip, tmp_path / "whole", *flags)
    monkeypatch.setattr(cli_module, "PARITY_SHARE", 0.0)
    monkeypatch.setattr(cli_module, "SLICE_LAYERS", 1)
    convert, seen = export.dtypes.convert_graph, []

    def spy(src: Path, dst: Path, dtype: str, graph: str, *args) -> dict:
        if graph == C.DECODER_ONNX and dst.parent.name != ".parity-slice":
            seen.append(data_file(src).exists())
        return convert(src, dst, dtype, graph, *args)

    monkeypatch.setattr(export.dtypes, "convert_graph", spy)
    out = bundle(tiny_clip, tmp_path / "b", *flags)
    assert seen == [False]  # converted once, with no fp32 weights file
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    assert manifest[C.KEY_VALIDATION]["decoder_parity_layers"] == 1
    assert not list(out.rglob("*slice*"))
    assert manifest[C.KEY_VALIDATION][C.DTYPE_Q4F16][C.DECODER_ONNX]["top1_agreement"] >= 0.4
    assert_same_graphs(out, whole)


@pytest.mark.parametrize("external", [False, True])
def test_fp16_clamps_are_reported(tmp_path: Path, external: bool) -> None:
    """A weight beyond fp16's range (bf16 checkpoints have them) is clamped to +-65504 by both
    conversions, in memory and streamed, and convert_graph says which and by how much."""
    from onnx import TensorProto, helper

    from export.dtypes import convert_graph

    w = np.zeros((4, 3), np.float32)
    w[1, 2], w[0, 0] = 7e4, -1e5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    src = tmp_path / "src.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if external:
        onnx.save(model, str(src), save_as_external_data=True, size_threshold=0,
                  location=data_file(src).name)  # fmt: skip
    else:
        onnx.save(model, str(src))
    dst = tmp_path / "dst.onnx"
    clamped = convert_graph(src, dst, "fp16", C.DECODER_ONNX)
    assert clamped == {"w": (2, 1e5)}
    (got,) = [numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer]
    assert got.dtype == np.float16 and got[1, 2] == 65504 and got[0, 0] == -65504
