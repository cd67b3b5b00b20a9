"""Lean export for the dynamo routes: trace on stand-ins, read each weight when it is saved.

    torch.onnx.export(dynamo=True, optimize=False) over a shell of stand-ins (export/lean.py)
      └─ onnx_ir model: each weight an initializer holding its torch stand-in
           ├─ lazy(): stand-in -> ir.LazyTensor that reads the checkpoint when evaluated
           ├─ Transpose(weight) -> one lazy initializer of the transposed weight, as the
           │   optimizer's constant folding would make it (it always folds Transposes of a
           │   weight, and would hold every folded weight in memory at once)
           └─ the exporter's own optimizer, as optimize=True runs it
      └─ save_ir(): onnx_ir writes tensor by tensor, each lazy weight read, written, freed

The exported program references stand-ins only, so nothing of the weights outlives the save.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from export.bundle import data_file
from export.lean import Weights
from export.restream import DEFERRED


def export_program(module: torch.nn.Module, args: tuple, weights: Weights | None, **kwargs):
    """torch.onnx.export(dynamo=True): with `weights`, `module` holds stand-ins and the model's
    weights become lazy reads of the checkpoint (optimized as the exporter would)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, optimize=weights is None, verbose=False, **kwargs
        )
    if weights is not None:
        lazy(program.model, weights)
        program.optimize()
    return program


def lazy(model: ir.Model, weights: Weights) -> None:
    """Every initializer holding a stand-in reads its weight from the checkpoint when evaluated;
    a Transpose whose only input is such a weight (its only reader) becomes its lazy result."""
    g = model.graph
    for value in g.initializers.values():
        tensor = getattr(value.const_value, "raw", None)
        if isinstance(tensor, torch.Tensor) and weights.source(tensor) is not None:
            value.const_value = _lazy(weights, tensor, value.const_value.dtype, None)
    for node in list(g):
        (src, *rest), out = (*node.inputs, None), node.outputs[0]
        if node.op_type != "Transpose" or node.domain != "" or rest != [None]:
            continue
        const = src.const_value if src is not None and src.is_initializer() else None
        read = const.raw if isinstance(const, ir.LazyTensor) else None
        if not isinstance(read, _Read) or read.perm or len(src.uses()) != 1:
            continue
        if out.is_graph_output():
            continue
        perm = node.attributes.get_ints("perm", None)
        perm = list(perm) if perm is not None else list(range(len(const.shape)))[::-1]
        folded = ir.Value(name=out.name, type=out.type, shape=out.shape)
        folded.const_value = _lazy(weights, read.tensor, const.dtype, perm)
        out.replace_all_uses_with(folded)
        g.remove(node, safe=True)
        g.initializers.pop(src.name)
        out.name = None
        g.initializers.add(folded)


class _Read:
    """A lazy weight's function: the stand-in `tensor`'s real data (transposed by `perm`)."""

    def __init__(self, weights: Weights, tensor: torch.Tensor, perm: list[int] | None) -> None:
        self.weights, self.tensor, self.perm = weights, tensor, perm

    def __call__(self) -> ir.Tensor:
        arr = self.weights.array(self.tensor)
        if self.perm is not None:
            arr = np.ascontiguousarray(arr.transpose(self.perm))
        return ir.Tensor(arr)


def _lazy(weights: Weights, tensor: torch.Tensor, dtype, perm: list[int] | None) -> ir.LazyTensor:
    shape = tuple(tensor.shape) if perm is None else tuple(tensor.shape[i] for i in perm)
    return ir.LazyTensor(_Read(weights, tensor, perm), dtype=dtype, shape=ir.Shape(shape))


def defer(model: ir.Model, weights: Weights, label: str) -> None:
    """Leave the lazy weights unwritten: each points at restream.DEFERRED and its reader goes to
    `weights.deferred[label]` (for a dtype pass that reads the checkpoint itself)."""
    readers = weights.deferred.setdefault(label, {})
    for value in model.graph.initializers.values():
        const = value.const_value
        if isinstance(const, ir.LazyTensor) and isinstance(const.raw, _Read):
            value.const_value = ir.ExternalTensor(
                DEFERRED, 0, const.nbytes, const.dtype, shape=const.shape, name=value.name
            )
            readers[value.name] = functools.partial(_numpy, const.raw)


def _numpy(read: _Read) -> np.ndarray:
    return read().numpy()


def save_ir(model: ir.Model, path: Path, limit: int | None = None) -> None:
    """Save an onnx_ir model (the dynamo routes) tensor by tensor, lazy weights read one at a
    time, with external data (`<graph>_data`) once its weights pass `limit` bytes (default
    export.lean.INLINE_BYTES; deferred weights stay references)."""
    from export import lean

    data = data_file(path)
    data.unlink(missing_ok=True)  # a stale file from an earlier, larger export
    values = [v.const_value for v in model.graph.initializers.values() if v.const_value]
    if any(isinstance(c, ir.ExternalTensor) for c in values):
        ir.save(model, path)
        return
    size = sum(c.nbytes for c in values)
    limit = lean.INLINE_BYTES if limit is None else limit
    ir.save(model, path, external_data=data.name if size > limit else None)
