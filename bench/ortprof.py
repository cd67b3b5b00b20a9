"""Where a vision graph's time goes, from ONNX Runtime's own profiler (one run, no drift).

Node names of the torchscript export carry the module scope: "/layers.3/mlp/fc1/MatMul" is the
tower, "/projector/..." the projector, and top-level names ("/MatMul_12", "/TopK") are what
PrunedVision.forward adds itself: the [CLS] slice, scoring, top-K and the gather. ORT keeps that
prefix on nodes it fuses ("/MatMul_2/..."); nodes it inserts itself have no scope ("other").
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

TOWER_SCOPES = ("vm", "embeddings", "pre_layrnorm", "layers")


def scope(node: str) -> str:
    """'tower', 'projector', 'pruning' (top level: CLS slice, scoring, top-K, gather), 'other'."""
    if not node.startswith("/"):
        return "other"
    first = node.split("/")[1]
    if first.startswith(TOWER_SCOPES):
        return "tower"
    return "projector" if first == "projector" else "pruning"


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
    events = json.loads(trace.read_text())
    trace.unlink(missing_ok=True)
    run = [e for e in events if e.get("name") == "model_run"][-1]
    out: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.get("name", "")
        inside = run["ts"] <= e.get("ts", -1) <= run["ts"] + run["dur"]
        if e.get("cat") == "Node" and name.endswith("_kernel_time") and inside:
            out[scope(name.removesuffix("_kernel_time"))] += e["dur"] / 1e3
    out["run"] = run["dur"] / 1e3
    return dict(out)
