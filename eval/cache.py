"""The resumable result store: one JSONL line per finished (config, question), appended at once.

    build/eval/cache/results.jsonl      {"config": fingerprint, "key": image|question, ...}
    build/eval/cache/logits/<config>/<sha1(key)>.npy   reference first-token logits (V,) f32

A line is written (and flushed) as soon as its question is done, so a crash loses at most the
question in flight; a rerun reads the file and skips every (config, key) already there. The
reference logits are saved before their line, so a line always has its logits. Only the
reference model's logits are kept: pruned runs store KL and top-1 agreement as numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np


class CacheError(RuntimeError):
    """The cache is inconsistent; the message says what to delete."""


def fingerprint(spec: dict) -> str:
    """A short stable id of everything that decides a config's answers."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


class Cache:
    """Finished rows by (config, key), backed by an append-only JSONL file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "results.jsonl"
        self.rows: dict[tuple[str, str], dict] = {}
        root.mkdir(parents=True, exist_ok=True)
        if self.file.is_file():
            lines = self.file.read_text().splitlines()
            for n, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    if n == len(lines):  # a crash mid-write leaves at most the last line cut
                        print(f"note: {self.file}:{n} is cut short (a crash mid-write); it is "
                              "recomputed", file=sys.stderr)  # fmt: skip
                        self._truncate_to(lines[: n - 1])
                        break
                    msg = f"{self.file}:{n} is not JSON ({e}); delete {self.root}"
                    raise CacheError(msg) from e
                self.rows[(row["config"], row["key"])] = row
        self._fh = self.file.open("a")

    def _truncate_to(self, lines: list[str]) -> None:
        # Rewrite without the cut line so the next append starts on a fresh line.
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.file)

    def get(self, config: str, key: str) -> dict | None:
        return self.rows.get((config, key))

    def put(self, row: dict) -> None:
        """Append one finished row and flush it to the OS."""
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        self.rows[(row["config"], row["key"])] = row

    def close(self) -> None:
        self._fh.close()

    # --- reference logits --------------------------------------------------------------------
    def _logits_path(self, config: str, key: str) -> Path:
        return self.root / "logits" / config / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def save_logits(self, config: str, key: str, logits: np.ndarray) -> None:
        path = self._logits_path(config, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, np.asarray(logits, dtype=np.float32))
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    def load_logits(self, config: str, key: str) -> np.ndarray:
        path = self._logits_path(config, key)
        if not path.is_file():
            raise CacheError(
                f"reference logits {path} are missing but their row is cached; delete {self.root} "
                "to recompute"
            )
        return np.load(path)
