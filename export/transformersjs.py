"""Adapt a bundle's side files so transformers.js (@huggingface/transformers) loads it unchanged.

What transformers.js 4.3's `LlavaForConditionalGeneration` does with a folder:

    onnx/vision_encoder{sfx}.onnx       pixel_values -> image_features (kept_indices is ignored)
    onnx/embed_tokens{sfx}.onnx         input_ids -> inputs_embeds
      image_features.view(-1, D) scattered row-major over the image tokens of input_ids
    onnx/decoder_model_merged{sfx}.onnx position_ids = cumsum(attention_mask) - 1 (= our compact
                                        positions), empty past from the graph's input metadata
                                        (batch_size -> B, past_sequence_length -> 0)

`sfx` comes from the dtype ("" for fp32, "_fp16", "_q4", ...). The graphs already follow these
names and axes (runtime/contract.py); three side files do not, so the export rewrites them:

    config.json            image_seq_length = K; transformers.js_config = {dtype: "fp32" (our
                           fixed file names carry no suffix, whatever their precision),
                           use_external_data_format: {graph: 1} for graphs with .onnx_data}
    processor_config.json  LlavaProcessor expands the image placeholder to
                           floor(H/patch_size) * floor(W/patch_size) + num_additional_image_tokens
                           (Python transformers subtracts 1 more for strategy "default"), so
                           patch_size = H, num_additional_image_tokens = K - 1, strategy "full"
                           give exactly K image tokens in transformers.js and in Python
    tokenizer_config.json  + chat_template: transformers.js's LlavaProcessor reads it only there
                           (not from chat_template.jinja / .json)

Nothing here changes what our runtime reads (svdprune.json, tokenizer.json).

Qwen2.5-VL (`adapt_qwen_for_transformersjs`): `Qwen2_5_VLForConditionalGeneration` loads the same
three graph names (model_type qwen2_5_vl, image_grid_thw named as ours) and its
`Qwen2_5_VLProcessor` reads the checkpoint's preprocessor_config.json as it is; only config.json's
transformers.js_config (fp32 file names, external data) and the chat template in
tokenizer_config.json are written. That runs an UNPRUNED (method none) bundle. A pruned one cannot
run: the processor writes t*h*w/4 image pads for K features ("Number of tokens and features do
not match") and its M-RoPE (get_rope_index) lays out the full grid, never the kept cells.
"""

from __future__ import annotations

import json
from pathlib import Path

from export.bundle import data_file
from runtime import contract as C


class TransformersJsError(ValueError):
    """The bundle cannot be described in transformers.js's conventions; the message says why."""


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, data: dict, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def processor_fields(k: int, image_size: tuple[int, int]) -> dict:
    """processor_config.json fields that make LlavaProcessor emit exactly `k` image tokens."""
    h, w = image_size
    patch = min(h, w)
    grid = (h // patch) * (w // patch)  # 1 for a square image, 2 for 2:1, ...
    if grid > k:  # only an aspect ratio above K:1 gets here
        raise TransformersJsError(
            f"image size {h}x{w} reads as {grid} patches of {patch}, more than K={k}; "
            "transformers.js cannot be given exactly K image tokens: raise --k"
        )
    return {
        "patch_size": patch,
        "num_additional_image_tokens": k - grid,
        "vision_feature_select_strategy": "full",  # no "- 1" in Python's LlavaProcessor
    }


def external_data(root: Path) -> dict[str, int]:
    """{graph file name: 1} for every graph whose weights live in a `<name>_data` file."""
    out = {}
    for rel in C.GRAPH_FILES:
        graph = root / rel
        if data_file(graph).is_file():
            out[graph.name] = 1
    return out


def chat_template(root: Path) -> str | None:
    """The checkpoint's chat template from chat_template.jinja or chat_template.json, if any."""
    jinja = root / C.HF_CHAT_TEMPLATE_JINJA
    if jinja.is_file():
        return jinja.read_text()
    return _read(root / C.HF_CHAT_TEMPLATE_JSON).get("chat_template")


def adapt_for_transformersjs(root: Path, manifest: dict) -> None:
    """Rewrite config.json, processor_config.json and tokenizer_config.json under `root`.

    `manifest` is the bundle's svdprune.json content (pruning K, vision image size, prompt).
    Call after the graphs and side files are in place and before the manifest hashes them.
    """
    k = manifest[C.KEY_TEXT][C.T_IMAGE_TOKENS]
    h, w = manifest[C.KEY_VISION][C.V_IMAGE_SIZE]
    write_tjs_config(root, image_seq_length=k)

    proc_path = root / C.HF_PROCESSOR_CONFIG
    proc = _read(proc_path)
    proc.setdefault("processor_class", "LlavaProcessor")
    proc.setdefault("image_token", manifest[C.KEY_PROMPT][C.PR_IMAGE])
    proc.update(processor_fields(k, (h, w)))
    _write(proc_path, proc)

    if manifest.get(C.KEY_PRUNING, {}).get(C.P_POSITIONS) == C.POSITIONS_ORIGINAL:
        # transformers.js always derives position ids from the attention mask (compact).
        print(
            "      note: transformers.js runs this bundle with compact position ids, not the "
            "original slots; its tokens will differ from the runtime's (export --positions "
            "compact for transformers.js)",
            flush=True,
        )

    template_into_tokenizer_config(root)


def write_tjs_config(root: Path, **fields) -> None:
    """config.json: transformers.js_config {dtype, use_external_data_format} plus `fields`."""
    cfg_path = root / C.HF_CONFIG
    if not cfg_path.is_file():
        raise TransformersJsError(f"{root} has no {C.HF_CONFIG}; copy the side files first")
    cfg = _read(cfg_path)
    cfg.update(fields)
    js = {"dtype": C.TJS_DTYPE}
    if data := external_data(root):
        js["use_external_data_format"] = data
    cfg[C.TJS_CONFIG] = js
    _write(cfg_path, cfg)


def template_into_tokenizer_config(root: Path) -> None:
    """tokenizer_config.json gets the checkpoint's chat template where it has none (the only
    place transformers.js's processors read it)."""
    tok_path = root / C.HF_TOKENIZER_CONFIG
    template = chat_template(root)
    if tok_path.is_file() and template:
        tok = _read(tok_path)
        if not tok.get("chat_template"):
            tok["chat_template"] = template
            _write(tok_path, tok, sort_keys=False)


def qwen_runs_in_transformersjs(manifest: dict) -> bool:
    """True for an unpruned (method none) Qwen2.5-VL bundle: every merged token per image."""
    return manifest[C.KEY_TEXT].get(C.T_IMAGE_TOKENS) is None


def adapt_qwen_for_transformersjs(root: Path, manifest: dict) -> None:
    """Rewrite config.json (and tokenizer_config.json's chat template) of a Qwen2.5-VL bundle.

    Same call point as `adapt_for_transformersjs`: after the side files are copied, before the
    manifest hashes them. preprocessor_config.json stays the checkpoint's (transformers.js's
    Qwen2VLImageProcessor reads min/max_pixels, patch/merge/temporal sizes from it as Python does).
    """
    write_tjs_config(root)
    template_into_tokenizer_config(root)
    if not qwen_runs_in_transformersjs(manifest):
        print(
            "      note: transformers.js 4.3 runs only unpruned (--method none) Qwen2.5-VL "
            "bundles: its processor writes every merged token's pad and its M-RoPE ignores "
            "kept_indices",
            flush=True,
        )
