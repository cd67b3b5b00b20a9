"""`python -m export --family qwen2.5-vl` / `make export FAMILY=qwen2.5-vl`: a Qwen2.5-VL bundle.

-m CHECKPOINT (default: the built-in tiny Qwen2.5-VL, built if missing)
  ├─ PrunedQwenVision(K, site, --image-size) ─► onnx/vision_encoder.onnx
  │    └─ ORT vs PyTorch on the real photos, each at its own smart-resized size (+ 448x448)
  ├─ embed_tokens ─► onnx/embed_tokens.onnx (ids -> embeddings, parity)
  ├─ language model + lm_head, 3-row M-RoPE position_ids ─► onnx/decoder_model_merged.onnx
  │    └─ prefill + 3 steps, batch 1/2 with an image's positions, vs PyTorch
  └─ svdprune.json (family qwen2_5_vl, pruning.score_site / min_tokens / n_max) ─► rename

The same atomic folder, lean weight streaming and manifest as the LLaVA route
(export/__main__.py); what differs is what a Qwen bundle needs: one image per vision call at
its own resolution, the processor's min/max pixels instead of a fixed size, and 3-row positions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from runtime import contract as C

# Validation sizes besides each photo's own: (W, H) PIL resizes of the first photo (448x448 is
# the square TensorRT size; 644x476 the smart-resize of 640x480 with rows not a power of two).
EXTRA_SIZES = ((448, 448),)
# Kept tokens at their original (t, h, w), text after the image from the unpruned max + 1: the
# rotary phases of the unpruned prompt (measured closer to the unpruned model: README, eval).
DEFAULT_POSITIONS = C.POSITIONS_ORIGINAL


def parse_size(text: str) -> tuple[int, int]:
    """--image-size HxW (e.g. 448x448) -> (H, W)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 448x448, got {text!r}")
    return int(parts[0]), int(parts[1])


def load_qwen(src: Path, memory: str):
    """(Qwen2_5_VLForConditionalGeneration, lean Weights or None), float32, eager attention."""
    import torch
    from safetensors import SafetensorError
    from transformers import Qwen2_5_VLForConditionalGeneration

    from export.__main__ import LEAN
    from export.lean import shell
    from export.load import CheckpointError, read_config
    from export.safetensors_io import shard_files

    read_config(src)
    if memory == LEAN and shard_files(src):
        return shell(src)
    try:
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            src, dtype=torch.float32, attn_implementation="eager", local_files_only=True,
            trust_remote_code=False, weights_only=True, output_loading_info=True,
        )  # fmt: skip
    except (OSError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot load weights from {src} ({e}); pass a complete checkpoint"
        ) from e
    if missing := info.get("missing_keys"):
        raise CheckpointError(f"{src} lacks {len(missing)} weights (e.g. {missing[0]})")
    return model.eval(), None


