"""`make profile`: runtime.profile across K, with transformers' PyTorch generate side by side.

checkpoint (tiny / PRESET=medium / MODEL=dir) + KS ("576 64 32 16"; N = no pruning)
  ─► build/<name>-k<K> for each K, exported first when missing (K = N: --method none)
  ─► runtime.profile per bundle, each repetition followed by the same answer in PyTorch eager
     fp32 (K = N: plain generate(pixel_values); K < N: PrunedVision features through
     generate(inputs_embeds)), so drift on a shared machine hits both alike
  ─► latency.{json,csv,png} with torch_* figures, ratio table, targets (ORT >= 1.5x torch)

python -m bench.profile --k 576 64 32 16 [--preset medium | -m CKPT] [--reps 5] [--no-torch]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor

from bench.report import environment as bench_environment
from export import load
from runtime import contract as C
from runtime import profile as rp
from runtime import profile_report as report
from runtime.bundle import BundleError
from runtime.generate import Pipeline
from runtime.preprocess import load_image
from runtime.session import PROVIDER_CHOICES

REPO = Path(__file__).resolve().parents[1]
SPEEDUP_TARGET = 1.5


class FirstToken(LogitsProcessor):
    """Records when generate first asks for a pick: right after the prefill forward pass."""

    def __init__(self) -> None:
        self.t: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.t is None:
            self.t = time.perf_counter()
        return scores


def checkpoint(args: argparse.Namespace) -> tuple[Path, str]:
    """(checkpoint folder, bundle name prefix): MODEL, PRESET=medium or the tiny default."""
    src = load.checkpoint(args.model, args.preset)
    default = "medium" if args.preset == "medium" and not args.model else src.name
    return src, args.name or default


def ensure_bundle(src: Path, k: int, n: int, out: Path) -> Path:
    """The bundle for K at `out`, exported in a child process when missing (frees its memory)."""
    manifest = out / C.MANIFEST_FILE
    if manifest.is_file():
        source = json.loads(manifest.read_text())[C.KEY_MODEL]["source"]
        if Path(source).resolve() != src.resolve():
            raise BundleError(
                f"{out} was exported from {source}, not {src}; pass --name to pick "
                "another bundle prefix, or remove that folder"
            )
        return out
    cmd = [sys.executable, "-m", "export", "--k", str(k), "-o", str(out), "-m", str(src)]
    if k == n:
        cmd += ["--method", "none"]
    print(f"exporting missing bundle: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)  # stdout: tables only
    return out


def torch_side(src: Path, image: Path, new: int) -> rp.Side:
    """The PyTorch side: one model loaded once, a PrunedVision module per pruned bundle."""
    from export.load import load_image_processor, load_llava
    from export.manifest import prune_config
    from svdprune_onnx.vision import PrunedVision

    model = load_llava(src)
    processor = load_image_processor(src)

    def prepare(pipe: Pipeline, ids: list[int]):
        p = pipe.m[C.KEY_PRUNING]
        module = None
        if p[C.P_K] < p[C.P_N]:
            cfg = prune_config(p)
            module = PrunedVision(model, cfg).eval()
        idt = torch.tensor([ids])
        mask = torch.ones_like(idt)
        gen = {"attention_mask": mask, "do_sample": False, "max_new_tokens": new,
               "min_new_tokens": new}  # fmt: skip

        def rep() -> dict[str, float]:
            first = FirstToken()
            t0 = time.perf_counter()
            px = processor(images=load_image(image), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                if module is None:  # unpruned: transformers' own LLaVA path
                    model.generate(input_ids=idt, pixel_values=px, logits_processor=[first], **gen)
                else:
                    feats, _ = module(px)  # (1, K, D)
                    embeds = model.get_input_embeddings()(idt)
                    embeds[idt == model.config.image_token_index] = feats.reshape(
                        -1, feats.shape[-1]
                    )
                    model.generate(inputs_embeds=embeds, logits_processor=[first], **gen)
            t1 = time.perf_counter()
            return {
                "torch_ttft_ms": (first.t - t0) * 1e3,
                "torch_decode_tokens_per_s": (new - 1) / (t1 - first.t),
                "torch_e2e_ms": (t1 - t0) * 1e3,
            }

        return rep

    return prepare


def pair(r: dict, key: str) -> str:
    """'ORT / torch' for one figure of a row."""
    return f"{report.fmt(r[key])} / {report.fmt(r['torch_' + key])}"


def ratios(rows: list[dict]) -> tuple[str, list[dict]]:
    """ORT vs PyTorch per K, pruned vs unpruned for both, and the speed-up target."""
    full = next((r for r in rows if r["k"] == r["n"]), None)
    head = ["K", "method", "TTFT ORT / torch ms", "decode tok/s ORT / torch",
            "e2e ORT / torch ms", "speed-up e2e", "speed-up TTFT",
            "TTFT(K)/TTFT(N) ORT / torch"]  # fmt: skip
    body, goals = [], []
    for r in rows:
        r["speedup_e2e"] = r["torch_e2e_ms"] / r["e2e_ms"]
        r["speedup_ttft"] = r["torch_ttft_ms"] / r["ttft_ms"]
        vs_full = "-"
        if full is not None:
            vs_full = (f"{r['ttft_ms'] / full['ttft_ms']:.2f} / "
                       f"{r['torch_ttft_ms'] / full['torch_ttft_ms']:.2f}")  # fmt: skip
        body.append([r["k"], r["method"], pair(r, "ttft_ms"), pair(r, "decode_tokens_per_s"),
                     pair(r, "e2e_ms"), f"{r['speedup_e2e']:.2f}x", f"{r['speedup_ttft']:.2f}x",
                     vs_full])  # fmt: skip
        where = "CPU" if r["provider_text"] == "CPUExecutionProvider" else r["provider_text"]
        goals.append({
            "target": f"ORT end to end >= 1.5x PyTorch eager on CPU (K={r['k']}, ORT on {where})",
            "value": f"{r['speedup_e2e']:.2f}x ({r['e2e_ms']:.1f} vs {r['torch_e2e_ms']:.1f} ms)",
            "pass": r["speedup_e2e"] >= SPEEDUP_TARGET if where == "CPU" else None,
        })  # fmt: skip
    return report.md_table(head, body), goals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--k", nargs="+", default=["N", "64", "32", "16"],
                    help="K values; N (or the token count) = no pruning")  # fmt: skip
    ap.add_argument("-m", "--model", type=Path, help="local LLaVA checkpoint (default: tiny)")
    ap.add_argument("--preset", choices=("tiny", "medium"), default="tiny")
    ap.add_argument("--name", help="bundle prefix: build/<name>-k<K> (default: checkpoint name, "
                    "'medium' for --preset medium)")  # fmt: skip
    ap.add_argument("--bundles-dir", type=Path, default=REPO / "build")
    ap.add_argument("-i", "--image", type=Path, default=rp.DEFAULT_IMAGE)
    ap.add_argument("-p", "--prompt", default=rp.DEFAULT_PROMPT)
    ap.add_argument("-o", "--out", type=Path, default=REPO / "build" / "profile")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per run (eos ignored)")
    ap.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--trace", action="store_true", help="keep ORT Chrome traces in OUT/trace/")
    ap.add_argument("--timings", action="store_true", help="print every repetition")
    ap.add_argument("--no-torch", action="store_true", help="ONNX Runtime only")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (0: torch's default, one per core; OpenMP "
                    "suffers badly on a busy machine, where 1 may be fairer)")  # fmt: skip
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except rp.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    """Export what is missing, profile every K (with PyTorch alongside), write and print."""
    src, name = checkpoint(args)
    n = load.token_count(src)
    ks = sorted({n if k.upper() == "N" else int(k) for k in args.k}, reverse=True)
    bundles = [ensure_bundle(src, k, n, args.bundles_dir / f"{name}-k{k}") for k in ks]
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    side = None if args.no_torch else torch_side(src, args.image, args.new)
    rows, env, settings = rp.run_profile(bundles, rp.options(args), side)
    env["torch"] = None if args.no_torch else bench_environment()["torch"]
    env["torch_threads"] = None if args.no_torch else torch.get_num_threads()
    settings["checkpoint"] = str(src)
    tables, goals = [], []
    if not args.no_torch:
        table, goals = ratios(rows)
        tables.append(table)
    report.write_all(rows, env, settings, args.out, goals, tables)


if __name__ == "__main__":
    sys.exit(main())
