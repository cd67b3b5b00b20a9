"""The bundle's self-test: does this device, provider and precision preprocess, prune and
answer as the export did? (numpy, Pillow and onnxruntime only)

    export (CPU, the reference)                      device (any provider, once)
    2 real photos (uint8, <= 640 px) ─► pixels ─┐    the same photos ─► its own preprocess
      sha256 of the pixels                      │      pixels bit-equal (same Pillow rules)
      vision graph ─► kept_indices, features,   │      vision graph: agreement + leverage mass
      PyTorch's selection scores                │      vs the reference (runtime.parity floors)
    fixed prompt ─► greedy ─► first tokens ─────┴─►  the same prompt ─► greedy tokens: equal

The reference lives in the bundle (SELFTEST_FILE, hashed in the manifest like every file). The
runtime runs the test the first time a bundle meets a new provider/precision and caches the
result beside the bundle (`<bundle>.selftest/`); when TensorRT's fp16 engine changes the pruning
(Gram products overflow in fp16) it rebuilds the vision engine in fp32 and says so in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from runtime import contract as C
from runtime.parity import below_floor, rel_diff, selection_figures
from runtime.preprocess import load_image

NEW_TOKENS = 8  # greedy tokens per photo in the reference
SIDE = 640  # the reference photos' long side (px): ~1 MB for two in the bundle
# A reference first token whose lead over the runner-up is below this share of the largest
# |logit| is a near-tie: another provider may pick the runner-up without being wrong.
NEAR_TIE = 0.02
PROMPT = "What is in the image?"


class SelfTestError(RuntimeError):
    """This provider/precision does not reproduce the bundle's reference; says what to do."""


def reference_images(sources: Sequence, n: int) -> list[Image.Image]:
    """The self-test's photos: the first `n` of `sources` (paths or PIL images, cycled),
    downscaled to at most SIDE px on the long side so the bundle carries them cheaply."""
    if not sources:
        raise ValueError("the self-test needs at least one image")
    images = []
    for i in range(n):
        src = sources[i % len(sources)]
        image = src.copy() if isinstance(src, Image.Image) else load_image(src)
        image.thumbnail((SIDE, SIDE), Image.Resampling.BICUBIC)
        images.append(image)
    return images


def save_reference(pipe, images: list[Image.Image], scores: Callable) -> dict:
    """Preprocess `images` and run `pipe` (a CPU Pipeline over the freshly exported bundle) on
    them (closing its vision session once used); write the photos, the pixels' digest and the
    outputs as the reference. Returns the
    manifest's selftest section.

    `scores(pixels) -> (B, N)` gives PyTorch's selection scores (the leverage the graph ranks),
    so a device is judged by the mass it keeps, not only by exact indices. A Qwen2.5-VL bundle's
    photos keep their own sizes: its rows (kept, features, scores, prompt ids) are padded
    (kept and prompt ids with -1, the others with 0).
    """
    from runtime.generate import Sampling

    pixels = pipe.preprocess(images)  # (B, 3, H, W) float32, or one (pixels, grid) per photo
    prompt = _prompts(pipe, pixels)
    kept, feats, tokens, margin = _run(pipe, pixels, prompt, Sampling(NEW_TOKENS), once=True)
    photos = {C.ST_IMAGE.format(i): np.asarray(im) for i, im in enumerate(images)}
    np.savez_compressed(
        pipe.bundle / C.SELFTEST_FILE,
        **photos,
        **{
            C.ST_KEPT: kept,
            C.ST_FEATURES: feats,
            C.ST_SCORES: np.asarray(scores(pixels), np.float32),
            C.ST_PROMPT: prompt,
            C.ST_TOKENS: tokens,
            C.ST_MARGIN: margin,
        },
    )
    return {
        C.S_FILE: C.SELFTEST_FILE,
        C.S_IMAGES: len(images),
        C.S_NEW_TOKENS: NEW_TOKENS,
        C.S_PIXELS_SHA256: _digest(pixels),
    }


