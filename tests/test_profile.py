"""Latency profiling: a quick `make profile` (tiny model, K = N and 16, 2 repetitions) writes
valid JSON/CSV/PNG with every figure, and the runtime-only profiler runs without torch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import profile as bench_profile
from export.__main__ import cli as export_cli
from runtime import contract as C
from runtime import ortprof
from runtime.bundle import BundleError
from runtime.profile import one_model

from .conftest import REPO

REQUIRED = [
    "k", "method", "preprocess_ms", "vision_ms", "embed_ms", "prefill_ms", "ttft_ms",
    "decode_ms_per_token", "decode_tokens_per_s", "e2e_ms", "ttft_ms_min", "ttft_ms_max",
    "e2e_ms_min", "e2e_ms_max", "pruning_ms", "pruning_pct", "peak_rss_mb", "device_memory_mb",
    "kv_cache_bytes", "prefill_gflops", "prompt_tokens", "provider_text",
    "torch_ttft_ms", "torch_e2e_ms", "torch_decode_tokens_per_s", "speedup_e2e",
]  # fmt: skip
STAGES = ("preprocess_ms", "vision_ms", "embed_ms", "prefill_ms", "decode_ms")


@pytest.fixture(scope="module")
def profiled(tiny_clip: Path, tmp_path_factory) -> tuple[Path, Path]:
    """bench.profile on the tiny checkpoint with PyTorch alongside: K = 16 exported here (in
    process, faster), K = N exported by bench.profile itself (the missing-bundle path).
    Returns (bundles dir, output dir)."""
    root = tmp_path_factory.mktemp("profile")
    out = root / "out"
    assert export_cli(["-m", str(tiny_clip), "--k", "16", "-o", str(root / "tiny-k16")]) == 0
    # --provider cpu: the figures below (pruning share from per-node kernel times, providers
    # used) are the CPU's; on a GPU `auto` would put the vision graph in one TensorRT engine.
    argv = ["-m", str(tiny_clip), "--k", "N", "16", "--name", "tiny", "--bundles-dir", str(root),
            "--reps", "2", "--warmup", "0", "--new", "6", "--provider", "cpu",
            "-o", str(out)]  # fmt: skip
    assert bench_profile.main(argv) == 0
    return root, out


def test_latency_json_has_every_figure(profiled) -> None:
    _, out = profiled
    doc = json.loads((out / "latency.json").read_text())
    rows = {r["k"]: r for r in doc["rows"]}
    assert sorted(rows) == [16, 576]
    assert rows[576]["method"] == "none" and rows[16]["method"] != "none"
    for r in rows.values():
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        nulls = [k for k in REQUIRED if r[k] is None and k != "device_memory_mb"]
        assert not nulls, nulls
        # device memory: None for a CPU session; on CUDA nvidia-smi's per-process figure, or
        # None where it lists none (no nvidia-smi, a container's PID namespace, a Jetson)
        if r["provider_text"] == "CPUExecutionProvider":
            assert r["device_memory_mb"] is None
        else:
            assert r["device_memory_mb"] is None or r["device_memory_mb"] > 0
        assert r["ttft_ms"] > 0 and r["torch_ttft_ms"] > 0
        assert r["ttft_ms_min"] <= r["ttft_ms"] <= r["ttft_ms_max"]
        # stages add up to the end-to-end time (the rest: result assembly)
        assert sum(r[s] for s in STAGES) == pytest.approx(r["e2e_ms"], rel=0.10)
        ttft = r["preprocess_ms"] + r["vision_ms"] + r["embed_ms"] + r["prefill_ms"]
        assert r["ttft_ms"] == pytest.approx(ttft, rel=1e-6)  # 2 reps: medians are means
        assert r["peak_rss_mb"] > 50
    # the profiler separates the pruning nodes: real work at K = 16, next to none at K = N
    assert rows[16]["pruning_ms"] > 2 * rows[576]["pruning_ms"]  # (kernel jitter: not 10x)
    assert 0 < rows[16]["pruning_pct"] < 100
    # KV cache and FLOPs from the shapes: the K = 16 prompt is 560 tokens shorter
    assert rows[576]["prompt_tokens"] - rows[16]["prompt_tokens"] == 560
    text = json.loads((profiled[0] / "tiny-k16" / "config.json").read_text())["text_config"]
    per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 4
    for r in rows.values():
        assert r["kv_cache_bytes"] == per_token * r["prompt_tokens"]
    assert rows[576]["prefill_gflops"] > 10 * rows[16]["prefill_gflops"] > 0
    env = doc["environment"]
    for key in ("cpu", "cores", "gpu", "providers_used", "onnxruntime", "jetson_power_mode"):
        assert key in env, key
    assert env["providers_used"] == ["CPUExecutionProvider"]
    kinds = " ".join(t["target"] for t in doc["targets"])
    assert "TTFT(K=16) / TTFT(K=576)" in kinds and "pruning share" in kinds and "1.5x" in kinds
    assert all(t["pass"] in (True, False) for t in doc["targets"])


def test_csv_and_png(profiled) -> None:
    _, out = profiled
    with (out / "latency.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(k in rows[0] for k in REQUIRED)
    assert all(float(r["ttft_ms"]) > 0 for r in rows)
    png = (out / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_runtime_profile_cli_without_torch_keeps_traces(profiled, photo_paths) -> None:
    root, _ = profiled
    out = root / "rt"
    code = (
        "import sys; from runtime.profile import cli\n"
        f"rc = cli(['-b', {str(root / 'tiny-k16')!r}, '-i', {str(photo_paths[0])!r}, "
        f"'--reps', '1', '--warmup', '0', '--new', '3', '--provider', 'cpu', '--trace', "
        f"'-o', {str(out)!r}])\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "print('BAD', bad, rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert "BAD [] 0" in proc.stdout, proc.stdout + proc.stderr
    assert "| K " in proc.stdout and "pruning share" in proc.stdout
    traces = sorted(p.name for p in (out / "trace").iterdir())
    assert traces == ["tiny-k16_decoder.json", "tiny-k16_embed.json", "tiny-k16_vision.json"]
    events = ortprof.read_trace(out / "trace" / "tiny-k16_vision.json")
    assert len(ortprof.model_runs(events)) >= 2


def test_scope_split() -> None:
    assert ortprof.scope("/vm/encoder/layers.3/mlp/fc1/MatMul") == "tower"
    assert ortprof.scope("/layers.0/self_attn/Softmax") == "tower"
    assert ortprof.scope("/projector/linear_1/MatMul") == "projector"
    assert ortprof.scope("/TopK") == "pruning" and ortprof.scope("/MatMul_2/fused") == "pruning"
    assert ortprof.scope("BiasGelu") == "other"
    events = [
        {"name": "model_run", "ts": 100, "dur": 50},
        {"cat": "Node", "name": "/TopK_kernel_time", "ts": 110, "dur": 2000},
        {"cat": "Node", "name": "/layers.1/x_kernel_time", "ts": 120, "dur": 3000},
        {"cat": "Node", "name": "/TopK_kernel_time", "ts": 10, "dur": 9999},  # another run
    ]
    ms = ortprof.scope_ms(events)
    assert (
        ms["pruning"] == 2.0 and ms["tower"] == 3.0 and ms["projector"] == 0 and ms["run"] == 0.05
    )


def test_bundles_of_two_models_are_refused(tmp_path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / C.MANIFEST_FILE).write_text(json.dumps({"model": {"name": name}}))
    with pytest.raises(BundleError, match="one model per run"):
        one_model([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(BundleError, match="export it first"):
        one_model([tmp_path / "missing"])
