"""`python -m bench.variants`: sizes, quality against fp32 and CPU latency of each bundle variant.

fp32 bundle ──────────────┐   (tiny default; --bundles/tiny-llava-k16[-<dtype>])
fp16 / int8 / q4 / q4f16 ─┤
  ├─ sizes per graph (manifest `graphs`)
  ├─ vision: kept-index agreement with fp32 on every photo (../shared/data/images + COCO-128)
  ├─ decoder, teacher-forced: fp32 answers greedily; each variant re-reads prompt + that
  │  answer in one pass -> logits rel. error and top-1 agreement per answer position
  └─ CPU latency per graph (median of --reps): vision, embed, prefill, one decode step
─► Markdown table on stdout, build/bench/variants.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.report import environment, md_table
from export import dtypes as D
from runtime import contract as C
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import preprocess_batch
from runtime.session import SessionConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PROMPT = "Describe the image in detail."


def photos() -> list[Path]:
    """The 3 shared photos, then the 128 of COCO-128."""
    exts = {".jpg", ".png"}
    ours = sorted(p for p in (SHARED / "images").iterdir() if p.suffix in exts)
    coco = SHARED / "coco128" / "images" / "train"
    return ours + (sorted(p for p in coco.iterdir() if p.suffix in exts) if coco.is_dir() else [])


def ensure_bundle(k: int, dtype: str, out: Path) -> Path:
    """The tiny default bundle of that dtype, exported (python -m export) when missing."""
    if not (out / C.MANIFEST_FILE).is_file():
        from export.__main__ import cli

        if cli(["--k", str(k), "--dtype", dtype, "-o", str(out)]) != 0:
            raise SystemExit(f"export of {out} failed")
    return out


def teacher_forced(pipe: Pipeline, pixels: np.ndarray, prompt: list[int], answer: list[int]):
    """(T, V) logits predicting each answer token: the prompt, then the answer fed one token at
    a time through the KV cache (the decoder emits the last position's logits only)."""
    from runtime.generator import Generator

    feats, kept = pipe.vision.run(None, {C.PIXEL_VALUES: pixels})
    gen = Generator(pipe, Sampling(max_new_tokens=1))
    gen.append_tokens([prompt], image=(feats, kept))
    rows = [gen.logits[0]]
    for token in answer[:-1]:  # row i predicts answer[i]
        gen.append_tokens([[token]])
        rows.append(gen.logits[0])
    return np.stack(rows)


def _empty_past(pipe: Pipeline, batch: int) -> dict[str, np.ndarray]:
    t = pipe.text
    empty = np.zeros((batch, t[C.T_KV_HEADS], 0, t[C.T_HEAD_DIM]), np.float32)
    return {n: empty for i in range(t[C.T_LAYERS]) for n in C.past_names(i)}


def latency(pipe: Pipeline, pixels: np.ndarray, prompt: list[int], reps: int) -> dict:
    """Median ms per graph call: vision (batch 1), embed (prompt), prefill, one decode step."""
    ids = np.array([prompt], np.int64)
    (embeds,) = pipe.embed.run(None, {C.INPUT_IDS: ids})
    S = ids.shape[1]
    prefill = _empty_past(pipe, 1) | {
        C.INPUTS_EMBEDS: embeds,
        C.ATTENTION_MASK: np.ones_like(ids),
        C.POSITION_IDS: np.arange(S)[None],
    }
    out_names = [o.name for o in pipe.decoder.get_outputs()]
    present = dict(zip(out_names, pipe.decoder.run(out_names, prefill), strict=True))
    step = {C.INPUTS_EMBEDS: embeds[:, -1:], C.ATTENTION_MASK: np.ones((1, S + 1), np.int64)}
    step[C.POSITION_IDS] = np.array([[S]])
    for i in range(pipe.text[C.T_LAYERS]):
        for past, pres in zip(C.past_names(i), C.present_names(i), strict=True):
            step[past] = present[pres]
    calls = {
        "vision": lambda: pipe.vision.run(None, {C.PIXEL_VALUES: pixels}),
        "embed": lambda: pipe.embed.run(None, {C.INPUT_IDS: ids}),
        "prefill": lambda: pipe.decoder.run(None, prefill),
        "decode_step": lambda: pipe.decoder.run(None, step),
    }
    out = {}
    for name, call in calls.items():
        call()  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1e3)
        out[name] = float(np.median(times))
    return out


