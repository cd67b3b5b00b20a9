"""`python -m export` / `make export K=16`: checkpoint -> validated bundle folder.

-m CHECKPOINT (default: the built-in tiny LLaVA, built if missing; Qwen2.5-VL: qwen_export.py)
  └─ PrunedVision(K, method, rank, iters, ...) ─► onnx/vision_encoder.onnx
       └─ ORT vs PyTorch on real photos, batch 1 and 3 ─► svdprune.json ─► rename into place
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from runtime import contract as C

REPO = Path(__file__).resolve().parents[1]
LEAN, FULL = "lean", "full"
EXPORT_MEMORY = (LEAN, FULL)
GATE_FAIL, GATE_WARN = "fail", "warn"
QUALITY_GATES = (GATE_FAIL, GATE_WARN)
SHARED_IMAGES = REPO.parent / "shared" / "data" / "images"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dataclasses import fields
    from types import SimpleNamespace

    from svdprune_onnx.select import METHODS, PruneConfig

    # The defaults live on the dataclass (chosen by `make bench-fidelity`); read them from there.
    d = SimpleNamespace(**{f.name: f.default for f in fields(PruneConfig) if f.name not in "kn"})
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    ap.add_argument(
        "-m", "--model", type=Path, help="local LLaVA checkpoint folder (default: tiny)"
    )
    ap.add_argument(
        "--family",
        choices=tuple(FAMILY_NAMES),
        help="model family when no -m is given: llava (default) or qwen2.5-vl (the built-in "
        "tiny/medium Qwen2.5-VL); with -m it is read from config.json",
    )
    ap.add_argument(
        "--image-size",
        type=_size,
        help="Qwen2.5-VL: fix the vision graph's resolution HxW, e.g. 448x448 (a static graph "
        "for TensorRT; images are resized to exactly it); default: each image at its own size",
    )
    ap.add_argument(
        "--score-site",
        choices=("merged", "merger_input", "patches"),
        default="merged",
        help="Qwen2.5-VL: where leverage is computed (svdprune_onnx/qwen_vision.py; default "
        "merged, chosen by measurement)",
    )
    ap.add_argument(
        "--preset",
        choices=("tiny", "realistic", "medium", "wide"),
        default="tiny",
        help="built-in random-weight checkpoint when no -m: tiny (CLIP+Llama, seconds), "
        "realistic (tiny with outlier tokens and massive activations, as real weights have) or "
        "medium (CLIP ViT-L/14-336 + Qwen2-0.5B shapes, real compute)",
    )
    ap.add_argument("--k", type=int, default=16, help="vision tokens kept per image (default 16)")
    ap.add_argument(
        "--method",
        choices=METHODS,
        help=f"default {d.method} for LLaVA; gram for Qwen2.5-VL (its N reaches thousands: "
        "svdprune_onnx/qwen_vision.py DEFAULT_METHOD)",
    )
    ap.add_argument(
        "--rank", help=f"leverage rank r, or 'k' (default {d.rank}, clamped to K when K is smaller)"
    )
    ap.add_argument(
        "--iters", type=int, default=None,
        help="iterations (purify: (N, N) products, default 24; power/gram: products with the "
        "Gram matrix, default 16)",
    )  # fmt: skip
    ap.add_argument("--oversample", type=int, default=d.oversample, help="extra columns (gram)")
    ap.add_argument("--center", choices=("on", "off"), default="on" if d.center else "off")
    ap.add_argument("--score", choices=C.SCORED_CHOICES, default=d.scored_features)
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the constant start block")
    ap.add_argument("-o", "--out", type=Path, help="bundle folder (default build/<name>-k<K>)")
    ap.add_argument("--vision-exporter", choices=("torchscript", "dynamo"), default="torchscript")
    ap.add_argument("--decoder-exporter", choices=C.DECODER_EXPORTERS, default="optimum")
    ap.add_argument(
        "--positions",
        choices=C.POSITIONS_CHOICES,
        help="position ids of kept image tokens: compact (0..S-1) or their original slots "
        "(default: compact for LLaVA, original for Qwen2.5-VL: each family's closer to the "
        "unpruned model in `make eval`)",
    )
    ap.add_argument("-i", "--image", type=Path, action="append", help="validation image(s)")
    ap.add_argument(
        "--dtype",
        choices=C.DTYPES,
        default=C.DTYPE_FP32,
        help="bundle variant: fp16, int8 (dynamic), q4 (4-bit MatMulNBits, blocks of 32) or "
        "q4f16; graph I/O stays float32 (default fp32)",
    )
    ap.add_argument(
        "--quality-gate",
        choices=QUALITY_GATES,
        default=GATE_FAIL,
        help="a --dtype variant that drifts from fp32 past its tolerance: fail (default, no "
        "bundle) or warn (write it, say so, and record the failures in the manifest)",
    )
    ap.add_argument(
        "--batch",
        type=_positive_int,
        help="fix the vision graph's batch size (static shapes for TensorRT; default dynamic)",
    )
    ap.add_argument(
        "--print-out",
        action="store_true",
        help="print the bundle folder these options write, and exit without exporting",
    )
    ap.add_argument(
        "--export-memory",
        choices=EXPORT_MEMORY,
        default=LEAN,
        help="lean (default): trace on weightless stand-ins and stream each weight from the "
        "checkpoint's safetensors, one graph's weights in memory at most; full: load the whole "
        "model first (the route for .bin checkpoints)",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return ap.parse_args(argv)


# --family values -> the manifest's model.family (the checkpoint's model_type)
FAMILY_NAMES = {"llava": C.FAMILY_LLAVA, "qwen2.5-vl": C.FAMILY_QWEN25VL}


def _size(text: str) -> tuple[int, int]:
    from export.qwen_export import parse_size

    return parse_size(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def resolve_rank(text: str | None, k: int) -> int:
    """--rank as an integer: 'k' -> K; omitted -> the default rank, clamped to K (K=4 works);
    an explicit rank above K stays an error (PruneConfig/main refuse it with the fix)."""
    from svdprune_onnx.select import PruneConfig, PruneError

    if text is None:
        return max(1, min(PruneConfig.rank, k))
    if text.lower() == "k":
        return k
    if not text.isdigit():
        raise PruneError(f"--rank takes an integer or 'k', got {text!r}")
    return int(text)


def check_rank(prune) -> None:
    """At most one leverage direction per kept token: PruneError otherwise (both families)."""
    from svdprune_onnx.leverage import LEVERAGE_METHODS
    from svdprune_onnx.select import PruneError

    if prune.method in LEVERAGE_METHODS and prune.rank > prune.k:  # r directions for K tokens
        raise PruneError(
            f"rank must be in 1..K={prune.k} (at most one direction per kept token), got "
            f"{prune.rank}; pass --rank k or a smaller --rank"
        )


def step(i: int, n: int, text: str) -> float:
    print(f"[{i}/{n}] {text}", flush=True)
    return time.perf_counter()


def bundle_path(args: argparse.Namespace, src: Path | None = None) -> Path:
    """The bundle folder an export with these options writes: --out, else
    build/<checkpoint folder name>-k<K>[-<dtype>]. The one definition: main() passes the
    checkpoint it resolved; `--print-out` (`make run`) resolves it here, building a missing
    preset (its messages go to stderr, so stdout holds the path alone)."""
    if args.out is not None:
        return args.out
    if src is None:
        import contextlib

        from export.load import checkpoint

        with contextlib.redirect_stdout(sys.stderr):
            src = checkpoint(args.model, args.preset, family(args))
    suffix = "" if args.dtype == C.DTYPE_FP32 else f"-{args.dtype}"
    return REPO / "build" / f"{src.name}-k{args.k}{suffix}"


def family(args: argparse.Namespace) -> str:
    """The manifest family this export writes (model_type): -m's, else --family's."""
    from export.load import family_of

    return family_of(args.model, FAMILY_NAMES.get(args.family))


def main(args: argparse.Namespace) -> Path:
    """Export one bundle; returns its folder. Raises typed errors on bad input."""
    from svdprune_onnx.vision import UnsupportedModelError

    if family(args) == C.FAMILY_QWEN25VL:
        from export.qwen_export import main_qwen

        return main_qwen(args)
    if args.image_size is not None:
        raise UnsupportedModelError(
            "--image-size fixes a Qwen2.5-VL graph's resolution; a LLaVA tower's is fixed "
            "already (drop --image-size)"
        )
    import torch

    from export.bundle import atomic_dir, copy_side_files, package_versions, write_manifest
    from export.genai import write_genai
    from export.load import checkpoint, load_image_processor
    from export.manifest import (
        build_manifest,
        graphs_section,
        prompt_section,
        text_facts,
        vision_section,
    )
    from export.photos import synthetic_photo, validation_batches
    from export.processor import check_runtime_pixels
    from export.text_graphs import decoder_refs
    from export.transformersjs import adapt_for_transformersjs
    from export.vision import OPSET, export_vision, validate_vision, vision_refs
    from runtime.generate import Pipeline
    from runtime.preprocess import preprocess_batch
    from runtime.selftest import reference_images, save_reference
    from runtime.session import SessionConfig
    from svdprune_onnx.leverage import EXACT
    from svdprune_onnx.select import PruneConfig, PruneError
    from svdprune_onnx.text import causal_lm
    from svdprune_onnx.vision import PrunedVision, vision_token_count

    args.method = args.method or PruneConfig.method  # LLaVA's default (make bench-fidelity)
    if args.method == EXACT:  # refuse before minutes of loading, not at trace time
        raise PruneError(
            "method 'exact' is the float64 SVD reference (bench and eval only): ONNX has no SVD, "
            "so it cannot be exported; use --method gram (default) or power"
        )
    from export.lean import mmap_big_allocations

    mmap_big_allocations()  # a released graph's weights leave the process (export/lean.py)
    rank = resolve_rank(args.rank, args.k)
    steps = 5 if args.dtype == C.DTYPE_FP32 else 6  # the dtype pass is a step of its own
    t = step(1, steps, "loading checkpoint")
    src = checkpoint(args.model, args.preset)
    model, weights = load_model(src, args.export_memory)
    processor = load_image_processor(src)
    prompt = prompt_section(src)
    lm = causal_lm(model)
    n = vision_token_count(model)
    prune = PruneConfig(
        k=args.k,
        n=n,
        method=args.method,
        rank=rank,
        iterations=args.iters,
        center=args.center == "on",
        oversample=args.oversample,
        scored_features=args.score,
        seed=args.seed,
    )
    check_rank(prune)
    module = PrunedVision(model, prune).eval()
    # Preprocessing: refuse processor options the runtime does not model, then require its
    # pixels to equal the checkpoint's own processor's on the validation photos (max |diff| 0).
    # Read the photos now: a bad -i path fails before minutes of export, not after.
    photos = args.image or sorted(SHARED_IMAGES.glob("*"))
    # the device self-test's photos (a static vision graph takes exactly its own batch)
    small = reference_images(photos or [synthetic_photo()], args.batch or 2)
    pixel_check = check_runtime_pixels(processor, vision_section(model, processor), photos, small)
    batches = validation_batches(processor, photos, big=max(3, args.batch or 0))
    if args.batch:  # a static graph is validated on batches of exactly its size
        big, b = batches[-1], args.batch
        batches = [big[i : i + b] for i in range(0, len(big) - b + 1, b)]
    out = bundle_path(args, src)
    print(f"      {src} | N={n} -> K={prune.k} | {prune.method} r={prune.rank} "
          f"iters={prune.iterations} center={prune.center} on {prune.scored_features} features "
          f"({time.perf_counter() - t:.1f}s)")  # fmt: skip

    with atomic_dir(out) as tmp:
        (tmp / C.ONNX_DIR).mkdir()
        t = step(
            2, steps, f"{C.VISION_ONNX}: export ({args.vision_exporter}) + parity on real photos"
        )
        image_size = tuple(module.vm.embeddings.config.image_size for _ in range(2))
        path = tmp / C.VISION_ONNX
        export_vision(module, path, image_size, args.vision_exporter, args.batch, weights)
        # PyTorch's side first, with this graph's weights loaded; released before ORT loads its own
        selftest_px = preprocess_batch(small, vision_section(model, processor))
        with loaded(weights, module):
            refs = vision_refs(module, batches)
            selftest_scores = module.scores(torch.from_numpy(selftest_px)).numpy()
        report = validate_vision(path, batches, refs)
        report.update(pixel_check)  # preprocessing figures (export/processor.py)
        vision_done(t, report)
        embed_step(lm, tmp, weights, report, steps)

        t = step(4, steps, f"{C.DECODER_ONNX}: export ({args.decoder_exporter}) + parity")
        # Parity on the graph itself, or, when its fp32 weights would not fit in memory beside
        # the rest, on its first SLICE_LAYERS layers exported by the same code (lean only). A
        # decoder checked on a slice is then written in the target dtype straight from the
        # checkpoint: its weights never exist in float32 on disk (export.lean.finalize).
        export_fn = functools.partial(export_decoder, args.decoder_exporter)
        check = parity_target(src, lm, weights, tmp, export_fn, causal_lm)
        defer = check is not None and args.dtype in DEFERRABLE
        export_fn(lm, tmp / C.DECODER_ONNX, weights, defer)
        worst = check_decoder(check, lm, weights, tmp / C.DECODER_ONNX, model, decoder_refs)
        report[C.VAL_DECODER_REL], report["decoder_max_abs_diff"] = worst["rel"], worst["abs"]
        report["decoder_parity_layers"] = worst["layers"]
        check_text = check[3] if check else None
        done(t, f"prefill + 3 steps, batch 1/2, rel. diff {worst['rel']:.1e} of each scale")

        sliced = (check[2], check_text) if check else None
        deferred = weights.deferred if weights is not None else None
        strict = args.quality_gate == GATE_FAIL
        plan = convert_variant(
            tmp, args.dtype, batches, text_facts(model), report, steps, sliced, deferred, strict
        )
        step(steps, steps, f"writing bundle {out}")
        copy_side_files(src, tmp)
        manifest = build_manifest(model, processor, prune, src, report)
        manifest[C.KEY_PRUNING][C.P_POSITIONS] = args.positions or C.POSITIONS_COMPACT
        manifest[C.KEY_VISION][C.V_STATIC_BATCH] = args.batch
        manifest[C.KEY_DTYPE] = args.dtype
        manifest[C.KEY_GRAPHS] = graphs_section(tmp, plan)
        manifest[C.KEY_PROMPT] = prompt
        manifest[C.KEY_EXPORTER] = {
            "packages": package_versions(),
            "opset": OPSET,
            "vision_exporter": args.vision_exporter,
            "decoder_exporter": args.decoder_exporter,
            "export_memory": LEAN if weights is not None else FULL,
        }
        adapt_for_transformersjs(tmp, manifest)  # config/processor files for transformers.js
        write_genai(tmp, manifest)  # genai_config.json + onnx/embed_genai.onnx for ORT GenAI
        write_manifest(tmp, manifest)
        # The device self-test's reference: this bundle's own CPU run on real photos.
        pipe = Pipeline(
            tmp, SessionConfig(provider="cpu", prepack=False), verify=False
        )  # hashed just now
        manifest[C.KEY_SELFTEST] = save_reference(
            pipe, small, lambda px: same_pixels(px, selftest_px) and selftest_scores
        )
        write_manifest(tmp, manifest, only=C.SELFTEST_FILE)
    summary(out, prune, report)
    return out


def load_model(src: Path, memory: str) -> tuple:
    """(LLaVA model, lean Weights or None). Lean needs safetensors; a .bin checkpoint takes the
    full route, and the step line says so."""
    from export.lean import shell
    from export.load import load_llava
    from export.safetensors_io import shard_files

    if memory == LEAN and shard_files(src):
        return shell(src)
    if memory == LEAN:
        print("      no .safetensors in the checkpoint: --export-memory lean streams from them; "
              "loading the whole model instead (full)")  # fmt: skip
    return load_llava(src), None


@contextlib.contextmanager
def loaded(weights, module, but=None) -> Iterator[None]:
    """`module`'s real weights (less those only `but` holds) for the PyTorch references; lean:
    loaded, then released."""
    if weights is None:
        yield
        return
    names = weights.names_in(module, but)
    weights.load(names)
    try:
        yield
    finally:
        weights.release(names)


# A decoder whose fp32 weights pass this share of the available memory is checked on a slice.
PARITY_SHARE = 0.5
SLICE_LAYERS = 2


# --dtype values whose decoder conversion streams (int8's quantize_dynamic reads fp32 files)
DEFERRABLE = (C.DTYPE_FP16, C.DTYPE_Q4, C.DTYPE_Q4F16)


def export_decoder(exporter: str, lm, path: Path, weights, deferred: bool = False) -> None:
    """decoder_model_merged.onnx by `exporter`, optimum or torch (dynamo); lean: traced on
    stand-ins, the weights streamed from the checkpoint as the graph is written (`deferred`:
    left for the dtype pass to stream)."""
    from export.decoder import export_decoder_optimum
    from export.vision import OPSET

    if exporter == "torch":
        from export.decoder_torch import export_decoder_torch

        export_decoder_torch(lm, path, OPSET, weights, deferred)
    else:
        export_decoder_optimum(lm, path, OPSET, weights, deferred)


def parity_target(src: Path, lm, weights, tmp: Path, export_fn, lm_fn):
    """None: check the decoder itself. Else (lm, Weights, graph, text facts) of its first
    SLICE_LAYERS layers, exported the same way (`export_fn(lm, path, weights)`, `lm_fn(model)`
    -> the decoder module): the lean export's answer to a decoder whose float32 weights (loaded
    for PyTorch) would take more than PARITY_SHARE of free memory."""
    from export.lean import available_bytes, shell
    from export.manifest import text_facts

    if weights is None:
        return None
    need, free = weights.nbytes(weights.names_in(lm, lm.get_input_embeddings())), available_bytes()
    if need <= PARITY_SHARE * free:
        return None
    model, slice_weights = shell(src, text_layers=SLICE_LAYERS)
    path = tmp / ".parity-slice" / Path(C.DECODER_ONNX).name
    path.parent.mkdir(parents=True)
    slice_lm = lm_fn(model)
    export_fn(slice_lm, path, slice_weights)
    print(f"      the fp32 decoder ({need / 2**30:.1f} GiB) is more than {PARITY_SHARE:.0%} of "
          f"the {free / 2**30:.1f} GiB available: parity on its first {SLICE_LAYERS} layers "
          f"of {lm.config.num_hidden_layers}, exported the same way")  # fmt: skip
    return slice_lm, slice_weights, path, text_facts(model)


def check_decoder(check, lm, weights, path: Path, model, refs_fn) -> dict:
    """The decoder graph (or parity_target's slice `check`) vs PyTorch: {rel, abs, layers}.
    `refs_fn(lm, embed lookup)` computes the PyTorch steps (text_graphs / qwen_decoder)."""
    from export.manifest import text_facts
    from export.text_graphs import decoder_parity

    check_lm, check_weights, check_path, check_text = check or (
        lm, weights, path, text_facts(model)
    )  # fmt: skip
    table = check_lm.get_input_embeddings()  # lean: inputs read row by row, not loaded
    with loaded(check_weights, check_lm, but=table):
        lookup = check_weights.lookup(table) if check_weights is not None else None
        refs = refs_fn(check_lm, lookup)
    worst = decoder_parity(check_path, refs, check_text)
    return {**worst, "layers": check_text[C.T_LAYERS]}


def vision_done(t: float, report: dict) -> None:
    """Step 2's closing line (both families): selection and feature parity vs PyTorch."""
    sel, rel = report[C.VAL_SELECTION], report[C.VAL_FEATURES_REL]
    done(t, f"kept_indices agreement {sel['agreement_min']:.3f}, leverage mass "
            f"{sel['mass_min']:.4f}, features rel. diff {rel:.1e}")  # fmt: skip


def embed_step(lm, tmp: Path, weights, report: dict, steps: int) -> None:
    """Step 3 (both families): onnx/embed_tokens.onnx, exported and checked against PyTorch."""
    from export.text_graphs import embed_parity, embed_refs, export_embed
    from export.vision import OPSET

    t = step(3, steps, f"{C.EMBED_ONNX}: export + parity")
    export_embed(lm, tmp / C.EMBED_ONNX, OPSET, weights)
    with loaded(weights, lm.get_input_embeddings()):
        refs = embed_refs(lm)
    report["embed_tokens_max_abs_diff"] = embed_parity(tmp / C.EMBED_ONNX, refs)
    done(t, "identical embeddings")


def same_pixels(px, want) -> bool:
    """The self-test reference's pixels are the ones the scores were computed on (a guard)."""
    import numpy as np

    if not np.array_equal(px, want):
        raise RuntimeError("self-test pixels differ from the ones scored at export")
    return True


def done(t: float, text: str) -> None:
    print(f"      {text} ({time.perf_counter() - t:.1f}s)", flush=True)


def convert_variant(
    tmp: Path,
    dtype: str,
    batches: list,
    text: dict,
    report: dict,
    steps: int,
    sliced: tuple[Path, dict] | None = None,
    deferred: dict | None = None,
    strict: bool = True,
) -> dict:
    """The --dtype pass on the validated fp32 graphs in `tmp`, re-validated against them.

    The fp32 graphs wait in a hidden folder inside `tmp` and are deleted once the variant passes,
    so a failed variant leaves nothing behind (atomic_dir removes `tmp`). `sliced` = (fp32 slice,
    its text facts): the decoder's variant is judged on that slice, converted the same way.
    `deferred`: {graph: readers} of weights not written yet (read from the checkpoint).
    Not `strict`: a variant past its tolerances is kept, with a warning line per failure.
    """
    import shutil

    from export.dtypes import PLANS, convert_bundle, convert_graph, validate_variant

    if dtype == C.DTYPE_FP32:
        if sliced:
            shutil.rmtree(sliced[0].parent)
        return PLANS[dtype]
    t = step(5, steps, f"{dtype} graphs + quality vs fp32")
    ref = tmp / ".fp32"
    clamped: dict[str, dict] = {}
    consume = frozenset({C.DECODER_ONNX} if sliced else ())
    plan = convert_bundle(tmp, ref, dtype, consume, clamped, deferred)
    # fp16 holds |w| <= 65504: a weight beyond (bf16 checkpoints can have them) is clamped,
    # said here and recorded; the quality check below judges what that did to the outputs
    n = sum(c for graph in clamped.values() for c, _ in graph.values())
    if n:
        graph, name, (_, peak) = max(
            ((g, k, v) for g, d in clamped.items() for k, v in d.items()), key=lambda x: x[2][1]
        )
        print(f"      fp16: {n} weight values beyond +-65504 clamped to it, in "
              f"{sum(map(len, clamped.values()))} tensors (largest |w| {peak:.3g}, {name} "
              f"in {graph})")  # fmt: skip
    report["fp16_clamped"] = {g: {k: list(v) for k, v in d.items()} for g, d in clamped.items()}
    decoder = None
    if sliced:
        variant = sliced[0].with_name(f"{dtype}.onnx")
        convert_graph(sliced[0], variant, plan[C.DECODER_ONNX], C.DECODER_ONNX)
        decoder = (variant, sliced[0], sliced[1])
    report[dtype] = validate_variant(tmp, ref, dtype, batches, text, decoder, strict)
    for failure in report[dtype]["failures"]:  # only when not strict: else it raised
        print(f"      warning: {failure}; kept (--quality-gate warn)")
    shutil.rmtree(ref)
    if sliced:
        shutil.rmtree(sliced[0].parent)
    dec = report[dtype][C.DECODER_ONNX]
    done(t, f"decoder logits rel. error {dec['logits_rel_err']:.2e}, "
         f"top-1 agreement {dec['top1_agreement']:.2f}")  # fmt: skip
    return plan


def summary(out: Path, prune, report: dict) -> None:
    """Files and sizes, what was pruned, the parity figures, and what to run next."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    print(f"\nbundle: {out}  ({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB)")
    for f in files:
        print(f"  {f.relative_to(out).as_posix():40s} {f.stat().st_size / 2**20:8.2f} MiB")
    vision, decoder = report[C.VAL_FEATURES_REL], report[C.VAL_DECODER_REL]
    from svdprune_onnx.leverage import LEVERAGE_METHODS

    detail = f" (r={prune.rank}, {prune.iterations} iterations)" * (
        prune.method in LEVERAGE_METHODS
    )
    print(f"K={prune.k} of N={prune.n}, method={prune.method}{detail}; rel. diff vs PyTorch: "
          f"vision {vision:.1e}, decoder {decoder:.1e}")  # fmt: skip
    print(f"next: python -m runtime.bundle {out} --selftest   # on the target device")


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from export.errors import USER_ERRORS

    try:
        if args.print_out:
            print(bundle_path(args))
        else:
            main(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(cli())
    except KeyboardInterrupt:  # Ctrl-C: atomic_dir has removed its temp folder; one line, no trace
        if "--debug" in sys.argv:
            raise
        print("error: interrupted; no bundle written (a previous one is intact)", file=sys.stderr)
        sys.exit(130)
