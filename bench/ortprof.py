"""Where a vision graph's time goes, from ONNX Runtime's profiler: moved to runtime.ortprof.

Kept as an import path for the benchmarks (bench.overhead); the runtime profiler uses the same
scope logic, so there is one definition of what counts as "pruning".
"""

from __future__ import annotations

from runtime.ortprof import TOWER_SCOPES, profile, scope, scope_ms

__all__ = ["TOWER_SCOPES", "profile", "scope", "scope_ms"]
