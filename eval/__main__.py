"""`python -m eval` / `make eval`: every pruning method and K against the unpruned model.

questions (POPE from coco128, or --data FILE.jsonl) ─► first --limit images
─► bundles: none@N + method@K[@positions] (exported when missing) ─► run.Runner (resumable cache)
─► report: results.json / .csv / .md / .png, images.json, the table on stdout

Families: LLaVA (default) and Qwen2.5-VL (--family qwen2.5-vl, or read from -m's config.json).
A Qwen2.5-VL run evaluates every pruned (method, K) once per --positions mode (default: both
compact and original, to measure which is closer to the unpruned model, whose own M-RoPE
positions are original); LLaVA keeps the export's default mode unless --positions is given.
Qwen2.5-VL has no PyTorch side here (eval/torch_side.py is LLaVA's): no exact method, and the
leverage-mass / IPR statistics are reported as n/a.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from eval import answers as A
from eval.bundles import REPO
from runtime import contract as C

DEFAULT_METHODS = ("gram", "power", "exact", "random", "uniform", "norm", "cls_attn")
# Qwen2.5-VL: every method its vision graph exports (no CLS token: no cls_attn; exact needs a
# PyTorch side eval does not have for it).
QWEN_METHODS = ("gram", "power", "purify", "random", "uniform", "norm")
FAMILIES = {"llava": C.FAMILY_LLAVA, "qwen2.5-vl": C.FAMILY_QWEN25VL}  # as `python -m export`
COCO = REPO.parent / "shared" / "data" / "coco128"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from runtime.session import PROVIDER_CHOICES

    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="local LLaVA or Qwen2.5-VL checkpoint "
                    "(default: the built-in tiny one of --family)")  # fmt: skip
    ap.add_argument("--family", choices=tuple(FAMILIES), help="model family when no -m: llava "
                    "(default) or qwen2.5-vl; with -m it is read from config.json")  # fmt: skip
    ap.add_argument("--preset", choices=("tiny", "medium"), default="tiny",
                    help="built-in random-weight checkpoint when no -m")  # fmt: skip
    ap.add_argument("--k", "--ks", dest="ks", nargs="+", default=["16", "32", "64"],
                    help="K values to test; N (= no pruning) is accepted and always runs as the "
                    "reference")  # fmt: skip
    ap.add_argument("--methods", nargs="+",
                    help=f"pruning methods (default: {' '.join(DEFAULT_METHODS)}; Qwen2.5-VL: "
                    f"{' '.join(QWEN_METHODS)}); the unpruned model always runs as the "
                    "reference")  # fmt: skip
    ap.add_argument("--positions", nargs="+", choices=C.POSITIONS_CHOICES,
                    help="position ids of the kept image tokens: each pruned (method, K) is "
                    "exported and evaluated once per mode given (default: both for "
                    "Qwen2.5-VL; the export's default for LLaVA)")  # fmt: skip
    ap.add_argument("--limit", type=int, help="use the questions of the first N images only")
    ap.add_argument("--data", type=Path, help="a JSONL of {image, question, answer} to use "
                    "instead of POPE questions (image paths relative to the file)")  # fmt: skip
    ap.add_argument("--coco", type=Path, default=COCO, help="coco128-style folder for POPE")
    ap.add_argument("--per-image", type=int, default=3,
                    help="POPE: positives per image (as many negatives per setting)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="POPE question sampling seed")
    ap.add_argument("--answer", choices=A.ANSWER_MODES, default=A.LOGITS,
                    help="logits: yes/no from first-token logits; text: parse greedy text "
                    "(see eval/answers.py)")  # fmt: skip
    ap.add_argument("--max-new-tokens", type=int, default=8, help="--answer text only")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "build" / "eval")
    ap.add_argument("--bundles", type=Path, help="bundle folder (default OUT/bundles)")
    ap.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = default)")
    ap.add_argument("--torch-device", default="cpu", help="device of the PyTorch side (exact "
                    "pruning, spectra), e.g. cuda")  # fmt: skip
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap.parse_args(argv)


def load_questions(args: argparse.Namespace):
    from eval.pope import build_pope, limit_images, load_jsonl, save_jsonl

    if args.data is not None:
        questions, source = load_jsonl(args.data), str(args.data)
    else:
        questions = build_pope(args.coco, args.per_image, args.seed)
        path = args.out / f"questions_pope_seed{args.seed}_per{args.per_image}.jsonl"
        save_jsonl(questions, path)  # all images: --limit takes a prefix of this file
        source = str(path)
    return limit_images(questions, args.limit), source


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns {"rows", "images", "spearman", "paths"}."""
    from eval import bundles as B
    from eval.cache import Cache
    from eval.errors import EvalArgError
    from eval.report import markdown, positions_summary, positions_text, summarize, write_all
    from eval.run import Options, Runner, by_image, make_job, pending, progress_bar
    from eval.torch_side import TorchSide
    from export import load
    from runtime.session import SessionConfig

    t0 = time.perf_counter()
    family = load.family_of(args.model, FAMILIES.get(args.family))
    qwen = family == C.FAMILY_QWEN25VL
    methods = family_methods(args.methods, qwen)
    modes = positions_modes(args.positions, qwen)
    src = load.checkpoint(args.model, args.preset, family)
    n = qwen_token_cap() if qwen else load.token_count(src)
    # Same spelling as `make profile`: "N" (or N itself) is the unpruned reference, run anyway.
    if bad := [k for k in args.ks if k.upper() != "N" and not k.isdigit()]:
        raise EvalArgError(f"--k takes integers or N, got {bad}")
    ks = [int(k) for k in args.ks if k.upper() != "N" and int(k) != n]
    bad = [k for k in ks if not 1 <= k < n]
    if bad:
        # Qwen2.5-VL's N is each image's own (an image under K tokens is upscaled to K); n is
        # the dynamic graph's cap.
        raise EvalArgError(f"--k {bad} out of range: K must be in 1..{n - 1} (N = {n})")
    args.ks = ks
    questions, source = load_questions(args)
    A.check_labels({q.answer for q in questions}, args.answer)
    groups = by_image(questions)
    print(f"{len(questions)} questions ({sum(map(len, groups.values()))} distinct) on "
          f"{len(groups)} images from {source}", file=sys.stderr)  # fmt: skip

    root = args.bundles or args.out / "bundles"
    export = B.export_args(args.model, args.preset, "qwen2.5-vl" if qwen else None)
    opts = Options(args.answer, args.max_new_tokens, session=SessionConfig(args.provider,
                   args.threads))  # fmt: skip
    tagged = modes != [None]
    # The reference is the unpruned model itself: for Qwen2.5-VL its own M-RoPE positions
    # (original; compact would renumber the whole image as text); LLaVA's modes agree at N.
    ref_mode = C.POSITIONS_ORIGINAL if qwen else None
    ref = B.ensure_bundle(root, src, export, B.NONE, n, positions=ref_mode)
    jobs = [make_job(B.NONE, ref, src, opts, tagged)]
    for k in sorted(set(args.ks)):
        for m in methods:
            siblings: list[Path] = []  # the same graphs in another positions mode
            for mode in modes:
                host = B.host_method(m)
                bundle = B.ensure_bundle(root, src, export, host, k, ref, mode, tuple(siblings))
                siblings.append(bundle)
                jobs.append(make_job(m, bundle, src, opts, tagged))

    cache = Cache(args.out / "cache")
    torch_side = None if qwen else TorchSide(src, args.torch_device)
    runner = Runner(src, cache, torch_side, opts)
    todo = sum(pending(j, groups, cache) for j in jobs)
    total = len(jobs) * sum(map(len, groups.values()))
    print(f"{len(jobs)} configurations: {todo} answers to compute, {total - todo} cached",
          file=sys.stderr)  # fmt: skip
    try:
        with progress_bar(todo, not args.no_progress) as bar:
            for job in jobs:
                runner.run(job, groups, bar)
    finally:
        cache.close()

    rows, per_image, rho = summarize(jobs, questions, cache)
    columns = (("positions",) if tagged else ()) + (("image_tokens",) if qwen else ())
    by_mode = positions_summary(rows)
    meta = {"model": str(src), "family": family, "questions": source,
            "n_questions": len(questions), "n_images": len(groups), "answer": args.answer,
            "ks": sorted(set(args.ks)), "methods": methods,
            "positions_modes": [m for m in modes if m is not None], "columns": columns,
            "positions": by_mode, "title": f"{src.name}: {len(questions)} questions on "
            f"{len(groups)} images, answers by {args.answer}"}  # fmt: skip
    paths = write_all(rows, per_image, rho, args.out, meta)
    print(markdown(rows, columns))
    if by_mode:
        print(f"\n{positions_text(by_mode)}")
    if qwen:
        print("\nleverage mass, IPR: n/a for Qwen2.5-VL (eval's PyTorch side is LLaVA's)")
    else:
        shown = "n/a (fewer than 3 images, or no variation)" if math.isnan(rho) else f"{rho:+.3f}"
        print(f"\nper-image Spearman(IPR of scored features, flip rate pooled over pruned "
              f"configs): {shown} over {len(per_image)} images")  # fmt: skip
    print(f"wrote {', '.join(str(p) for p in paths.values())} "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return {"rows": rows, "images": per_image, "spearman": rho, "paths": paths,
            "positions": by_mode}  # fmt: skip


def family_methods(given: list[str] | None, qwen: bool) -> list[str]:
    """The pruned methods to run: --methods (without none), else the family's default list."""
    from eval.bundles import EXACT, NONE
    from eval.errors import EvalArgError

    default = QWEN_METHODS if qwen else DEFAULT_METHODS
    methods = list(dict.fromkeys(m for m in (given or default) if m != NONE))
    if qwen and (bad := [m for m in methods if m not in QWEN_METHODS]):
        why = " (exact runs in eval's PyTorch side, which is LLaVA's)" if EXACT in bad else ""
        raise EvalArgError(f"--methods {' '.join(bad)} not available for Qwen2.5-VL{why}; "
                           f"choose from {' '.join(QWEN_METHODS)}")  # fmt: skip
    return methods


def positions_modes(given: list[str] | None, qwen: bool) -> list[str | None]:
    """The positions modes each pruned (method, K) runs in: --positions, else both for
    Qwen2.5-VL and [None] (the export's default, bundles named as before) for LLaVA."""
    if given:
        return list(dict.fromkeys(given))
    return [C.POSITIONS_ORIGINAL, C.POSITIONS_COMPACT] if qwen else [None]


def qwen_token_cap() -> int:
    """N of a dynamic Qwen2.5-VL bundle's manifest: the graph's token cap (each image has its
    own N below it)."""
    from svdprune_onnx.qwen_vision import N_MAX

    return N_MAX


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from eval.errors import USER_ERRORS

    try:
        main(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished answers are kept in {args.out / 'cache'}; run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
