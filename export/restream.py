"""Convert a graph whose weights live in external data without loading them all: fp16, q4.

    <graph>.onnx (structure) + its weights, never loaded whole: in <graph>.onnx_data, or
    DEFERRED (not written yet: read from the checkpoint on demand, export/lean.py)
      ├─ fp16: ONNX Runtime's converter rewrites the structure alone (each weight keeps its
      │        reference to the old bytes); the weights are cast one tensor at a time
      └─ q4:   ONNX Runtime's MatMulNBits quantizer reads each weight it quantizes through
               reading() (one at a time, cast to fp16 first for q4f16) and keeps only the
               4-bit blocks, 1/8 of the float32 bytes
    save_streamed(): every weight, old bytes or new blocks, into the new <graph>.onnx_data,
    one tensor at a time, each freed once written

The converters are the same functions the in-memory path calls (export/dtypes.py), so the
graphs are the same; only where the bytes wait differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from export.bundle import data_file

_FLOAT16_LIMITS = {"min_positive_val": 5.96e-08, "max_finite_val": 65504.0}  # the converter's

# The external-data location of a weight not written anywhere yet: its values come from a
# reader in the `deferred` map ({initializer: () -> float32 array}), which reads the checkpoint.
DEFERRED = "checkpoint.deferred"
Deferred = dict[str, Callable[[], np.ndarray]]


def _external(tensor: TensorProto) -> dict[str, str] | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def load_inferred(path: Path, weights: bool = False) -> onnx.ModelProto:
    """The graph at `path` with shapes inferred on disk (works past 2 GB, unlike in-memory
    inference); without `weights` its external data stays on disk, its locations relative to
    `path`'s folder (run the quantizer inside it)."""
    tmp = path.with_name(path.stem + ".inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(path), str(tmp))
    try:
        return onnx.load(str(tmp), load_external_data=weights)  # data: still the source's file
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def shapes_from_dims() -> Iterator[None]:
    """The fp16 converter builds a value_info per converted weight by reading the whole tensor
    (numpy_helper.to_array) only to learn its shape: take the dims from the proto instead."""
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor

    def from_dims(tensor: TensorProto) -> onnx.ValueInfoProto:
        return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)

    float16.make_value_info_from_tensor = from_dims
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def _read(base: Path, info: dict[str, str], dtype: np.dtype) -> np.ndarray:
    offset, length = int(info.get("offset", 0)), int(info["length"])
    with open(base / info["location"], "rb") as f:
        f.seek(offset)
        raw = np.empty(length, np.uint8)
        f.readinto(memoryview(raw))
    return raw.view(dtype)


def _stored_dtype(tensor: TensorProto, info: dict[str, str]) -> np.dtype:
    """The dtype of the bytes on disk: a tensor the fp16 converter retyped still points at its
    float32 bytes (twice the length the new type implies); anything but float: raw bytes
    (4-bit blocks, integers: nothing casts them)."""
    n = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type == TensorProto.FLOAT16 and int(info["length"]) == 4 * n:
        return np.dtype(np.float32)
    if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.dtype(np.uint8)


def fp16_overflow(arr: np.ndarray) -> tuple[int, float]:
    """(values beyond +-65504, which fp16 conversion clamps to it; the largest |value|)."""
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    limit = _FLOAT16_LIMITS["max_finite_val"]
    return (int(np.count_nonzero(np.abs(arr) > limit)) if peak > limit else 0), peak


def tensor_values(tensor: TensorProto, base: Path, deferred: Deferred | None = None) -> np.ndarray:
    """An external weight's values as stored: float32 where the fp16 converter retyped it."""
    info = _external(tensor)
    if info["location"] == DEFERRED:
        if deferred is None or tensor.name not in deferred:
            raise RuntimeError(f"weight {tensor.name} was deferred, but no reader was given")
        return deferred[tensor.name]()
    return _read(base, info, _stored_dtype(tensor, info))


def final_values(
    tensor: TensorProto, base: Path, clamped: dict | None, deferred: Deferred | None = None
) -> np.ndarray:
    """An external weight's values in its declared type: cast to fp16 when the converter retyped
    it, clamped exactly as its convert_np_to_float16 does; weights with values beyond the fp16
    range are recorded in `clamped` as {name: (count, largest |w|)}."""
    arr = tensor_values(tensor, base, deferred)
    if arr.dtype == np.float32 and tensor.data_type == TensorProto.FLOAT16:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        if clamped is not None and (over := fp16_overflow(arr))[0]:
            clamped[tensor.name] = over
        arr = convert_np_to_float16(arr, **_FLOAT16_LIMITS)
    return arr


