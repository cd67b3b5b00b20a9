"""Read and write safetensors one tensor at a time, with plain file reads (no mmap, no torch).

    model.safetensors / model-0000i-of-0000n.safetensors (+ model.safetensors.index.json)
      └─ header (8-byte length + JSON: dtype, shape, data_offsets) ─► Shards.read(key)
           └─ seek + readinto a fresh array of exactly that tensor ─► float32 (bf16/fp16 widened)

Why not `safetensors.safe_open`: it memory-maps the shard, and every page a read touches counts
in the process's RSS for as long as the map lives, so reading a 14 GB checkpoint "lazily" still
shows 14 GB resident. A `readinto` leaves only the one tensor in anonymous memory; the page
cache holds the file, outside the process.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from export.load import CheckpointError

# safetensors dtype names <-> numpy; BF16 has no numpy type and is widened by bit shift.
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
          "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _NUMPY.items() if k != "BF16"}
INDEX_FILE = "model.safetensors.index.json"


class ShardError(CheckpointError):
    """A safetensors shard is missing, truncated or not safetensors; the message names it."""


def read_header(path: Path) -> tuple[dict, int]:
    """({key: {dtype, shape, data_offsets}}, byte offset of the data section) of one shard."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                raise ShardError(f"cannot load weights from {path}: not a safetensors file")
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(
            f"cannot load weights from {path}: not a readable safetensors file ({e}); "
            "re-download it"
        ) from e
    header.pop("__metadata__", None)
    return header, 8 + n


def shard_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors shards: the index's files, else every *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ShardError(
                f"cannot load weights from {folder}: it lacks shard(s) {missing} named by "
                f"{INDEX_FILE}; re-download the checkpoint"
            )
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


class Shards:
    """Every tensor of a checkpoint folder's safetensors, by key; read(key) loads one."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for path in shard_files(self.folder):
            header, start = read_header(path)
            size = path.stat().st_size
            for key, info in header.items():
                end = start + info["data_offsets"][1]
                if end > size or info["dtype"] not in _NUMPY:
                    raise ShardError(
                        f"cannot load weights from {path}: tensor {key} is truncated or of an "
                        "unknown dtype; re-download the checkpoint"
                    )
                self.where[key] = (path, start, info)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key][2]["shape"])

    def nbytes(self, key: str) -> int:
        lo, hi = self.where[key][2]["data_offsets"]
        return hi - lo

    def read(self, key: str, dtype: type = np.float32) -> np.ndarray:
        """The tensor `key` as a fresh array of `dtype` (float tensors are converted)."""
        path, start, info = self.where[key]
        lo, hi = info["data_offsets"]
        raw = np.empty(hi - lo, np.uint8)
        with open(path, "rb") as f:
            f.seek(start + lo)
            if f.readinto(memoryview(raw)) != hi - lo:
                raise ShardError(
                    f"cannot load weights from {path}: tensor {key} is truncated; re-download "
                    "the checkpoint"
                )
        arr = raw.view(_NUMPY[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # the high half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr if arr.dtype == dtype else arr.astype(dtype)

    def rows(self, key: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (any shape) of 2-D tensor `key` as float32 (..., cols), one pread per row:
        an embedding lookup that reads a few KB instead of the table."""
        path, start, info = self.where[key]
        cols, kind = info["shape"][1], _NUMPY[info["dtype"]]
        size = cols * np.dtype(kind).itemsize
        base = start + info["data_offsets"][0]
        flat = np.asarray(ids).reshape(-1)
        out = np.empty((len(flat), cols), np.float32)
        with open(path, "rb") as f:
            for i, row in enumerate(flat.tolist()):
                arr = np.frombuffer(os.pread(f.fileno(), size, base + row * size), kind)
                if info["dtype"] == "BF16":
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                out[i] = arr
        return out.reshape(*np.shape(ids), cols)


def write_shard(path: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                produce: Iterator[np.ndarray]) -> int:  # fmt: skip
    """Write one safetensors shard tensor by tensor: the header comes from the declared
    (key, shape, dtype) list, then `produce` yields each array in that order (one in memory at a
    time). Written to `path`.part and renamed, so a killed run leaves no shard that looks whole.
    Returns the bytes written."""
    header, offset = {}, 0
    specs = list(tensors)
    for key, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                       "data_offsets": [offset, offset + n]}  # fmt: skip
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (key, shape, dtype), arr in zip(specs, produce, strict=True):
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{key}: produced {arr.dtype}{arr.shape}, declared {shape}")
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(part, path)
    return 8 + len(blob) + offset


def map_keys(shards: Shards, params: Iterable[str], conversion: dict[str, str]) -> dict[str, str]:
    """{model parameter name: checkpoint key}, through the model class's legacy-key regexes
    (`_checkpoint_conversion_mapping`: "^language_model.model" -> "model.language_model", ...).
    Parameters absent from the checkpoint are left out (tied weights; the caller checks)."""
    import re

    wanted = set(params)
    out = {}
    for key in shards.where:
        name = key
        if name not in wanted:
            for pattern, repl in conversion.items():
                name, n = re.subn(pattern, repl, key)
                if n:
                    break
        if name in wanted:
            out[name] = key
    return out