def measure(bundles: dict[str, Path], args: argparse.Namespace) -> dict:
    ref = Pipeline(bundles[C.DTYPE_FP32], SessionConfig("cpu"))
    paths = photos()[: args.photos or None]
    pixels = [preprocess_batch([p], ref.m[C.KEY_VISION]) for p in paths]  # each (1,3,H,W)
    ref_idx = [ref.vision.run(None, {C.PIXEL_VALUES: x})[1] for x in pixels]
    prompt = ref.prompt_ids(PROMPT)
    answers, ref_logits = [], []
    for x in pixels[: args.tf_photos]:  # fp32 answers greedily, then reads them back
        (r,) = ref.generate(x, [prompt], Sampling(max_new_tokens=args.new_tokens))
        answers.append(r.token_ids)
        ref_logits.append(teacher_forced(ref, x, prompt, r.token_ids))
    results = {}
    for dtype, bundle in bundles.items():
        pipe = ref if dtype == C.DTYPE_FP32 else Pipeline(bundle, SessionConfig("cpu"))
        row: dict = {"bundle": str(bundle), "bytes": {}}
        for graph in C.GRAPH_FILES:
            row["bytes"][graph] = D.graph_bytes(bundle / graph)
        overlaps = np.concatenate(
            [
                D.kept_overlap(pipe.vision.run(None, {C.PIXEL_VALUES: x})[1], ri)
                for x, ri in zip(pixels, ref_idx, strict=True)
            ]
        )
        row["kept_overlap"] = {
            "mean": float(overlaps.mean()),
            "min": float(overlaps.min()),
            "identical_share": float((overlaps == 1).mean()),
            "photos": len(overlaps),
        }
        errs, agree = [], []
        for x, ans, want in zip(pixels, answers, ref_logits, strict=False):
            got = teacher_forced(pipe, x, prompt, ans)
            errs.append(D.rel_err(got, want))
            agree.extend((got.argmax(-1) == np.array(ans)).tolist())
        row["logits_rel_err"] = {"mean": float(np.mean(errs)), "max": float(np.max(errs))}
        row["teacher_forced_top1"] = float(np.mean(agree))
        row["latency_ms"] = latency(pipe, pixels[0], prompt, args.reps)
        results[dtype] = row
        print(f"  {dtype}: done", flush=True)
    return {
        "photos": len(paths),
        "teacher_forced_photos": len(answers),
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompt),
        "variants": results,
    }


def table(report: dict) -> str:
    mib = 2**20
    body = []
    for dtype, r in report["variants"].items():
        b, lat = r["bytes"], r["latency_ms"]
        body.append(
            [
                dtype,
                *(f"{b[g] / mib:.2f}" for g in C.GRAPH_FILES),
                f"{sum(b.values()) / mib:.2f}",
                f"{r['kept_overlap']['mean']:.3f} / {r['kept_overlap']['min']:.3f}",
                f"{r['logits_rel_err']['mean']:.2e}",
                f"{r['teacher_forced_top1']:.3f}",
                *(f"{lat[k]:.2f}" for k in ("vision", "embed", "prefill", "decode_step")),
            ]
        )
    head = ["variant", "vision MiB", "embed MiB", "decoder MiB", "total MiB",
            "kept-index agreement mean / min", "logits rel. err", "teacher-forced top-1",
            "vision ms", "embed ms", "prefill ms", "decode step ms"]  # fmt: skip
    return md_table(head, body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.variants", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=list(C.DTYPES[1:]), choices=C.DTYPES[1:])
    ap.add_argument("--photos", type=int, default=0, help="photos for kept indices (0: all)")
    ap.add_argument("--tf-photos", type=int, default=16, help="photos for teacher forcing")
    ap.add_argument("--new-tokens", type=int, default=16, help="fp32 answer length")
    ap.add_argument("--reps", type=int, default=20, help="latency repetitions (median)")
    ap.add_argument(
        "--bundles",
        type=Path,
        default=REPO / "build" / "bench" / "variant-bundles",
        help="folder of the tiny fp32 + variant bundles (exported there when missing)",
    )
    ap.add_argument("-o", "--out", type=Path, default=REPO / "build" / "bench" / "variants.json")
    args = ap.parse_args(argv)
    base = args.bundles / f"tiny-llava-k{args.k}"
    bundles = {C.DTYPE_FP32: ensure_bundle(args.k, C.DTYPE_FP32, base)}
    for dtype in args.dtypes:
        bundles[dtype] = ensure_bundle(args.k, dtype, base.with_name(f"{base.name}-{dtype}"))
    pruning = {
        d: json.loads((b / C.MANIFEST_FILE).read_text())[C.KEY_PRUNING] for d, b in bundles.items()
    }
    if len({json.dumps(p, sort_keys=True) for p in pruning.values()}) != 1:
        raise SystemExit(f"the bundles prune differently ({pruning}); remove them to re-export")
    report = measure(bundles, args) | {"environment": environment()}
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
