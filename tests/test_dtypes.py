"""Edge variants (--dtype, --batch): export, manifest, quality vs fp32, runtime, provider refusal.

Exports use the built-in tiny LLaVA (as `make export DTYPE=...` does). fp16 uses the default
`gram` pruning and `--batch 1` (the TensorRT recipe); int8, q4 and q4f16 use `--method uniform`
to save time, which leaves their conversion untouched (int8/q4 keep the fp32 vision graph; the
fp16 vision path with the leverage nodes is what the fp16 export covers). The q4 size test uses
the "small" preset (512-wide Llama-style decoder, 24.7 MB of fp32 weights), where weight bytes
rather than graph structure set a file's size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export import dtypes as D
from export.__main__ import cli as export_cli
from runtime import contract as C
from runtime import session as S
from runtime.bundle import load_manifest
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import ImageError
from runtime.run import cli as run_cli

EXTRA_ARGS = {
    C.DTYPE_FP16: ["--batch", "1"],
    C.DTYPE_INT8: ["--method", "uniform"],
    C.DTYPE_Q4: ["--method", "uniform"],
    C.DTYPE_Q4F16: ["--method", "uniform"],
}
# The operators that prove a graph really holds the format.
MARKER_OPS = {
    C.DTYPE_INT8: {C.EMBED_ONNX: "DequantizeLinear", C.DECODER_ONNX: "MatMulInteger"},
    C.DTYPE_Q4: {C.EMBED_ONNX: "GatherBlockQuantized", C.DECODER_ONNX: "MatMulNBits"},
    C.DTYPE_Q4F16: {C.EMBED_ONNX: "GatherBlockQuantized", C.DECODER_ONNX: "MatMulNBits"},
}


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """dtype -> bundle folder, exported once per module on first use."""
    root, made = tmp_path_factory.mktemp("variants"), {}

    def get(dtype: str) -> Path:
        if dtype not in made:
            out = root / f"tiny-llava-k16-{dtype}"
            assert (
                export_cli(["--k", "16", "--dtype", dtype, "-o", str(out), *EXTRA_ARGS[dtype]]) == 0
            )
            made[dtype] = out
        return made[dtype]

    return get


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _io_types(path: Path) -> set[int]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {v.type.tensor_type.elem_type for v in [*g.input, *g.output]}


@pytest.mark.parametrize("dtype", list(EXTRA_ARGS))
def test_every_dtype_exports_and_runs(variant, photo_paths, capsys, dtype: str) -> None:
    bundle = variant(dtype)
    m = load_manifest(bundle)  # checksums verified
    assert m[C.KEY_DTYPE] == dtype
    for graph, graph_dtype in D.PLANS[dtype].items():
        entry = m[C.KEY_GRAPHS][graph]
        assert entry == {C.G_DTYPE: graph_dtype, C.G_BYTES: D.graph_bytes(bundle / graph)}
        # float32 graph I/O for every variant (int64 ids/indices/masks), as transformers.js reads
        assert _io_types(bundle / graph) <= {TensorProto.FLOAT, TensorProto.INT64}
        if graph in MARKER_OPS.get(dtype, {}):
            assert MARKER_OPS[dtype][graph] in _ops(bundle / graph)
    assert not list(bundle.glob(".fp32*")) and not list(bundle.rglob("*.inferred.onnx"))
    quality = m[C.KEY_VALIDATION][dtype][C.DECODER_ONNX]
    assert quality["logits_rel_err"] <= D.TOLERANCES[dtype].logits_rel and quality["finite"]
    # end to end through the runtime CLI, flags unchanged but the provider, pinned to the CPU
    # that runs every variant (on a GPU, `auto` would build a TensorRT engine per variant; the
    # GPU variants are tests/test_gpu.py's)
    capsys.readouterr()  # drop the export's console output
    argv = ["-m", bundle, "-i", photo_paths[0], "-p", "What is in the image?", "--provider", "cpu"]
    assert run_cli([*map(str, argv), "--max-new-tokens", "4", "--json"]) == 0
    (out,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert len(out["kept_indices"]) == 16 and 1 <= len(out["token_ids"]) <= 4


def test_fp16_vision_keeps_fp32_indices(variant, photo_paths) -> None:
    """>= 0.95 of the float32 kept indices on the real photos; PyTorch (float32) is the
    reference, which the fp32 graph matches exactly (checked at every export)."""
    from export.load import load_image_processor, load_llava
    from svdprune_onnx.select import PruneConfig
    from svdprune_onnx.tiny import ensure_tiny_llava
    from svdprune_onnx.vision import PrunedVision

    bundle = variant(C.DTYPE_FP16)
    src = ensure_tiny_llava(Path(__file__).resolve().parents[1] / "build" / "models")
    module = PrunedVision(load_llava(src), PruneConfig(k=16, n=576)).eval()
    proc = load_image_processor(src)
    sess = D.cpu_session(bundle / C.VISION_ONNX)
    overlaps = []
    for photo in photo_paths:
        from runtime.preprocess import load_image

        pixels = proc(images=[load_image(photo)], return_tensors="np")["pixel_values"]
        pixels = pixels.astype(np.float32)
        feats, idx = sess.run(None, {C.PIXEL_VALUES: pixels})
        with torch.no_grad():
            _, ref = module(torch.from_numpy(pixels))
        overlaps.extend(D.kept_overlap(idx, ref.numpy()).tolist())
        assert np.isfinite(feats).all()
    assert np.mean(overlaps) >= 0.95, overlaps


def test_fp16_leverage_nodes_compute_in_float32(variant) -> None:
    """The pruning nodes' MatMuls (Gram products) stay float32; the tower's are fp16."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(variant(C.DTYPE_FP16) / C.VISION_ONNX)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    pruning = set(D.pruning_nodes(model))
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert {types[n.output[0]] for n in matmuls if n.name in pruning} == {TensorProto.FLOAT}
    assert TensorProto.FLOAT16 in {types[n.output[0]] for n in matmuls if n.name not in pruning}
    # and no pruning -> pruning edge goes through fp16 (Cast to fp16, then back to float32)
    producer = {o: n for n in model.graph.node for o in n.output}

    def cast(name: str, to: int) -> onnx.NodeProto | None:
        n = producer.get(name)
        hit = n is not None and n.op_type == "Cast" and n.attribute[0].i == to
        return n if hit else None

    for node in (n for n in model.graph.node if n.name in pruning):
        for x in node.input:
            up = cast(x, TensorProto.FLOAT)
            down = up and cast(up.input[0], TensorProto.FLOAT16)
            source = down and producer.get(down.input[0])
            assert not (source and source.name in pruning), node.name