def prompt_section(src: Path, image_token: str) -> dict:
    """One user turn with the image in the checkpoint's chat template (chat_template.json, else
    the tokenizer's), rendered by transformers as Qwen2_5_VLProcessor.apply_chat_template does."""
    import json

    from transformers import AutoTokenizer

    from export.load import CheckpointError
    from export.manifest import PROMPT_MARKER

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    chat_file = src / "chat_template.json"
    chat = json.loads(chat_file.read_text())["chat_template"] if chat_file.is_file() else None
    chat = chat or tok.chat_template
    if not chat:
        raise CheckpointError(f"{src} has no chat template (chat_template.json); copy it over")
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "@@"}]}]
    text = tok.apply_chat_template(turn, chat_template=chat, tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    if text.count(image_token) != 1:
        raise CheckpointError(f"{src}'s chat template does not place {image_token!r} once")
    return {
        C.PR_TEMPLATE: text.replace("@@", PROMPT_MARKER),
        C.PR_MARKER: PROMPT_MARKER,
        C.PR_IMAGE: image_token,
        C.PR_CHAT: chat,
    }


def vision_section(src: Path, model, processor, fixed: tuple[int, int] | None) -> dict:
    """The preprocessing facts (runtime/preprocess_qwen.py) and the tower's."""
    from export.processor import ImageProcessorError
    from runtime.preprocess_qwen import vision_from_processor

    try:
        facts = vision_from_processor(processor.to_dict())
    except ValueError as e:
        raise ImageProcessorError(str(e)) from e
    facts[C.V_FIXED_SIZE] = list(fixed) if fixed else None
    facts[C.V_TOWER] = model.config.vision_config.model_type
    return facts | video_facts(src, model)


# transformers 4.57 Qwen2VLVideoProcessor's class defaults (size shortest/longest edge): what a
# checkpoint without video_preprocessor_config.json gets from AutoVideoProcessor
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28


def video_facts(src: Path, model) -> dict:
    """Video preprocessing and time positions (runtime/preprocess_qwen.preprocess_qwen_video)."""
    import json

    cfg_file = src / "video_preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    size = cfg.get("size") or {}
    low = cfg.get("min_pixels") or size.get("shortest_edge") or VIDEO_MIN_PIXELS
    high = cfg.get("max_pixels") or size.get("longest_edge") or VIDEO_MAX_PIXELS
    return {
        C.V_VIDEO_MIN_PIXELS: int(low),
        C.V_VIDEO_MAX_PIXELS: int(high),
        C.V_TOKENS_PER_SECOND: int(model.config.vision_config.tokens_per_second),
    }


def samples(processor, vision: dict, photos: list[Path], min_tokens: int) -> tuple[list, dict]:
    """The graph's validation inputs, and the preprocessing figures: each photo at its own size
    and at EXTRA_SIZES through runtime.preprocess_qwen, which must equal the checkpoint's
    processor bit for bit (or ExportValidationError). A fixed-size graph: its size only."""
    from export.photos import synthetic_photo
    from export.vision import ExportValidationError
    from runtime.preprocess import load_image
    from runtime.preprocess_qwen import preprocess_qwen

    images = [load_image(p) for p in photos] or [synthetic_photo()]
    images += [images[0].resize(size) for size in EXTRA_SIZES]
    out = []
    for i, image in enumerate(images):
        ours = preprocess_qwen(image, vision, min_tokens)
        if not vision[C.V_FIXED_SIZE]:
            ref = processor(images=[image], return_tensors="np")
            px, grid = ref["pixel_values"].astype(np.float32), ref["image_grid_thw"]
            same = px.shape == ours[0].shape and np.array_equal(grid, ours[1])
            diff = float(np.abs(px - ours[0]).max()) if same else float("inf")
            if diff != 0.0 and grid.prod() // 4 >= min_tokens:  # raised floor: not comparable
                raise ExportValidationError(
                    "runtime preprocessing differs from the checkpoint's "
                    f"{type(processor).__name__} on validation image {i} "
                    f"({image.width}x{image.height}): max |diff| {diff}"
                )
        out.append(ours)
    # every compared image was equal (else raised above): the worst |diff| is 0
    return out, {C.VAL_PREPROCESS: 0.0, C.VAL_PREPROCESS_IMAGES: len(images)}


def main_qwen(args: argparse.Namespace) -> Path:
    """Export one Qwen2.5-VL bundle (python -m export's options); returns its folder."""
    from dataclasses import asdict

    from export.__main__ import (
        FULL,
        LEAN,
        SHARED_IMAGES,
        bundle_path,
        check_decoder,
        check_rank,
        done,
        embed_step,
        loaded,
        parity_target,
        resolve_rank,
        step,
        vision_done,
    )
    from export.bundle import atomic_dir, copy_side_files, package_versions, write_manifest
    from export.genai import write_genai_qwen
    from export.lean import mmap_big_allocations
    from export.load import checkpoint, load_image_processor
    from export.manifest import PRUNING_KEYS, graphs_section, text_facts
    from export.photos import synthetic_photo
    from export.qwen_decoder import export_qwen_decoder, qwen_causal_lm, qwen_decoder_refs
    from export.qwen_vision import export_qwen_vision, qwen_vision_refs, validate_qwen_vision
    from export.transformersjs import adapt_qwen_for_transformersjs
    from export.vision import OPSET
    from runtime.generate import Pipeline
    from runtime.preprocess_qwen import preprocess_qwen
    from runtime.selftest import reference_images, save_reference
    from runtime.session import SessionConfig
    from svdprune_onnx import qwen_vision as QV
    from svdprune_onnx.select import NONE, PruneConfig, PruneError

    if args.method == "exact":
        raise PruneError("method 'exact' is the float64 SVD reference; ONNX has no SVD: use gram")
    if args.dtype != C.DTYPE_FP32 or args.batch:
        raise PruneError(
            "a Qwen2.5-VL bundle is exported in fp32 with one image per vision call: drop "
            "--dtype / --batch (fix the resolution for TensorRT with --image-size HxW)"
        )
    mmap_big_allocations()  # a released graph's weights leave the process (export/lean.py)
    steps = 5
    t = step(1, steps, "loading checkpoint")
    src = checkpoint(args.model, args.preset, C.FAMILY_QWEN25VL)
    out = bundle_path(args, src)
    model, weights = load_qwen(src, args.export_memory)
    processor = load_image_processor(src)
    fixed = args.image_size
    n = QV.token_count(model, fixed)
    args.method = args.method or QV.DEFAULT_METHOD
    k = n if args.method == NONE else args.k
    prune = PruneConfig(
        k=k, n=n, method=args.method, rank=resolve_rank(args.rank, k), iterations=args.iters,
        center=args.center == "on", oversample=args.oversample, scored_features=args.score,
        seed=args.seed,
    )  # fmt: skip
    check_rank(prune)
    module = QV.PrunedQwenVision(model, prune, site=args.score_site, fixed_size=fixed).eval()
    vision = vision_section(src, model, processor, fixed)
    photos = args.image or sorted(SHARED_IMAGES.glob("*"))
    inputs, pixel_check = samples(processor, vision, photos, module.min_tokens)
    # the device self-test's photos, each at its own (thumbnail) size
    small = reference_images(photos or [synthetic_photo()], 2)
    selftest_px = [preprocess_qwen(im, vision, module.min_tokens) for im in small]
    lm = qwen_causal_lm(model)
    image_token = processor_token(src, model.config.image_token_id)
    prompt = prompt_section(src, image_token)
    prompt[C.PR_VIDEO] = processor_token(src, model.config.video_token_id)
    done(t, f"{src} | {'N per image' if not fixed else f'N={n}'} -> "
            f"{'all' if prune.method == NONE else f'K={prune.k}'} | {prune.method} "
            f"r={prune.rank} at {args.score_site}")  # fmt: skip

    with atomic_dir(out) as tmp:
        (tmp / C.ONNX_DIR).mkdir()
        t = step(2, steps, f"{C.VISION_ONNX}: export + parity on real photos at their own size")
        export_qwen_vision(module, tmp / C.VISION_ONNX, weights)
        with loaded(weights, module):
            refs = qwen_vision_refs(module, inputs + selftest_px)
        refs, selftest_refs = refs[: len(inputs)], refs[len(inputs) :]
        report = validate_qwen_vision(tmp / C.VISION_ONNX, module, inputs, refs)
        report.update(pixel_check)
        vision_done(t, report)
        embed_step(lm, tmp, weights, report, steps)

        t = step(4, steps, f"{C.DECODER_ONNX}: export (torch, 3-row positions) + parity")

        def export_fn(lm, path: Path, weights=None) -> None:  # parity_target's signature
            export_qwen_decoder(lm, path, OPSET, weights)

        check = parity_target(src, lm, weights, tmp, export_fn, qwen_causal_lm)
        export_fn(lm, tmp / C.DECODER_ONNX, weights)
        worst = check_decoder(check, lm, weights, tmp / C.DECODER_ONNX, model, qwen_decoder_refs)
        if check:
            import shutil

            shutil.rmtree(check[2].parent)
        report[C.VAL_DECODER_REL], report["decoder_max_abs_diff"] = worst["rel"], worst["abs"]
        report["decoder_parity_layers"] = worst["layers"]
        done(t, f"prefill + 3 steps, batch 1/2, rel. diff {worst['rel']:.1e} of each scale")

        step(5, steps, f"writing bundle {out}")
        copy_side_files(src, tmp)
        pruning = asdict(prune)
        manifest = {
            C.KEY_SCHEMA: C.SCHEMA_VERSION,
            C.KEY_MODEL: {"family": model.config.model_type, "source": str(src), "name": src.name},
            C.KEY_PRUNING: {key: pruning[name] for name, key in PRUNING_KEYS.items()}
            | {
                C.P_POSITIONS: args.positions or DEFAULT_POSITIONS,
                C.P_SCORE_SITE: args.score_site,
                C.P_SITE_CHOICE: QV.SITE_CHOICE,
                C.P_MIN_TOKENS: module.min_tokens,
                C.P_N_MAX: module.n_max,
                C.P_VIDEO: C.VIDEO_PER_SLICE,
            },
            C.KEY_VISION: vision,
            C.KEY_TEXT: {
                C.T_IMAGE_TOKEN_ID: int(model.config.image_token_id),
                C.T_VIDEO_TOKEN_ID: int(model.config.video_token_id),
                C.T_IMAGE_TOKENS: None if prune.method == NONE else prune.k,
                **text_facts(model),
            },
            C.KEY_VALIDATION: report,
            C.KEY_DTYPE: C.DTYPE_FP32,
            C.KEY_GRAPHS: graphs_section(tmp, {g: C.DTYPE_FP32 for g in C.GRAPH_FILES}),
            C.KEY_PROMPT: prompt,
            C.KEY_EXPORTER: {
                "packages": package_versions(),
                "opset": OPSET,
                "vision_exporter": "torchscript",
                "decoder_exporter": "torch",
                "export_memory": LEAN if weights is not None else FULL,
            },
        }
        adapt_qwen_for_transformersjs(tmp, manifest)  # transformers.js_config + chat template
        write_genai_qwen(tmp, manifest)  # ORT GenAI: files for --method none, else why not
        write_manifest(tmp, manifest)
        # The device self-test's reference: this bundle's own CPU run on real photos.
        pipe = Pipeline(tmp, SessionConfig(provider="cpu", prepack=False), verify=False)
        scores = _padded([r[2] for r in selftest_refs])

        def selftest_scores(px: list) -> np.ndarray:  # a guard: the pixels scored above
            if any(not np.array_equal(a[0], b[0]) for a, b in zip(px, selftest_px, strict=True)):
                raise RuntimeError("self-test pixels differ from the ones scored at export")
            return scores

        manifest[C.KEY_SELFTEST] = save_reference(pipe, small, selftest_scores)
        write_manifest(tmp, manifest, only=C.SELFTEST_FILE)
    kept = "all" if prune.method == NONE else f"K={prune.k}"
    print(f"\nbundle: {out}\n{kept} per image ({prune.method}, scored at {args.score_site}); "
          f"rel. diff vs PyTorch: vision {report[C.VAL_FEATURES_REL]:.1e}, decoder "
          f"{report[C.VAL_DECODER_REL]:.1e}")  # fmt: skip
    return out


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    """(B, N_max) float32 from rows of different lengths, zero-padded."""
    out = np.zeros((len(rows), max(len(r) for r in rows)), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def processor_token(src: Path, token_id: int) -> str:
    """The image placeholder's text (<|image_pad|>) from the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    return tok.convert_ids_to_tokens(int(token_id))
