"""Edge variants: fp16, int8, q4 and q4f16 graphs converted from the validated float32 ones.

    fp32 graphs (already checked against PyTorch)
      ├─ fp16   convert_float_to_float16(keep_io_types): pruning nodes blocked (float32 inside),
      │         then the converter's fp32->fp16->fp32 round trips between them removed
      ├─ int8   quantize_dynamic: MatMul -> DynamicQuantizeLinear + MatMulInteger,
      │         embedding table -> int8 + DequantizeLinear                (embed + decoder only)
      ├─ q4     MatMulNBits (4-bit, blocks of 32) / GatherBlockQuantized  (embed + decoder only)
      └─ q4f16  fp16, then q4 on top
    each converted graph ─► compared with its fp32 graph (tolerances per dtype) ─► bundle

Every variant keeps float32 graph inputs and outputs (as transformers.js ships its fp16/q4
files), so the runtime feeds and reads every variant the same way.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from export.bundle import EXTERNAL_DATA_BYTES, data_file
from export.restream import Deferred, fp16_overflow, load_inferred
from export.vision import ExportValidationError, cpu_session
from runtime import contract as C

# Which format each graph gets in each bundle variant. The vision graph is never integer-
# quantised: its cost is the tower's activations, and the leverage scores need float inputs.
PLANS: dict[str, dict[str, str]] = {
    C.DTYPE_FP32: dict.fromkeys(C.GRAPH_FILES, C.DTYPE_FP32),
    C.DTYPE_FP16: dict.fromkeys(C.GRAPH_FILES, C.DTYPE_FP16),
    C.DTYPE_INT8: {C.VISION_ONNX: C.DTYPE_FP32, C.EMBED_ONNX: C.DTYPE_INT8,
                   C.DECODER_ONNX: C.DTYPE_INT8},
    C.DTYPE_Q4: {C.VISION_ONNX: C.DTYPE_FP32, C.EMBED_ONNX: C.DTYPE_Q4,
                 C.DECODER_ONNX: C.DTYPE_Q4},
    C.DTYPE_Q4F16: {C.VISION_ONNX: C.DTYPE_FP16, C.EMBED_ONNX: C.DTYPE_Q4F16,
                    C.DECODER_ONNX: C.DTYPE_Q4F16},
}  # fmt: skip
Q4_BLOCK = 32


@dataclass(frozen=True)
class Tolerance:
    """How far a variant may drift from fp32 at export before the export fails.

    Gross-failure guards, about 3x what the tiny random-weight default measures (embeddings /
    logits rel. error / top-1): fp16 2e-4 / 1.1e-2 / 1.0, int8 9.7e-3 / 1.6e-2 / 1.0,
    q4 8.1e-2 / 0.123 / 0.73 (random weights give nearly flat logits, so top-1 is fragile).
    `logits_rel` is ||logits - ref|| / ||ref|| over the last position of the prefill and of
    each decode step (the decoder emits no other logits).
    """

    embed_rel: float
    logits_rel: float
    top1: float  # minimum fraction of decided positions whose argmax equals the fp32 one
    features_rel: float = 0.0  # vision image_features on the commonly kept tokens
    kept_overlap: float = 1.0  # minimum mean |kept ∩ kept_fp32| / K over the validation photos


TOLERANCES = {
    C.DTYPE_FP16: Tolerance(1e-3, 0.03, 0.9, features_rel=1e-2, kept_overlap=0.9),
    C.DTYPE_INT8: Tolerance(0.03, 0.06, 0.8),
    C.DTYPE_Q4: Tolerance(0.25, 0.4, 0.4),
    C.DTYPE_Q4F16: Tolerance(0.25, 0.4, 0.4, features_rel=1e-2, kept_overlap=0.9),
}


# --- graph surgery ---------------------------------------------------------------------------
def pruning_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes PrunedVision.forward adds itself (CLS slice, scoring, top-K, gather).

    The torchscript export names nodes by module scope: "/layers.3/mlp/fc1/MatMul" is the tower,
    "/projector/..." the projector, and one-level names ("/TopK", "/MatMul_12") are the forward
    of PrunedVision itself; bench/ortprof.py's scope() reads the same names.
    """
    return [n.name for n in model.graph.node if n.name.startswith("/") and n.name.count("/") == 1]


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _collapse_round_trips(model: onnx.ModelProto) -> None:
    """Rewire Cast(fp32)(Cast(fp16)(x)) -> x where the float16 converter wrapped blocked nodes.

    The converter casts every blocked node's output to fp16 and back to fp32 at the next blocked
    node, which would round the Gram matrices to fp16 between float32 ops (and overflow them).
    It also emits one identical Cast per consumer, which ONNX Runtime rejects as duplicates.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "Cast" and n.name.endswith("_cast_to_fp32_node"):
            p = producer.get(n.input[0])
            if (
                p is not None
                and p.op_type == "Cast"
                and p.name.endswith("_cast_to_fp16_node")
                and (_cast_to(n), _cast_to(p)) == (TensorProto.FLOAT, TensorProto.FLOAT16)
            ):
                rename[n.output[0]] = p.input[0]
    for n in g.node:
        n.input[:] = [rename.get(x, x) for x in n.input]
    kept, seen = [], set()
    for n in g.node:  # drop the bypassed casts and duplicate casts of one tensor
        if n.op_type == "Cast" and n.name.endswith("_cast_to_fp32_node"):
            if n.output[0] in rename or n.output[0] in seen:
                continue
            seen.add(n.output[0])
        kept.append(n)
    outputs = {o.name for o in g.output}
    while True:  # fp32->fp16 casts whose only readers were bypassed are dead now
        used = {x for n in kept for x in n.input} | outputs
        alive = [n for n in kept if n.op_type != "Cast" or any(o in used for o in n.output)]
        if len(alive) == len(kept):
            break
        kept = alive
    del g.node[:]
    g.node.extend(_toposort(kept, {i.name for i in g.input} | {t.name for t in g.initializer}))


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's order (the converter appends its casts at the end; ONNX wants producers first)."""
    waiting: dict[str, list[int]] = {}
    missing = []
    for i, n in enumerate(nodes):
        need = {x for x in n.input if x and x not in available}
        missing.append(len(need))
        for x in need:
            waiting.setdefault(x, []).append(i)
    ready = deque(i for i, m in enumerate(missing) if m == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(nodes[i])
        for out in nodes[i].output:
            for j in waiting.pop(out, []):
                missing[j] -= 1
                if missing[j] == 0:
                    ready.append(j)
    if len(order) != len(nodes):
        raise ExportValidationError("fp16 conversion left a graph with a cycle or a dangling input")
    return order


def to_fp16(model: onnx.ModelProto, keep_fp32: list[str]) -> onnx.ModelProto:
    """fp16 weights and activations, float32 graph I/O, `keep_fp32` nodes computed in float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=keep_fp32, disable_shape_infer=True
    )
    _collapse_round_trips(model)
    # The inferred intermediate shapes served the converter only; dropped, they cannot leave
    # "unk__N" symbolic dims in a static-batch graph (ONNX Runtime re-infers what it needs).
    del model.graph.value_info[:]
    return model


def to_q4(model: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """4-bit weight-only blocks of Q4_BLOCK: MatMul -> MatMulNBits, Gather -> GatherBlockQuantized.

    Symmetric (no zero points), as transformers.js's own q4 files are made; on the tiny models
    asymmetric blocks measured the same logits error. Scales keep the graph's float type, so
    over an fp16 graph this gives q4f16.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    cfg = DefaultWeightOnlyQuantConfig(
        block_size=Q4_BLOCK,
        is_symmetric=True,
        op_types_to_quantize=(op_type,),
        quant_axes=(("MatMul", 0), ("Gather", 1)),  # Gather: blocks along the hidden axis
    )
    quantizer = MatMulNBitsQuantizer(model, algo_config=cfg)
    quantizer.process()
    return quantizer.model.model


def to_int8(src: Path, dst: Path, op_type: str) -> None:
    """Dynamic int8 (weights int8 per tensor, activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=[op_type],
        weight_type=QuantType.QInt8,
        use_external_data_format=data_file(src).is_file(),
    )


# --- files -----------------------------------------------------------------------------------
def graph_bytes(path: Path) -> int:
    """A graph's size on disk, its external data included."""
    data = data_file(path)
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def save(model: onnx.ModelProto, path: Path) -> None:
    """Write `path` (and `path`_data when the weights pass EXTERNAL_DATA_BYTES)."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    data_file(path).unlink(missing_ok=True)
    if weights > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, location=data_file(path).name)
    else:
        onnx.save(model, str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the quantizers' chatter: one INFO line per node, "consider pre-processing" on
    the root logger, the (intended) opset-21 upgrade for int4 types, and numpy's divide warning
    on all-zero blocks (which the quantizer masks right after)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        root.setLevel(level)


def convert_graph(
    src: Path,
    dst: Path,
    dtype: str,
    graph: str,
    consume: bool = False,
    deferred: Deferred | None = None,
) -> dict[str, tuple[int, float]]:
    """Write `src` (an fp32 graph) as `dtype` to `dst`. A graph with external data is converted
    without loading its weights (export/restream.py): one tensor in memory at a time, plus the
    4-bit blocks for q4. `deferred`: readers of the weights `src` has not written (the lean
    export's: straight from the checkpoint, no fp32 file at all). `consume`: delete `src`'s
    data once converted (disk: a 7B fp32 decoder is 27 GB). Returns the weights whose values
    passed the fp16 range and were clamped to +-65504 (a bf16 checkpoint's can):
    {initializer: (values clamped, largest |value|)}."""
    clamped: dict[str, tuple[int, float]] = {}
    op_type = "Gather" if graph == C.EMBED_ONNX else "MatMul"
    with _quiet():
        if dtype == C.DTYPE_INT8:
            if deferred:
                raise ExportValidationError("int8 quantisation needs the fp32 weights on disk")
            to_int8(src, dst, op_type)
            return clamped
        if data_file(src).is_file() or deferred:
            _convert_streamed(src, dst, dtype, graph, op_type, clamped, deferred)
            if consume:
                data_file(src).unlink(missing_ok=True)
            return clamped
        if dtype in (C.DTYPE_FP16, C.DTYPE_Q4F16):
            model = load_inferred(src, weights=True)  # the fp16 converter needs every type
            over = {
                t.name: fp16_overflow(numpy_helper.to_array(t))
                for t in model.graph.initializer
                if t.data_type == TensorProto.FLOAT
            }
            model = to_fp16(model, pruning_nodes(model) if graph == C.VISION_ONNX else [])
            for t in model.graph.initializer:  # the ones the converter made fp16
                if t.data_type == TensorProto.FLOAT16 and over.get(t.name, (0,))[0]:
                    clamped[t.name] = over[t.name]
        else:
            model = onnx.load(str(src))
        if dtype in (C.DTYPE_Q4, C.DTYPE_Q4F16) and graph != C.VISION_ONNX:
            model = to_q4(model, op_type)
    save(model, dst)
    return clamped


def _convert_streamed(
    src: Path,
    dst: Path,
    dtype: str,
    graph: str,
    op_type: str,
    clamped: dict,
    deferred: Deferred | None,
) -> None:
    """convert_graph for external-data (or deferred) graphs, in one pass: the converters rewrite
    the structure, the quantizer reads each weight it needs through restream.reading() (fp16
    values for q4f16) and spills its 4-bit blocks to a file beside `src` as it goes, and
    save_streamed() writes every weight once, in its final type."""
    from export.progress import bar
    from export.restream import reading, save_streamed, shapes_from_dims

    quantize = dtype in (C.DTYPE_Q4, C.DTYPE_Q4F16) and graph != C.VISION_ONNX
    model = load_inferred(src)
    total = sum(tensor_nbytes(t) for t in model.graph.initializer)
    with bar(total, f"{graph} -> {dtype}", unit="B") as progress:
        if dtype in (C.DTYPE_FP16, C.DTYPE_Q4F16):
            with shapes_from_dims():
                model = to_fp16(model, pruning_nodes(model) if graph == C.VISION_ONNX else [])
        spill = src.parent / (dst.name + ".q4blocks")
        try:
            if quantize:
                with reading(src.parent, clamped, deferred, spill):
                    model = to_q4(model, op_type)
            save_streamed(model, dst, src.parent, progress, clamped, deferred)
        finally:
            spill.unlink(missing_ok=True)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of an initializer, inline or external (as recorded, without reading them)."""
    info = {e.key: e.value for e in tensor.external_data}
    return int(info["length"]) if "length" in info else len(tensor.raw_data)


def convert_bundle(
    root: Path,
    ref: Path,
    dtype: str,
    consume: frozenset[str] = frozenset(),
    clamped: dict | None = None,
    deferred: dict[str, Deferred] | None = None,
) -> dict[str, str]:
    """Move the fp32 graphs of bundle folder `root` to `ref` and write the `dtype` variant in
    their place; returns {graph: graph dtype}. Graphs in `consume` (checked on a slice, not
    against their fp32 file) lose their fp32 weights file once converted;
    `clamped` collects convert_graph's fp16 clamps per graph; `deferred`: {graph: readers of
    the weights it has not written} (export/lean.py)."""
    plan = PLANS[dtype]
    for graph, graph_dtype in plan.items():
        if graph_dtype == C.DTYPE_FP32:
            continue
        kept = ref / graph
        kept.parent.mkdir(parents=True, exist_ok=True)
        (root / graph).replace(kept)
        if data_file(root / graph).is_file():
            data_file(root / graph).replace(data_file(kept))
        readers = (deferred or {}).get(graph)
        over = convert_graph(kept, root / graph, graph_dtype, graph, graph in consume, readers)
        if clamped is not None and over:
            clamped[graph] = over
    return plan


# --- quality against fp32 --------------------------------------------------------------------
def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| (Frobenius), in float64."""
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def kept_overlap(idx: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """(B,) fraction of each row's reference kept indices that `idx` also keeps."""
    return np.array(
        [len(set(a) & set(b)) / len(b) for a, b in zip(idx.tolist(), ref.tolist(), strict=True)]
    )


def vision_quality(path: Path, ref: Path, batches: list[np.ndarray]) -> dict:
    """Kept-index overlap per image and image_features error on the tokens both keep. One
    session at a time (the fp32 tower and its variant never both loaded): outputs are small."""
    outs = []
    for graph in (ref, path):
        sess = cpu_session(graph)
        outs.append([sess.run(None, {C.PIXEL_VALUES: pixels}) for pixels in batches])
        del sess
    overlaps, errs = [], []
    for (feats, idx), (ref_feats, ref_idx) in zip(outs[1], outs[0], strict=True):
        overlaps.extend(kept_overlap(idx, ref_idx).tolist())
        for b in range(len(idx)):
            common = np.intersect1d(idx[b], ref_idx[b])
            pick = np.searchsorted(idx[b], common), np.searchsorted(ref_idx[b], common)
            errs.append(rel_err(feats[b, pick[0]], ref_feats[b, pick[1]]))
    return {
        "kept_overlap_mean": float(np.mean(overlaps)),
        "kept_overlap_min": float(np.min(overlaps)),
        "features_rel_err": float(np.max(errs)),
        "images": len(overlaps),
    }


def embed_quality(path: Path, ref: Path, vocab: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(0, vocab, size=(2, 64), dtype=np.int64)
    (got,) = cpu_session(path).run(None, {C.INPUT_IDS: ids})
    (want,) = cpu_session(ref).run(None, {C.INPUT_IDS: ids})
    return {"embeds_rel_err": rel_err(got, want)}


def decoder_quality(
    path: Path, ref: Path, embed_ref: Path, text: dict, steps: int = 14, seed: int = 0
) -> dict:
    """Prefill (batch 2, left padding) + `steps` decode steps, each graph on its own KV cache.

    Inputs are the fp32 embeddings of random token ids (real embedding statistics, unlike
    Gaussian noise), the same for both graphs. The decoder emits the last position's logits
    only, so each step compares one row per sequence: 2 * (steps + 1) rows in all. The graphs
    run one after the other (never both loaded: a 7B slice's or a medium decoder's fp32 copy
    beside its variant would double this step's memory).
    """
    from export.text_graphs import empty_past

    embed = cpu_session(embed_ref)
    rng = np.random.default_rng(seed)

    def embeds(n: int) -> np.ndarray:  # (2, n) random ids -> (2, n, H) float32
        ids = rng.integers(0, text[C.T_VOCAB], size=(2, n), dtype=np.int64)
        return embed.run(None, {C.INPUT_IDS: ids})[0]

    inputs = [embeds(12)] + [embeds(1) for _ in range(steps)]
    layers, kv, hd = text[C.T_LAYERS], text[C.T_KV_HEADS], text[C.T_HEAD_DIM]
    pasts = [n for i in range(layers) for n in C.past_names(i)]
    presents = [n for i in range(layers) for n in C.present_names(i)]
    rows = []
    for graph in (path, ref):
        sess, feed = cpu_session(graph), empty_past(layers, 2, kv, hd)
        mask = np.ones((2, 12), np.int64)
        mask[1, :3] = 0
        sink = []
        for emb in inputs:
            pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -emb.shape[1] :]
            feed |= {C.INPUTS_EMBEDS: emb, C.ATTENTION_MASK: mask, C.POSITION_IDS: pos}
            logits, *present = sess.run([C.LOGITS, *presents], feed)
            sink.append(logits[:, -1])  # (2, V): the last position, never padding
            feed |= dict(zip(pasts, present, strict=True))
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        rows.append(np.concatenate(sink))
        del sess, feed
    a, b = rows
    same = a.argmax(-1) == b.argmax(-1)
    # A row's top-1 is decided when fp32's lead over its runner-up exceeds the variant's RMS
    # logit error on that row; below that a flip is rounding noise, which random weights (flat
    # logits) produce on most rows. Rows with no decided top-1 do not vote.
    top2 = np.sort(b, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > np.sqrt(((a - b) ** 2).mean(-1))
    return {
        "logits_rel_err": rel_err(a, b),
        "top1_agreement": float(same[decided].mean()) if decided.any() else 1.0,
        "top1_decided_rows": int(decided.sum()),
        "top1_agreement_all_rows": float(same.mean()),
        "finite": bool(np.isfinite(a).all()),
    }


def _fp32(root: Path, ref: Path, graph: str) -> Path:
    """Where the fp32 version of `graph` is: moved to `ref` if converted, else still in `root`."""
    return ref / graph if (ref / graph).is_file() else root / graph


def validate_variant(
    root: Path,
    ref: Path,
    dtype: str,
    batches: list[np.ndarray],
    text: dict,
    decoder: tuple[Path, Path, dict] | None = None,
    strict: bool = True,
) -> dict:
    """Compare each converted graph in `root` with its fp32 original in `ref`. Returns the
    figures for the manifest, with "failures": one line per graph past the dtype's Tolerance;
    `strict` raises ExportValidationError on any instead. `decoder` = (variant, fp32, text) of
    a layer slice checks the decoder on it instead (a decoder too big to run twice here)."""
    tol, plan, report, failures = TOLERANCES[dtype], PLANS[dtype], {}, []
    if plan[C.VISION_ONNX] != C.DTYPE_FP32:
        v = vision_quality(root / C.VISION_ONNX, ref / C.VISION_ONNX, batches)
        report[C.VISION_ONNX] = v
        if not (v["kept_overlap_mean"] >= tol.kept_overlap and
                v["features_rel_err"] <= tol.features_rel):  # fmt: skip
            failures.append(
                f"{dtype} vision graph drifts from fp32: kept-index overlap "
                f"{v['kept_overlap_mean']:.3f} (min {tol.kept_overlap}), features rel. error "
                f"{v['features_rel_err']:.3g} (max {tol.features_rel})"
            )
    e = embed_quality(root / C.EMBED_ONNX, ref / C.EMBED_ONNX, text[C.T_VOCAB])
    report[C.EMBED_ONNX] = e
    if not e["embeds_rel_err"] <= tol.embed_rel:
        failures.append(
            f"{dtype} embed_tokens drifts from fp32 by {e['embeds_rel_err']:.3g} (max "
            f"{tol.embed_rel})"
        )
    got, want, text = decoder or (root / C.DECODER_ONNX, ref / C.DECODER_ONNX, text)
    d = decoder_quality(got, want, _fp32(root, ref, C.EMBED_ONNX), text)
    report[C.DECODER_ONNX] = d
    if not (
        d["finite"] and d["logits_rel_err"] <= tol.logits_rel and d["top1_agreement"] >= tol.top1
    ):
        failures.append(
            f"{dtype} decoder drifts from fp32: logits rel. error {d['logits_rel_err']:.3g} "
            f"(max {tol.logits_rel}), top-1 agreement {d['top1_agreement']:.2f} (min "
            f"{tol.top1})"
        )
    report["failures"] = failures
    if strict and failures:
        raise ExportValidationError(
            "; ".join(failures) + "; export another --dtype (or --quality-gate warn to keep it)"
        )
    return report