def test_static_batch_vision_graph(variant, photo_paths, capsys) -> None:
    bundle = variant(C.DTYPE_FP16)  # exported with --batch 1
    g = onnx.load(str(bundle / C.VISION_ONNX)).graph
    dims = [d for v in [*g.input, *g.output, *g.value_info] for d in v.type.tensor_type.shape.dim]
    assert not [d.dim_param for d in dims if d.dim_param], "no symbolic dims in a static graph"
    assert [d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == [1, 3, 336, 336]
    assert load_manifest(bundle)[C.KEY_VISION][C.V_STATIC_BATCH] == 1
    pipe = Pipeline(bundle, S.SessionConfig("cpu"))
    with pytest.raises(ImageError, match="static batch of 1"):
        pipe.generate(np.zeros((2, 3, 336, 336), np.float32), [[1, 2]] * 2, Sampling(2))
    argv = ["-m", bundle, "-i", photo_paths[0], "-i", photo_paths[1], "-p", "What?"]
    argv += ["--provider", "cpu"]  # the refusal is the runtime's, before any provider matters
    assert run_cli(list(map(str, argv))) == 2
    assert "re-export without --batch" in capsys.readouterr().err


def test_provider_that_cannot_run_a_dtype_is_refused(variant, monkeypatch, capsys) -> None:
    """ONNX Runtime's CUDA provider has no DynamicQuantizeLinear kernel (and MatMulInteger for
    int8 x int8 only), so an int8 bundle is refused on CUDA/TensorRT before any session exists."""
    bundle = variant(C.DTYPE_INT8)
    monkeypatch.setattr(S, "unusable_reason", lambda provider: None)  # as on a GPU machine
    monkeypatch.setattr(S, "_NOTED", set())  # notes print once per process

    def no_session(*a, **k):
        raise AssertionError("the refusal must come before any session is created")

    monkeypatch.setattr(S.ort, "InferenceSession", no_session)
    for provider, name in (("cuda", S.CUDA), ("tensorrt", S.CUDA)):
        with pytest.raises(S.ProviderError) as e:
            Pipeline(bundle, S.SessionConfig(provider))
        assert "int8" in str(e.value) and name in str(e.value)
        assert "--provider cpu" in str(e.value) and "DTYPE=" in str(e.value)
    # auto: the int8 text graphs skip CUDA with a note; the fp32 vision graph keeps its GPUs
    auto = S.SessionConfig("auto")
    assert S.wanted_providers(auto, "text", bundle, C.DTYPE_INT8, C.DECODER_ONNX) == [S.CPU]
    assert "int8" in capsys.readouterr().err
    assert S.wanted_providers(auto, "text", bundle, C.DTYPE_Q4) == [S.CUDA, S.CPU]
    assert S.wanted_providers(S.SessionConfig("cuda"), "text", bundle, C.DTYPE_FP16)[0] == S.CUDA


def test_q4_decoder_at_most_035_of_fp32_on_small_model(models_root: Path, tmp_path: Path) -> None:
    """The "small" preset (Llama-style, hidden 512, 2 layers, 4.8 M weights, 24.7 MB fp32)."""
    from export.decoder import export_decoder_optimum
    from export.load import load_llava
    from svdprune_onnx.text import causal_lm
    from svdprune_onnx.tiny import ensure_tiny_llava

    lm = causal_lm(load_llava(ensure_tiny_llava(models_root, preset="small")))
    fp32 = tmp_path / "decoder.onnx"
    export_decoder_optimum(lm, fp32, 18)
    sizes = {}
    for dtype in (C.DTYPE_Q4, C.DTYPE_INT8):
        D.convert_graph(fp32, tmp_path / f"{dtype}.onnx", dtype, C.DECODER_ONNX)
        sizes[dtype] = D.graph_bytes(tmp_path / f"{dtype}.onnx") / D.graph_bytes(fp32)
    assert D.graph_bytes(fp32) > 20e6
    assert sizes[C.DTYPE_Q4] <= 0.35, sizes
    assert sizes[C.DTYPE_INT8] <= 0.35, sizes
    # bench/memory_budget.py's bytes-per-weight model predicts these files to within 1 %
    from bench.memory_budget import Decoder, Model, Tower, graph_bytes

    cfg = lm.config
    heads = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // 8
    dec = Decoder(2, cfg.hidden_size, cfg.intermediate_size, *heads, cfg.vocab_size, False)
    model = Model("small", Tower(64, 128, 2, 14, 336, True, 512), dec)
    predicted = {d: graph_bytes(model, d)[C.DECODER_ONNX] for d in (*sizes, C.DTYPE_FP32)}
    for dtype, ratio in sizes.items():
        assert abs(predicted[dtype] / predicted[C.DTYPE_FP32] - ratio) < 0.01, (dtype, ratio)


def _overflow_graph() -> onnx.ModelProto:
    """x (4,4) -> "/tower/Mul" (x * 1) -> "/MatMul" (t t^T * 1e4, past fp16's 65504) -> "/Div"
    (back to ~1): the shape of a Gram product inside the pruning scope."""
    big = helper.make_tensor("big", TensorProto.FLOAT, [], [1e4])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["t"], name="/tower/Mul"),
        helper.make_node("Transpose", ["t"], ["tt"], name="/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["t", "tt"], ["g"], name="/MatMul"),
        helper.make_node("Mul", ["g", "big"], ["gb"], name="/Mul"),
        helper.make_node("Div", ["gb", "big"], ["y"], name="/Div"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
        [big, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def test_fp16_block_list_keeps_float32_between_blocked_nodes(tmp_path: Path) -> None:
    model = _overflow_graph()
    fp16 = D.to_fp16(model, D.pruning_nodes(model))
    onnx.checker.check_model(fp16)
    onnx.save(fp16, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).uniform(1, 4, (4, 4)).astype(np.float32)
    (y,) = D.cpu_session(tmp_path / "m.onnx").run(None, {"x": x})
    assert y.dtype == np.float32 and np.isfinite(y).all()  # g * 1e4 would be inf in fp16
    np.testing.assert_allclose(y, x @ x.T, rtol=2e-3)  # only the fp16 tower input rounds


@pytest.mark.parametrize("gate", ["fail", "warn"])
def test_quality_gate(tmp_path: Path, monkeypatch, capsys, gate: str) -> None:
    """A variant past its tolerance (forced: a q4 logits tolerance no 4-bit graph meets) fails
    the export by default, naming every failing graph and the way out; --quality-gate warn
    writes it, prints the failures and records them in the manifest."""
    monkeypatch.setitem(D.TOLERANCES, C.DTYPE_Q4, D.Tolerance(1e-9, 1e-9, 0.4))
    out = tmp_path / "b"
    args = ["--k", "16", "--dtype", "q4", "--method", "uniform", "-o", str(out)]
    code = export_cli([*args, "--quality-gate", gate])
    text = capsys.readouterr()
    if gate == "fail":
        assert code == 2 and not out.exists()
        assert "embed_tokens drifts" in text.err and "decoder drifts" in text.err
        assert "--quality-gate warn" in text.err
        return
    assert code == 0
    assert "warning: q4 decoder drifts from fp32" in text.out
    failures = load_manifest(out)[C.KEY_VALIDATION][C.DTYPE_Q4]["failures"]
    assert len(failures) == 2 and "embed_tokens" in failures[0] and "decoder" in failures[1]