def _digest(pixels) -> str:
    """sha256 of the pixels: a (B, 3, H, W) array, or a Qwen bundle's (pixels, grid) list."""
    arrays = [pixels] if isinstance(pixels, np.ndarray) else [a for pair in pixels for a in pair]
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a, a.dtype).tobytes())
    return digest.hexdigest()


def _prompts(pipe, pixels) -> np.ndarray:
    """The prompt ids: (S,) for LLaVA; (B, S) padded with -1 for Qwen (each image's count)."""
    if not pipe.qwen:
        return np.array(pipe.prompt_ids(PROMPT), np.int64)
    rows = [pipe.prompt_ids(PROMPT, n) for n in pipe.image_tokens(pixels)]
    out = np.full((len(rows), max(map(len, rows))), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _run(pipe, pixels, prompt: np.ndarray, sampling, once: bool = False) -> tuple:
    """One vision batch (a static graph's own size), then each photo's greedy answer alone:
    kept (B,K), feats (B,K,D), tokens (B, T) padded with -1 after an early eos. `once`: the
    vision session is closed after its batch (the export's run: one graph's weights mapped)."""
    image = pipe.run_vision(pixels)
    feats, kept = image[0], image[1]
    if once:
        pipe.vision = None
    tokens, margins = [], []
    for i in range(len(pixels)):
        out = pipe.vision_row(image, i)
        ids = prompt if prompt.ndim == 1 else prompt[i][prompt[i] >= 0]
        (res,) = pipe.generate(pixels[i : i + 1], [ids.tolist()], sampling, vision_out=out)
        tokens.append(res.token_ids + [-1] * (sampling.max_new_tokens - len(res.token_ids)))
        top2 = np.sort(res.first_logits)[-2:]  # the first pick's lead over the runner-up
        margins.append((top2[1] - top2[0]) / max(float(np.abs(res.first_logits).max()), 1e-30))
    return kept, feats, np.array(tokens, np.int64), np.array(margins, np.float32)


def run_selftest(pipe) -> dict:
    """Run the bundle's reference through `pipe` and judge it; returns the report."""
    from runtime.bundle import BundleError, inside
    from runtime.generate import Sampling

    section = pipe.m.get(C.KEY_SELFTEST)
    if not section:
        raise BundleError(
            f"{pipe.bundle} carries no self-test reference (exported before it existed); "
            "re-export the bundle"
        )
    with np.load(inside(pipe.bundle, section[C.S_FILE]), allow_pickle=False) as ref:
        ref = {k: ref[k] for k in ref.files}
    n_tokens = ref[C.ST_TOKENS].shape[1]
    # this device's own preprocessing (its Pillow) on the stored photos: bit-exact or reported
    images = [Image.fromarray(ref[C.ST_IMAGE.format(i)]) for i in range(section[C.S_IMAGES])]
    pixels = pipe.preprocess(images)
    kept, feats, tokens, _ = _run(pipe, pixels, ref[C.ST_PROMPT], Sampling(n_tokens))
    sel = selection_figures(kept, ref[C.ST_KEPT], ref[C.ST_SCORES])
    same = kept == ref[C.ST_KEPT]  # (B, K): rows whose token agrees have comparable features
    equal = [
        int(np.argmin(np.append(a == b, False)))
        for a, b in zip(tokens, ref[C.ST_TOKENS], strict=True)
    ]
    report = {
        "providers": providers(pipe),
        C.VAL_SELECTION: sel,
        C.VAL_FEATURES_REL: rel_diff(feats[same], ref[C.ST_FEATURES][same]),
        "tokens_equal": equal,  # per photo: how many leading greedy tokens equal the reference
        "tokens": n_tokens,
        "pixels_equal": _digest(pixels) == section[C.S_PIXELS_SHA256],
    }
    # A first token may differ only where the reference itself was a near-tie (TF32 matmuls
    # on CUDA move logits by ~1e-3 of their scale).
    tie = ref[C.ST_MARGIN] < NEAR_TIE if C.ST_MARGIN in ref else np.zeros(len(equal), bool)
    report["near_ties"] = int(tie.sum())
    exported = pipe.m.get(C.KEY_EXPORTER, {}).get("packages", {}).get("pillow", "?")
    why = None
    if not report["pixels_equal"]:
        why = (
            f"this device's preprocessing (Pillow {PIL.__version__}) gives other pixels than "
            f"the export's (Pillow {exported})"
        )
    why = why or below_floor(sel)
    if why is None and any(e == 0 and not t for e, t in zip(equal, tie, strict=True)):
        why = "the first greedy token differs from the reference"
    report["passed"], report["reason"] = why is None, why
    return report


def providers(pipe) -> dict[str, str]:
    """{graph: the provider its session really runs on}."""
    return {g: s.get_providers()[0] for g, s in zip(C.GRAPH_FILES, pipe.sessions(), strict=True)}


def describe(report: dict) -> str:
    """One line: the figures and the verdict."""
    sel = report[C.VAL_SELECTION]
    verdict = "ok" if report["passed"] else f"FAILED ({report['reason']})"
    pixels = "pixels bit-equal" if report.get("pixels_equal") else "pixels DIFFER"
    return (
        f"self-test {verdict}: {pixels}, kept-index agreement {sel['agreement_min']:.3f}, "
        f"leverage mass "
        f"{sel['mass_min']:.4f}, features rel. diff {report[C.VAL_FEATURES_REL]:.1e}, greedy "
        f"tokens equal {min(report['tokens_equal'])}/{report['tokens']} "
        f"[{', '.join(sorted(set(report['providers'].values())))}]"
    )


def _cache_file(pipe, cfg) -> Path:
    # One result per (graph contents, providers really used, precision settings).
    key = json.dumps(
        [
            [pipe.m[C.KEY_FILES].get(g) for g in C.GRAPH_FILES],
            providers(pipe),
            dataclasses.astuple(cfg),
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return pipe.bundle.parent / f"{pipe.bundle.name}.selftest" / f"{digest}.json"


def ensure_selftest(pipe, cfg):
    """Run the self-test once per bundle x provider x precision (cached); returns the session
    config to use. TensorRT fp16 that changes the pruning -> the vision graph in fp32, with a
    `note:`; any other failure raises SelfTestError (never a silent uniform grid)."""
    from runtime.session import TRT

    if not pipe.m.get(C.KEY_SELFTEST):
        print(
            f"note: {pipe.bundle.name} has no self-test reference (an older export); "
            "re-export it to have this device checked",
            file=sys.stderr,
        )
        return cfg
    cache = _cache_file(pipe, cfg)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("passed") and cached.get("vision_fp32") and not cfg.vision_fp32:
            print("note: the vision graph runs in fp32 on TensorRT (fp16 changed the pruning "
                  "in this device's self-test)", file=sys.stderr)  # fmt: skip
            fp32 = dataclasses.replace(cfg, vision_fp32=True)
            pipe.reopen_vision(fp32)
            return fp32
        if cached.get("passed"):
            return cfg
    report = run_selftest(pipe)
    if not report["passed"] and pipe.vision.get_providers()[0] == TRT and not cfg.vision_fp32:
        fp32 = dataclasses.replace(cfg, vision_fp32=True)
        pipe.reopen_vision(fp32)
        retry = run_selftest(pipe)
        if retry["passed"]:
            print(
                f"note: TensorRT fp16 changed the pruning ({report['reason']}); the vision graph "
                "runs in fp32 on TensorRT from now on",
                file=sys.stderr,
            )
            _store(cache, {**retry, "vision_fp32": True})
            return fp32
        report = retry
    _store(cache, report)
    if not report["passed"]:
        raise SelfTestError(
            f"{pipe.bundle.name} on this device: {describe(report)}; run with --provider cpu, "
            f"or check the bundle with `python -m runtime.bundle {pipe.bundle} --selftest`"
        )
    return cfg


def _store(cache: Path, report: dict) -> None:
    try:
        cache.parent.mkdir(exist_ok=True)
        cache.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as e:  # a read-only bundle folder: the test runs again next time
        print(f"note: cannot cache the self-test result in {cache.parent} ({e})", file=sys.stderr)
