"""`python -m bench.memory_budget`: weights + KV cache per bundle variant, from the model shapes.

    shapes (below) ─► parameters per graph: vision (tower up to the select layer + projector),
                      embed_tokens, decoder (layers + final norm + lm_head)
                  ─► bytes per variant (export.dtypes.PLANS: which graph gets which format)
                  ─► + KV cache for K image tokens + TEXT_TOKENS prompt + NEW_TOKENS answer
    ─► Markdown tables on stdout, build/bench/memory_budget.json

Bytes per weight: fp32 4, fp16 2, int8 1 (+ one scale per tensor), q4 = 4 bits + a float32
scale per block of 32 (0.625), q4f16 = 4 bits + an fp16 scale per block (0.5625). Only MatMul
weights and the embedding table are quantised; norms and biases keep the graph's float type.
Checked against real files: the medium preset's fp32 graphs (CLIP-L + Qwen2-0.5B shapes) are
1115.7 / 519.3 / 1885.3 MiB, this model gives 1116.3 / 519.3 / 1884.6; the "small" preset's
decoder measured 0.160 / 0.144 / 0.255 / 0.502 of fp32 for q4 / q4f16 / int8 / fp16, this model
gives 0.157 / 0.141 / 0.250 / 0.500. Not counted: activations,
ONNX Runtime's arenas and the CUDA context (budget ~1-2 GB on a Jetson).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.report import md_table
from export.dtypes import PLANS
from runtime import contract as C

TEXT_TOKENS = 64  # prompt text around the image tokens
NEW_TOKENS = 256  # answer length
GIB = 2**30
FLOAT_BYTES = {C.DTYPE_FP32: 4.0, C.DTYPE_FP16: 2.0, C.DTYPE_INT8: 4.0, C.DTYPE_Q4: 4.0,
               C.DTYPE_Q4F16: 2.0}  # fmt: skip
# Bytes per quantised weight (MatMul weights and the embedding table).
WEIGHT_BYTES = {C.DTYPE_FP32: 4.0, C.DTYPE_FP16: 2.0, C.DTYPE_INT8: 1.0, C.DTYPE_Q4: 0.5 + 4 / 32,
                C.DTYPE_Q4F16: 0.5 + 2 / 32}  # fmt: skip
# Jetson Orin modules (CPU and GPU share this memory); 2 GiB kept for the OS and CUDA context.
JETSONS = {"Orin Nano 8GB": 8, "Orin NX 16GB": 16, "AGX Orin 32GB": 32, "AGX Orin 64GB": 64}
RESERVED_GIB = 2.0


@dataclass(frozen=True)
class Tower:
    """A ViT vision tower as LLaVA uses it, plus the 2-layer MLP projector."""

    hidden: int
    intermediate: int
    layers_used: int  # up to the select layer (LLaVA-1.5: penultimate of 24 -> 23)
    patch: int
    image: int
    cls: bool
    text_hidden: int  # projector output

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2  # N image tokens (the [CLS] is dropped)

    def params(self) -> tuple[float, float]:
        """(MatMul/conv weights, other floats) of tower + projector."""
        d, f = self.hidden, self.intermediate
        matmul = self.layers_used * (4 * d * d + 2 * d * f) + 3 * self.patch**2 * d
        matmul += d * self.text_hidden + self.text_hidden**2  # projector
        other = self.layers_used * (4 * d + d + f + 4 * d)  # biases + two LayerNorms
        other += (self.tokens + self.cls) * d + 2 * d + 2 * self.text_hidden
        return matmul, other


@dataclass(frozen=True)
class Decoder:
    """A Llama/Qwen2-style decoder."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qkv_bias: bool

    def params(self) -> tuple[float, float]:
        """(MatMul weights incl. lm_head, other floats) of decoder_model_merged."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate
        other = self.layers * (2 * h + (q + 2 * kv) * self.qkv_bias) + h
        return self.layers * per_layer + self.vocab * h, other

    def kv_bytes(self, tokens: int, bytes_per: int) -> float:
        """KV cache of one sequence: 2 (K, V) x layers x kv_heads x head_dim per token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * bytes_per


@dataclass(frozen=True)
class Model:
    name: str
    tower: Tower
    decoder: Decoder


