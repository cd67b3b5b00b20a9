"""ONNX Runtime sessions with explicit execution providers and a loud, never silent, fallback.

    --provider auto      vision: TensorRT > CUDA > CPU    decoder/embed: CUDA > CPU
    --provider tensorrt  vision on TensorRT (engine + timing cache beside the bundle), rest CUDA
    --provider cuda      every graph on CUDA
    --provider cpu       every graph on CPU

onnxruntime-gpu lists CUDA/TensorRT even on machines without a GPU and then quietly runs on
CPU, so the providers a session really got are checked after it is created: an explicit choice
that did not take raises ProviderError; `auto` falls back and says so on stderr.

Bundle variants (svdprune.json `graphs.<file>.dtype`): a graph format that a provider has no
kernels for is refused *before* a session is made (UNSUPPORTED_DTYPES), since ONNX Runtime would
otherwise move those nodes to the CPU without a word; `auto` skips that provider with a note.

TensorRT settings for the vision graph (export it with `--batch 1`: no symbolic dimension, so
TensorRT builds one engine for one shape, with no optimisation profiles and no rebuilds):
    trt_engine_cache_enable + trt_engine_cache_path   engines in <bundle>.trt-cache/ (minutes
                                                      to build once, seconds to load after)
    trt_timing_cache_enable + trt_timing_cache_path   layer timings reused across rebuilds
    trt_fp16_enable   on for fp16 / q4f16 bundles (and with --fp16). TensorRT may then pick fp16
                      kernels for any layer, the leverage products included, which the fp16
                      ONNX graph keeps in float32: check kept_indices against --provider cpu
                      (runtime.run --json) once per model before trusting the engine.
`auto` and `tensorrt` both use these settings; a dynamic-batch graph also runs, with TensorRT
building an engine per new batch size.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from runtime import contract as C

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


_INT8_DYNAMIC = (
    "dynamic int8 quantisation (DynamicQuantizeLinear, MatMulInteger on uint8 activations) has "
    "CPU kernels only in onnxruntime"
)
# (provider, graph dtype) -> why that provider cannot run such a graph. From the kernels that
# onnxruntime-gpu 1.31's CUDA provider library registers: MatMulInteger for int8 x int8 only,
# no DynamicQuantizeLinear; MatMulNBits and GatherBlockQuantized (q4, q4f16) and fp16 are there.
UNSUPPORTED_DTYPES: dict[tuple[str, str], str] = {
    (CUDA, C.DTYPE_INT8): _INT8_DYNAMIC,
    (TRT, C.DTYPE_INT8): _INT8_DYNAMIC + " (TensorRT int8 needs calibrated QDQ graphs)",
}
GPU_DTYPES = (C.DTYPE_FP16, C.DTYPE_Q4, C.DTYPE_Q4F16)


def graph_dtype(manifest: dict, graph: str) -> str:
    """The format of one graph file of a bundle (bundles from before variants existed: fp32)."""
    return manifest.get(C.KEY_GRAPHS, {}).get(graph, {}).get(C.G_DTYPE, C.DTYPE_FP32)


@dataclass(frozen=True)
class SessionConfig:
    """How sessions are made: provider choice, threads (0 = ORT default), optimisation level."""

    provider: str = "auto"
    threads: int = 0
    opt_level: str = "all"
    trt_fp16: bool = False
    # TensorRT's vision engine in fp32 even for fp16 bundles: set by the self-test when fp16
    # kernels changed the pruning (runtime/selftest.py)
    vision_fp32: bool = False
    # MLAS copies MatMul weights into packed panels (faster; 1x the weights more memory). The
    # export's self-test reference run turns it off to stay within one copy of the weights.
    prepack: bool = True


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
        # fp16 and fp32 engines of one graph side by side (the self-test may switch precision)
        "trt_engine_cache_prefix": "fp16" if fp16 else "fp32",
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


def _candidates(cfg: SessionConfig, graph: str) -> list[str]:
    """GPU providers to try for a graph role, best first (CPU, always last, is implied)."""
    if cfg.provider == "cpu":
        return []
    # TensorRT suits the static-shape vision graph; a growing KV cache suits CUDA better.
    return [TRT, CUDA] if graph == "vision" and cfg.provider in ("auto", "tensorrt") else [CUDA]


_DTYPE_FIX = (
    f"; pass --provider cpu, or export a GPU variant (make export DTYPE={'|'.join(GPU_DTYPES)})"
)


def _unsupported(provider: str, dtype: str, name: str) -> str | None:
    reason = UNSUPPORTED_DTYPES.get((provider, dtype))
    return None if reason is None else f"{name} is {dtype}: {reason}, so {provider} cannot run it"


# The graphs of a bundle and the role that picks their providers.
GRAPH_ROLES = ((C.VISION_ONNX, "vision"), (C.EMBED_ONNX, "text"), (C.DECODER_ONNX, "text"))


def bundle_providers(cfg: SessionConfig, bundle: Path, manifest: dict) -> dict[str, list]:
    """Provider chains of every graph of a bundle, all worked out before any session exists, so
    a graph format the chosen provider cannot run fails fast (the decoder, holding the int8
    MatMuls, is checked first)."""
    return {
        graph: wanted_providers(cfg, role, bundle, graph_dtype(manifest, graph), graph)
        for graph, role in reversed(GRAPH_ROLES)
    }


def wanted_providers(
    cfg: SessionConfig, graph: str, bundle: Path, dtype: str = C.DTYPE_FP32, name: str = ""
) -> list:
    """Provider list for one graph ("vision" or "text") holding `dtype` weights, best first,
    CPU always last. `name` (the graph file) is for messages."""
    if cfg.provider not in PROVIDER_CHOICES:
        raise ProviderError(
            f"unknown provider {cfg.provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}"
        )
    chain: list = []
    for provider in _candidates(cfg, graph):
        message = _unsupported(provider, dtype, name or graph)
        if message is not None:
            if cfg.provider != "auto":
                raise ProviderError(message + _DTYPE_FIX)
            if f"{provider}:{dtype}" not in _NOTED:
                _NOTED.add(f"{provider}:{dtype}")
                print(f"note: {message}; using the next provider", file=sys.stderr)
            continue
        reason = unusable_reason(provider)
        if reason is None:
            fp16 = cfg.trt_fp16 or dtype in (C.DTYPE_FP16, C.DTYPE_Q4F16)
            fp16 = fp16 and not (graph == "vision" and cfg.vision_fp32)
            chain.append((TRT, _trt_options(bundle, fp16)) if provider == TRT else CUDA)
        elif cfg.provider == "auto":
            if provider not in _NOTED:
                _NOTED.add(provider)
                print(f"note: {reason}; using the next provider", file=sys.stderr)
        elif provider == CUDA or cfg.provider == "tensorrt":
            raise ProviderError(f"{reason}; pass --provider cpu or --provider auto")
    return [*chain, CPU]


def open_session(path: Path, cfg: SessionConfig, wanted: list) -> ort.InferenceSession:
    """Create a session on the `wanted` providers (wanted_providers) and check it really got
    the accelerator that was asked for."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = OPT_LEVELS[cfg.opt_level]
    opts.intra_op_num_threads = cfg.threads
    if not cfg.prepack:
        opts.add_session_config_entry(C.ORT_DISABLE_PREPACKING, "1")
    opts.log_severity_level = 3  # ORT's own fallback warnings are replaced by ours below
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    first = wanted[0][0] if isinstance(wanted[0], tuple) else wanted[0]
    got = sess.get_providers()[0]
    if first == TRT and got == CUDA:  # ORT retries a failed TensorRT build on CUDA by itself
        message = f"{TRT} could not build an engine for {path.name}"
        if cfg.provider == "tensorrt":
            raise ProviderError(f"{message}; pass --provider cuda or --provider auto")
        if f"{TRT}:{path.name}" not in _NOTED:
            _NOTED.add(f"{TRT}:{path.name}")
            print(f"note: {message}; running it on CUDA", file=sys.stderr)
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
