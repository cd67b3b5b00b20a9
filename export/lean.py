"""Lean export: trace on weightless stand-ins, then stream the real weights into the graph.

    config.json ─► LLaVA shell: every parameter a zero-page stand-in (shape, strides, no memory)
      └─ torch.onnx.export(export_params=False) inside capture()
           ├─ graph.onnx: the graph, each weight a bare input
           └─ params_dict: {initializer: tensor}; the exporter's folds (Transpose of a Linear
                weight) are strided *views* of a stand-in, so each one names its parameter
      └─ finalize(): per initializer, one at a time: Shards.read(checkpoint key) (float32)
           ─► as_strided like the view ─► bytes ─► graph.onnx_data (or inline when small)

A decoder too big to check whole (checked on a layer slice instead, export/__main__.py) and
exported as fp16/q4/q4f16 is finalized `deferred`: no weight is written; each initializer points
at restream.DEFERRED, and the dtype pass (export/dtypes.py) reads it from the checkpoint in its
final type, so a 7B q4f16 decoder never exists in float32, on disk or in memory.

Peak memory is one tensor plus the exporter's activations, whatever the checkpoint's size. The
parity checks then load one graph's weights into PyTorch (Weights.load), compute the references,
release them (Weights.release), and only then open the ONNX Runtime session: the two copies never
coexist.

A stand-in reads as zeros from the kernel's shared zero page: reading it allocates nothing, so the
trace's forward pass over a 7B shell costs FLOPs, not RSS. Constants the exporter computes from
a weight by arithmetic (not a view) would carry the stand-in's zeros; none occurs in the supported
families (tests/test_lean.py compares every graph with the full-weight export), and the parity
checks against PyTorch with the real weights catch one if a new family brings it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.bundle import data_file
from export.restream import DEFERRED, Deferred
from export.safetensors_io import Shards, map_keys

# Graphs whose weights pass this are written with external data (<graph>_data): building the
# inline protobuf would hold a second copy of the weights. Smaller graphs (tiny models) stay
# single files, as transformers.js's small exports are.
INLINE_BYTES = 64 * 2**20
# A transposed weight is written in pieces of this size, not as a second full copy.
CHUNK_BYTES = 16 * 2**20


def mmap_big_allocations() -> None:
    """Serve every allocation of 256 KiB or more from its own mapping (glibc's mallopt).

    By default glibc raises its mmap threshold to 32 MB as big blocks are freed, and serves
    the 4-20 MB weights and activations of an export from its heaps, which keep freed pages:
    the vision trace of CLIP-L alone left 1.6 GB resident that nothing used. With a fixed
    threshold a freed tensor goes back to the kernel at once (measured: that trace's peak
    2.1 GB -> 0.6 GB). A no-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # <malloc.h>
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(m_mmap_threshold, 256 * 2**10)


def zero_page(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A contiguous tensor over an anonymous private mapping: reads see zeros and allocate
    nothing (the shared zero page); only writes would cost memory."""
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    # the tensor holds the mapping (frombuffer keeps its buffer object): unmapped with it
    m = mmap.mmap(-1, count * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(m, dtype=dtype, count=count).view(shape)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside lives on the meta device (no init, no memory);
    buffers (position ids, rotary frequencies) are built for real, as from_pretrained does."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """{id(parameter): [(module, leaf name, full name), ...]}: tied weights have several."""
    out: dict[int, list] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for leaf, p in module._parameters.items():
            if p is not None:
                full = f"{mod_name}.{leaf}" if mod_name else leaf
                out.setdefault(id(p), []).append((module, leaf, full))
    return out


class Weights:
    """A model shell whose parameters are stand-ins, and the checkpoint that fills them.

    `load(names)` puts real float32 weights in (for PyTorch references), `release(names)` puts the
    stand-ins back; `array(tensor)` gives the real data of a tensor the exporter captured.
    """

    def __init__(self, model: nn.Module, folder: Path, conversion: dict[str, str]) -> None:
        self.model = model
        self.shards = Shards(folder)
        owners = _owners(model)
        names = [full for group in owners.values() for _, _, full in group]
        keys = map_keys(self.shards, names, conversion)
        self.groups: dict[str, list[tuple[nn.Module, str, str]]] = {}  # canonical name -> owners
        self.key: dict[str, str] = {}  # canonical name -> checkpoint key
        missing = []
        for group in owners.values():
            hits = [full for _, _, full in group if full in keys]
            if not hits:
                missing.append(group[0][2])
                continue
            self.groups[hits[0]] = group
            self.key[hits[0]] = keys[hits[0]]
        if missing:
            from export.load import CheckpointError

            raise CheckpointError(
                f"{folder} lacks {len(missing)} weights (e.g. {missing[0]}): a partial or "
                "foreign checkpoint; re-download it completely"
            )
        self.by_storage: dict[int, str] = {}
        # {graph: {initializer: reader}}: weights finalize(deferred=True) left unwritten
        self.deferred: dict[str, Deferred] = {}
        for name in self.groups:
            self._set(name, zero_page(self.shards.shape(self.key[name])))

    def _set(self, name: str, data: torch.Tensor) -> None:
        param = nn.Parameter(data, requires_grad=False)
        for module, leaf, _ in self.groups[name]:
            module._parameters[leaf] = param
        self.by_storage[data.untyped_storage().data_ptr()] = name

    def names_in(self, module: nn.Module, but: nn.Module | None = None) -> list[str]:
        """Canonical names of the parameters `module` holds, outside submodule `but`."""
        skip = {id(m) for m in but.modules()} if but is not None else set()
        ptrs = {  # by owner, so a weight tied to one inside `but` still counts when held outside
            p.untyped_storage().data_ptr()
            for m in module.modules()
            if id(m) not in skip
            for p in m._parameters.values()
            if p is not None
        }
        return [n for n, ptr in self._params() if ptr in ptrs]

    def _params(self) -> Iterator[tuple[str, int]]:
        for name, group in self.groups.items():
            module, leaf, _ = group[0]
            yield name, module._parameters[leaf].untyped_storage().data_ptr()

    def nbytes(self, names: list[str]) -> int:
        """Float32 bytes of parameters `names` once loaded."""
        return sum(4 * int(np.prod(self.shards.shape(self.key[n]), dtype=np.int64)) for n in names)

    def lookup(self, embedding: nn.Embedding):
        """ids -> float32 rows of `embedding`'s table, read from the checkpoint row by row."""
        (name,) = self.names_in(embedding)
        return lambda ids: self.shards.rows(self.key[name], ids)

    def load(self, names: list[str]) -> None:
        for name in names:
            self._unmap(name)
            self._set(name, torch.from_numpy(self.shards.read(self.key[name])))

    def release(self, names: list[str]) -> None:
        for name in names:
            self._unmap(name)
            self._set(name, zero_page(self.shards.shape(self.key[name])))

    def _unmap(self, name: str) -> None:
        module, leaf, _ = self.groups[name][0]
        self.by_storage.pop(module._parameters[leaf].untyped_storage().data_ptr(), None)

    def source(self, tensor: torch.Tensor) -> str | None:
        """The parameter a captured tensor is a view of, or None (a constant of its own)."""
        return self.by_storage.get(tensor.untyped_storage().data_ptr())

    def _real(self, tensor: torch.Tensor) -> torch.Tensor:
        """Captured `tensor` with real contents: its parameter read from the checkpoint and
        viewed with the same shape, strides and offset (the exporter's folded Transpose), or
        the tensor itself when it is a constant of the exporter's own (buffers, shapes)."""
        name = self.source(tensor)
        if name is None:
            return tensor.detach()
        real = torch.from_numpy(self.shards.read(self.key[name]))
        return real.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())

    def array(self, tensor: torch.Tensor) -> np.ndarray:
        """The real contents of captured `tensor`, contiguous, in its dtype."""
        return _numpy(self._real(tensor).contiguous(), tensor.dtype)

    def chunks(self, tensor: torch.Tensor, limit: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """array(tensor) as contiguous pieces of <= `limit` bytes along its first axis: one copy
        of the parameter plus one piece is all a transposed view costs."""
        view = self._real(tensor)
        if view.is_contiguous() or view.dim() == 0:
            yield _numpy(view.contiguous(), tensor.dtype)
            return
        row = max(1, view[0].numel() * view.element_size())
        step = max(1, limit // row)
        for i in range(0, view.shape[0], step):
            yield _numpy(view[i : i + step].contiguous(), tensor.dtype)


_NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """`tensor` (checkpoint data: float32) as numpy in the stand-in's dtype."""
    arr = tensor.numpy()
    return arr.astype(_NUMPY_OF[dtype], copy=False) if dtype in _NUMPY_OF else arr


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or 2**62."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return 2**62


def shell(folder: Path, text_layers: int | None = None) -> tuple[nn.Module, Weights]:
    """The model of checkpoint `folder` (its family's transformers class: LLaVA or Qwen2.5-VL)
    with stand-in weights, eval mode, eager attention; `text_layers` keeps the first layers of
    the text model only (a parity slice)."""
    import transformers
    from transformers import AutoConfig
    from transformers.modeling_utils import no_init_weights

    from export.load import read_config
    from svdprune_onnx.families import FAMILIES

    cls = getattr(transformers, FAMILIES[read_config(folder)["model_type"]].hf_class)
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if text_layers is not None:
        cfg.text_config.num_hidden_layers = text_layers
    with params_on_meta(), no_init_weights():
        model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.tie_weights()  # lm_head = embed_tokens where the config ties them (no_init skips it)
    if (folder / "generation_config.json").is_file():  # eos / pad ids, as from_pretrained reads
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    weights = Weights(model, folder, cls._checkpoint_conversion_mapping)
    return model.eval(), weights


@contextlib.contextmanager
def capture(weights: Weights) -> Iterator[dict[str, torch.Tensor]]:
    """TorchScript exports inside write no weights and record {initializer name: tensor}.

    Hooks two of the exporter's passes:
      - ONNX shape inference gets the weights' shapes from the graph, not their values: it would
        serialise every constant input it is given, ~3x the largest weight at once (770 MB for
        a 256 MB table), and a stand-in's zeros carry no value to propagate anyway;
      - initializer de-duplication, the last point where the named params exist: its value
        comparison would merge stand-ins (all zeros), so finalize() de-duplicates by the real
        contents instead, as the exporter does with real weights.
    """
    captured: dict[str, torch.Tensor] = {}
    passes = torch._C
    dedup, infer = (
        passes._jit_pass_onnx_deduplicate_initializers,
        passes._jit_pass_onnx_graph_shape_type_inference,
    )
    export = torch.onnx.export

    def record(graph, params, is_train):
        captured.clear()
        captured.update(params)
        return params

    def shapes_only(graph, params, opset):
        return infer(graph, {k: v for k, v in params.items() if weights.source(v) is None}, opset)

    def weightless(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            kwargs["export_params"] = False
        return export(*args, **kwargs)

    passes._jit_pass_onnx_deduplicate_initializers = record
    passes._jit_pass_onnx_graph_shape_type_inference = shapes_only
    torch.onnx.export = weightless
    try:
        yield captured
    finally:
        passes._jit_pass_onnx_deduplicate_initializers = dedup
        passes._jit_pass_onnx_graph_shape_type_inference = infer
        torch.onnx.export = export


def finalize(
    path: Path,
    captured: dict[str, torch.Tensor],
    weights: Weights,
    label: str,
    deferred: bool = False,
) -> int:
    """Turn the weightless graph at `path` into the full one: each captured bare input becomes
    an initializer with the real data, streamed one tensor at a time; returns the weight bytes.

    `deferred`: write no weights at all; each initializer points at restream.DEFERRED and
    `weights.deferred[label]` gets its reader, for a dtype pass that reads the checkpoint
    itself (a 7B decoder then never exists in float32 on disk). The contents are still read
    once here, for the de-duplication by value."""
    from export.progress import bar

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    bare = {i.name for i in g.input} & set(captured)
    order = [i.name for i in g.input if i.name in bare]  # the exporter de-duplicates in this order
    total = sum(t.numel() * t.element_size() for n, t in captured.items() if n in bare)
    external = deferred or total > INLINE_BYTES
    data = data_file(path)
    data.unlink(missing_ok=True)
    readers: Deferred = weights.deferred.setdefault(label, {}) if deferred else {}
    seen: dict[bytes, str] = {}
    twins: list[onnx.NodeProto] = []
    offset = 0
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(data, "wb")) if external and not deferred else None
        progress = stack.enter_context(bar(total, f"{label} weights", unit="B"))
        for name in order:
            t = captured[name]
            start = offset + (-offset % 4096)  # page-aligned, as onnx's own writer does
            if f is not None:
                f.seek(start)
            digest, inline = hashlib.sha256(), []
            for arr in weights.chunks(t):
                raw = memoryview(arr.reshape(-1)).cast("B")  # no copy
                digest.update(raw)
                if f is not None:
                    f.write(raw)
                elif not external:
                    inline.append(raw.tobytes())
                progress.update(arr.nbytes)
                dtype = arr.dtype
            key = digest.digest() + str((t.dtype, tuple(t.shape))).encode()
            if key in seen:  # identical contents: one initializer + Identity, as torch does
                twins.append(onnx.helper.make_node("Identity", [seen[key]], [name]))
                if f is not None:
                    f.truncate(offset)  # drop the bytes just written
                continue
            seen[key] = name
            length = t.numel() * t.element_size()
            tensor = onnx.TensorProto(name=name, dims=t.shape)
            tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
            if not external:
                tensor.raw_data = b"".join(inline)
            else:
                location = DEFERRED if deferred else data.name
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", location), ("offset", start), ("length", length)):
                    tensor.external_data.add(key=k, value=str(v))
                offset = start + length
                if deferred:
                    readers[name] = functools.partial(weights.array, t)
            g.initializer.append(tensor)
    kept = [i for i in g.input if i.name not in bare]
    del g.input[:]
    g.input.extend(kept)
    for i, node in enumerate(twins):  # first in the graph, named on from the exporter's count
        node.name = f"Identity_{sum(n.op_type == 'Constant' for n in g.node) + i}"
    nodes = [*twins, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(path))
    return total
