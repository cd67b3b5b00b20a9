"""ONNX Runtime sessions with explicit execution providers and a loud, never silent, fallback.

    --provider auto      vision: TensorRT > CUDA > CPU    decoder/embed: CUDA > CPU
    --provider tensorrt  vision on TensorRT (engine + timing cache beside the bundle), rest CUDA
    --provider cuda      every graph on CUDA
    --provider cpu       every graph on CPU

onnxruntime-gpu lists CUDA/TensorRT even on machines without a GPU and then quietly runs on
CPU, so the providers a session really got are checked after it is created: an explicit choice
that did not take raises ProviderError; `auto` falls back and says so on stderr.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

# ORT's own logger prints a multi-line warning per failed provider; ours says it in one line.
ort.set_default_logger_severity(3)
_NOTED: set[str] = set()

PROVIDER_CHOICES = ("auto", "cuda", "tensorrt", "cpu")
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ProviderError(RuntimeError):
    """The asked-for execution provider cannot run here."""


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are made: provider choice, threads (0 = ORT default), optimisation level."""

    provider: str = "auto"
    threads: int = 0
    opt_level: str = "all"
    trt_fp16: bool = False


def _trt_options(bundle: Path, fp16: bool) -> dict:
    # Engines take minutes to build: cache them (and the timing cache) next to the bundle.
    cache = bundle.parent / f"{bundle.name}.trt-cache"
    cache.mkdir(exist_ok=True)
    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": fp16,
    }


_PROVIDER_LIBS = {CUDA: "cuda", TRT: "tensorrt"}


@functools.cache
def unusable_reason(provider: str) -> str | None:
    """Why a GPU provider cannot load here (a missing CUDA/cuDNN/TensorRT library), or None.

    Loading the provider library ourselves answers this quietly; letting ORT try prints a
    multi-line error per session and then falls back anyway.
    """
    if provider not in ort.get_available_providers():
        return f"{provider} is not in this onnxruntime build (install onnxruntime-gpu)"
    lib = (
        Path(ort.__file__).parent
        / "capi"
        / f"libonnxruntime_providers_{_PROVIDER_LIBS[provider]}.so"
    )
    if not lib.exists():
        return None  # another platform's layout: let ORT try, the check after creation holds
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return f"{provider} cannot load ({str(e).replace(str(lib) + ': ', '')})"
    return None


def wanted_providers(cfg: SessionConfig, graph: str, bundle: Path) -> list:
    """Provider list for one graph ("vision" or "text"), best first, CPU always last."""
    if cfg.provider not in PROVIDER_CHOICES:
        raise ProviderError(
            f"unknown provider {cfg.provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}"
        )
    if cfg.provider == "cpu":
        return [CPU]
    # TensorRT suits the static-shape vision graph; a growing KV cache suits CUDA better.
    candidates = (
        [TRT, CUDA] if graph == "vision" and cfg.provider in ("auto", "tensorrt") else [CUDA]
    )
    chain: list = []
    for provider in candidates:
        reason = unusable_reason(provider)
        if reason is None:
            chain.append((TRT, _trt_options(bundle, cfg.trt_fp16)) if provider == TRT else CUDA)
        elif cfg.provider == "auto":
            if provider not in _NOTED:
                _NOTED.add(provider)
                print(f"note: {reason}; using the next provider", file=sys.stderr)
        elif provider == CUDA or cfg.provider == "tensorrt":
            raise ProviderError(f"{reason}; pass --provider cpu or --provider auto")
    return [*chain, CPU]


def open_session(path: Path, graph: str, cfg: SessionConfig, bundle: Path) -> ort.InferenceSession:
    """Create a session and check it really got the accelerator that was asked for."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVELS[cfg.opt_level]
    opts.intra_op_num_threads = cfg.threads
    opts.log_severity_level = 3  # ORT's own fallback warnings are replaced by ours below
    wanted = wanted_providers(cfg, graph, bundle)
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
    got = sess.get_providers()[0]
    if first != CPU and got == CPU:
        message = f"{first} could not start (no usable GPU, driver, CUDA or cuDNN)"
        if cfg.provider != "auto":
            raise ProviderError(f"{message}; pass --provider cpu or --provider auto")
        if first not in _NOTED:  # once per provider and process, not once per graph
            _NOTED.add(first)
            print(f"note: {message}; running on CPU", file=sys.stderr)
    return sess


def device_of(sess: ort.InferenceSession) -> str:
    """IOBinding device type for a session's first provider: "cuda" or "cpu"."""
    return "cuda" if sess.get_providers()[0] in (CUDA, TRT) else "cpu"
