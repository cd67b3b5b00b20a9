"""The runtime (ONNX Runtime) against transformers' PyTorch generate, side by side in one run.

For each bundle (one model, several K): TTFT (preprocess + vision + prefill), decode tokens/s and
end-to-end time for NEW tokens, median of R runs after a warm-up, on the same photo and prompt;
PyTorch eager fp32 gets the same pruned features (PrunedVision) and the same K image tokens.

    python -m bench.runtime_vs_torch -b build/tiny-llava-k576 -b build/tiny-llava-k16 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import md_table
from export.load import load_llava
from export.manifest import prune_config
from runtime import contract as C
from runtime.generate import TTFT_STAGES, Pipeline, Sampling
from runtime.preprocess import load_image, preprocess_batch
from svdprune_onnx.vision import PrunedVision

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "images" / "coco_cats.png"


def ort_once(pipe: Pipeline, pixels: np.ndarray, ids: list[int], new: int) -> dict:
    t0 = time.perf_counter()
    (r,) = pipe.generate(pixels, [ids], Sampling(max_new_tokens=new))
    total = (time.perf_counter() - t0) * 1e3
    t = r.timings_ms
    steps = len(r.token_ids) - 1
    return {
        "ttft_ms": sum(t[k] for k in TTFT_STAGES),
        "decode_tps": steps / (t["decode"] / 1e3),
        "host_overhead_pct": 100 * (t["decode"] - t["decode_in_graph"]) / t["decode"],
        "e2e_ms": total,
    }


def torch_once(model, module, pixels: np.ndarray, ids: list[int], new: int) -> dict:
    """TTFT = vision + generate(1 token); e2e = vision + generate(new); decode = the difference."""
    x, idt = torch.from_numpy(pixels), torch.tensor([ids])

    def answer(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            feats, _ = module(x)
            embeds = model.get_input_embeddings()(idt)
            embeds[idt == model.config.image_token_index] = feats.reshape(-1, feats.shape[-1])
            model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(idt),
                           do_sample=False, max_new_tokens=n, min_new_tokens=n)  # fmt: skip
        return (time.perf_counter() - t0) * 1e3

    ttft, e2e = answer(1), answer(new)
    return {"ttft_ms": ttft, "decode_tps": (new - 1) / ((e2e - ttft) / 1e3), "e2e_ms": e2e}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-b", "--bundle", type=Path, action="append", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per run")
    ap.add_argument(
        "-o", "--out", type=Path, default=REPO / "build" / "bench" / "runtime_vs_torch.json"
    )
    args = ap.parse_args()
    rows = []
    for bundle in args.bundle:
        pipe = Pipeline(bundle)
        pipe.text[C.T_EOS] = []  # time exactly --new tokens even if the random model says eos
        m = pipe.m
        pixels = preprocess_batch([load_image(PHOTO)], m[C.KEY_VISION])
        ids = pipe.prompt_ids("What is in the image? Describe it in detail.")
        model = load_llava(Path(m[C.KEY_MODEL]["source"]))
        p = m[C.KEY_PRUNING]
        cfg = prune_config(p)
        module = PrunedVision(model, cfg).eval()
        ort_once(pipe, pixels, ids, 4)  # warm-up both
        torch_once(model, module, pixels, ids, 4)
        o, t = [], []
        for _ in range(args.reps):  # interleaved so drift hits both
            o.append(ort_once(pipe, pixels, ids, args.new))
            t.append(torch_once(model, module, pixels, ids, args.new))
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        row = {"bundle": bundle.name, "k": p[C.P_K], "prompt_tokens": len(ids)}
        for key in ("ttft_ms", "decode_tps", "e2e_ms"):
            row[f"ort_{key}"], row[f"torch_{key}"] = med(o, key), med(t, key)
        row["host_overhead_pct"] = med(o, "host_overhead_pct")
        row["speedup_e2e"] = row["torch_e2e_ms"] / row["ort_e2e_ms"]
        row["speedup_ttft"] = row["torch_ttft_ms"] / row["ort_ttft_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rows": rows, "new_tokens": args.new, "reps": args.reps}, indent=1)
    )
    keys = [
        "bundle", "k", "prompt_tokens", "ort_ttft_ms", "torch_ttft_ms", "ort_decode_tps",
        "torch_decode_tps", "ort_e2e_ms", "torch_e2e_ms", "speedup_e2e", "host_overhead_pct",
    ]  # fmt: skip
    print(
        md_table(
            keys, [[f"{r[k]:.3g}" if isinstance(r[k], float) else r[k] for k in keys] for r in rows]
        )
    )


if __name__ == "__main__":
    main()