def tensor_bytes(
    tensor: TensorProto, base: Path, clamped: dict | None = None, deferred: Deferred | None = None
) -> np.ndarray:
    """One weight's final bytes: inline data as is, external data by final_values()."""
    if _external(tensor) is None:
        return np.frombuffer(tensor.raw_data, np.uint8)
    return final_values(tensor, base, clamped, deferred).view(np.uint8)


@contextlib.contextmanager
def reading(
    base: Path, clamped: dict, deferred: Deferred | None = None, spill: Path | None = None
) -> Iterator[None]:
    """Inside, ONNX Runtime's MatMulNBits quantizer gets each external weight it asks for with
    its final_values() in memory (one at a time): fp16 values for a weight the fp16 converter
    retyped but did not write, a deferred weight's values from its reader. Its MatMul path
    reads through onnx_ir and its Gather path through onnx; both ask get_initializer first.

    `spill` (a file in `base`): the quantizer adds each weight's 4-bit blocks and scales to a
    scratch graph instead of the model's; before the next weight, their bytes go to `spill`
    and the model gets references only. Memory then holds one weight's blocks, not the model's
    (a 7B q4 decoder's are 3.5 GB: protobuf keeps a message's bytes in its arena until the
    whole model is freed, so they cannot be dropped once added); save_streamed() reads them
    back one at a time."""
    from onnxruntime.quantization import matmul_nbits_quantizer as quantizer

    original = getattr(quantizer, "get_initializer", None)
    if original is None:
        raise RuntimeError(
            "onnxruntime.quantization.matmul_nbits_quantizer has no get_initializer; install "
            "the onnxruntime version pinned in requirements/"
        )
    scratch: list[tuple[onnx.GraphProto, onnx.GraphProto]] = []  # (scratch, model graph)
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(spill, "wb")) if spill is not None else None

        def move() -> None:  # the last weight's blocks: bytes to `spill`, references to the model
            for box, graph in scratch:
                for tensor in box.initializer:
                    graph.initializer.append(_spilled(tensor, sink, spill.name))
            scratch.clear()

        def get_initializer(name: str, graphs: list) -> tuple:
            move()
            tensor, graph = original(name, graphs)
            if tensor is None or _external(tensor) is None:
                return tensor, graph
            loaded = TensorProto()
            loaded.CopyFrom(tensor)
            del loaded.external_data[:]
            loaded.data_location = TensorProto.DEFAULT
            loaded.raw_data = final_values(tensor, base, clamped, deferred).tobytes()
            if sink is None:
                return loaded, graph
            scratch.append((onnx.GraphProto(), graph))
            return loaded, scratch[-1][0]

        quantizer.get_initializer = get_initializer
        try:
            yield
            move()
        finally:
            quantizer.get_initializer = original


def _spilled(tensor: TensorProto, sink, location: str) -> TensorProto:
    """`tensor` itself if small, else a reference to its bytes, appended to file `sink`."""
    if len(tensor.raw_data) < 1024 or tensor.data_location == TensorProto.EXTERNAL:
        return tensor
    ref = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    ref.data_location = TensorProto.EXTERNAL
    offset = sink.seek(0, 2)
    length = sink.write(tensor.raw_data)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        ref.external_data.add(key=key, value=str(value))
    return ref


def save_streamed(
    model: onnx.ModelProto,
    path: Path,
    base: Path,
    bar=None,
    clamped: dict | None = None,
    deferred: Deferred | None = None,
) -> None:
    """Write `model` to `path` + `path`_data: every initializer of 1 KiB or more, external
    (relative to folder `base`, or deferred) or in memory, goes to the data file one at a time
    and is dropped from memory once written."""
    data = data_file(path)
    part = data.with_name(data.name + ".part")
    offset = 0
    with open(part, "wb") as f:
        for tensor in model.graph.initializer:
            external = _external(tensor) is not None
            if not external and len(tensor.raw_data) < 1024:
                continue  # small (or typed-field) constants stay inline, as onnx's writer keeps
            blob = tensor_bytes(tensor, base, clamped, deferred)
            offset += -offset % 4096
            f.seek(offset)
            f.write(memoryview(blob))
            del tensor.external_data[:]
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            where = {"location": data.name, "offset": offset, "length": blob.nbytes}
            for key, value in where.items():
                tensor.external_data.add(key=key, value=str(value))
            offset += blob.nbytes
            if bar is not None:
                bar.update(blob.nbytes)
    path.unlink(missing_ok=True)
    part.replace(data)
    onnx.save(model, str(path))