MODELS: dict[str, Model] = {
    # CLIP ViT-L/14-336 (select layer -2) + MLP projector + Vicuna-7B (Llama, MHA).
    "llava-1.5-7b": Model(
        "LLaVA-1.5-7B",
        Tower(1024, 4096, 23, 14, 336, True, 4096),
        Decoder(32, 4096, 11008, 32, 32, 128, 32064, False),
    ),
    # SigLIP-so400m/14-384 (729 tokens, last layer) + projector + Qwen2-0.5B (GQA, 2 KV heads).
    "llava-interleave-qwen-0.5b": Model(
        "llava-interleave-qwen-0.5b",
        Tower(1152, 4304, 27, 14, 384, False, 896),
        Decoder(24, 896, 4864, 14, 2, 64, 152000, True),
    ),
}


def graph_bytes(model: Model, dtype: str) -> dict[str, float]:
    """Bytes of each graph file of a bundle variant (the embedding is stored in both
    embed_tokens and, as lm_head, in the decoder, as the exported graphs hold it)."""
    plan = PLANS[dtype]
    vm, vo = model.tower.params()
    dm, do = model.decoder.params()
    embed = model.decoder.vocab * model.decoder.hidden

    def size(graph: str, matmul: float, other: float) -> float:
        g = plan[graph]
        return matmul * WEIGHT_BYTES[g] + other * FLOAT_BYTES[g]

    return {
        C.VISION_ONNX: size(C.VISION_ONNX, vm, vo),
        C.EMBED_ONNX: size(C.EMBED_ONNX, embed, 0),
        C.DECODER_ONNX: size(C.DECODER_ONNX, dm, do),
    }


def budget(model: Model) -> dict:
    """Per variant: graph bytes, and KV cache bytes at K = 16, 64 and N, fp32 and fp16."""
    ks = {"16": 16, "64": 64, f"N={model.tower.tokens}": model.tower.tokens}
    out = {}
    for dtype in C.DTYPES:
        graphs = graph_bytes(model, dtype)
        kv = {
            f"{name}/{kv_dtype}": model.decoder.kv_bytes(k + TEXT_TOKENS + NEW_TOKENS, b)
            for name, k in ks.items()
            for kv_dtype, b in (("fp32", 4), ("fp16", 2))
        }
        out[dtype] = {"graphs": graphs, "weights": sum(graphs.values()), "kv": kv}
    return out


def smallest_jetson(total_bytes: float) -> str:
    for name, gib in JETSONS.items():
        if total_bytes / GIB <= gib - RESERVED_GIB:
            return name
    return "none"


def table(model: Model, rows: dict) -> str:
    ks = ["16", "64", f"N={model.tower.tokens}"]
    head = ["variant", "vision", "embed", "decoder", "weights",
            *(f"KV K={k} fp32 / fp16" for k in ks), "weights + fp32 KV (K=16)", "fits"]  # fmt: skip
    body = []
    for dtype, r in rows.items():
        g, kv = r["graphs"], r["kv"]
        total = r["weights"] + kv["16/fp32"]
        body.append(
            [
                dtype,
                *(f"{g[x] / GIB:.2f}" for x in (C.VISION_ONNX, C.EMBED_ONNX, C.DECODER_ONNX)),
                f"{r['weights'] / GIB:.2f}",
                *(f"{kv[f'{k}/fp32'] / GIB:.3f} / {kv[f'{k}/fp16'] / GIB:.3f}" for k in ks),
                f"{total / GIB:.2f}",
                smallest_jetson(total),
            ]
        )
    return md_table(head, body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_budget")
    ap.add_argument(
        "-o", "--out", type=Path, default=Path(__file__).resolve().parents[1] / "build" / "bench"
    )
    args = ap.parse_args(argv)
    report = {
        "text_tokens": TEXT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "reserved_gib": RESERVED_GIB,
        "models": {},
    }
    for key, model in MODELS.items():
        rows = budget(model)
        report["models"][key] = {"shapes": asdict(model), "variants": rows}
        print(f"\n### {model.name}: GiB; KV for K image + {TEXT_TOKENS} text + {NEW_TOKENS} new "
              f"tokens, one sequence\n")  # fmt: skip
        print(table(model, rows))
    print(
        f"\nfits: smallest Jetson Orin whose memory minus {RESERVED_GIB:.0f} GiB (OS, CUDA "
        "context) holds weights + fp32 KV at K=16; activations, ORT arenas not counted"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_budget.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'memory_budget.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
