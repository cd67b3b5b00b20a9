"""Where a graph's time goes, from ONNX Runtime's own profiler (one run, no drift).

Node names of the torchscript export carry the module scope: "/layers.3/mlp/fc1/MatMul" is the
tower, "/projector/..." the projector, and top-level names ("/MatMul_12", "/TopK") are what
PrunedVision.forward adds itself: the [CLS] slice, scoring, top-K and the gather. ORT keeps that
prefix on nodes it fuses ("/MatMul_2/..."); nodes it inserts itself have no scope ("other").

    session ─► profiling_twin (same providers, options, threads) ─► run ×n ─► end_profiling
            ─► trace JSON (Chrome format) ─► scope_ms: kernel ms per scope inside one model_run

Runtime-only (onnxruntime + stdlib): used by runtime.profile and by the benchmarks.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

TOWER_SCOPES = ("vm", "embeddings", "pre_layrnorm", "layers")
SCOPES = ("tower", "projector", "pruning", "other")
KERNEL_SUFFIX = "_kernel_time"


def scope(node: str) -> str:
    """'tower', 'projector', 'pruning' (top level: CLS slice, scoring, top-K, gather), 'other'."""
    if not node.startswith("/"):
        return "other"
    first = node.split("/")[1]
    if first.startswith(TOWER_SCOPES):
        return "tower"
    return "projector" if first == "projector" else "pruning"


def model_runs(events: list[dict]) -> list[dict]:
    """The trace's model_run events (one per session.run), in order."""
    return [e for e in events if e.get("name") == "model_run"]


def scope_ms(events: list[dict], run: int = -1) -> dict[str, float]:
    """Kernel ms per scope inside the `run`-th model_run, plus "run": that run's wall ms."""
    runs = model_runs(events)
    if not runs:
        raise ValueError(
            "the ORT trace holds no model_run event; run the session before reading it"
        )
    r = runs[run]
    out: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.get("name", "")
        inside = r["ts"] <= e.get("ts", -1) <= r["ts"] + r["dur"]
        if e.get("cat") == "Node" and name.endswith(KERNEL_SUFFIX) and inside:
            out[scope(name.removesuffix(KERNEL_SUFFIX))] += e["dur"] / 1e3
    out["run"] = r["dur"] / 1e3
    return {s: out.get(s, 0.0) for s in (*SCOPES, "run")}


def read_trace(path: Path) -> list[dict]:
    """Events of an ORT Chrome-trace file."""
    return json.loads(Path(path).read_text())


def profiling_twin(sess: ort.InferenceSession, path: Path, prefix: Path) -> ort.InferenceSession:
    """A second session on the same graph with the profiler on, the same providers (with their
    options) and the same threads / optimisation level, so its kernels time like the original's.
    Traces go to `prefix`_<timestamp>.json when end_profiling() is called."""
    src = sess.get_session_options()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = src.graph_optimization_level
    opts.intra_op_num_threads = src.intra_op_num_threads
    opts.log_severity_level = src.log_severity_level
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    providers = sess.get_providers()
    options = sess.get_provider_options()
    return ort.InferenceSession(
        str(path),
        sess_options=opts,
        providers=providers,
        provider_options=[options.get(p, {}) for p in providers],
    )


def profile(path: Path, feed: dict, providers: list[str], prefix: Path) -> dict[str, float]:
    """Sum of kernel times per scope in ms for the second of two runs, plus the run itself.

    The profiler adds a few µs to every node it times, so graphs with thousands of small
    pruning nodes read a little high: an upper bound on the pruning cost.
    """
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    for _ in range(2):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    events = read_trace(trace)
    trace.unlink(missing_ok=True)
    return scope_ms(events)
