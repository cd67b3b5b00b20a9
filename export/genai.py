"""ONNX Runtime GenAI's files for a bundle: genai_config.json and onnx/embed_genai.onnx.

ORT GenAI (0.18) runs a vision-language model as three sessions that genai_config.json names:

    vision     pixel_values (1,3,H,W) ─► image_features (1,K,D)   our vision_encoder.onnx as is
    embedding  input_ids (1,S) + image_features (1,K,D) ─► inputs_embeds (1,S,D)
               ORT GenAI does not scatter: the graph must. embed_genai.onnx is embed_tokens.onnx's
               nodes (any --dtype: the table stays in the embed graph's format) plus the scatter;
               at each generation step ORT GenAI feeds image_features with 0 rows
    decoder    our decoder_model_merged.onnx as is; ORT GenAI derives position_ids from the
               attention mask (compact) and grows the KV cache by concatenation
               (past_present_share_buffer false: the decoder's presents are past + new)

The model type: ORT GenAI has no LLaVA type and refuses unknown ones, so the config names
GENAI_MODEL_TYPE, gemma3, whose model is the generic multimodal pipeline (see WHY). The inputs
are set by hand (Generator.set_inputs: input_ids, pixel_values, num_image_tokens), so none of
ORT GenAI's own processors runs: pixels and prompt ids come from runtime.preprocess and the
bundle's tokenizer and template, as our runtime computes them.

A bundle ORT GenAI cannot run exactly (original position ids, a static vision batch above 1, no
eos id) gets no GenAI files; the manifest says why (ortgenai.unsupported).

Qwen2.5-VL (write_genai_qwen): ORT GenAI's own qwen2_5_vl type, which computes the M-RoPE
position ids itself from image_grid_thw over the full grid. An unpruned bundle (--method none)
runs as ours does (embed_genai.onnx takes image_features (T, D); genai_processor_config.json
configures its ort-extensions image processor); a pruned one cannot (QWEN_PRUNED says why).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from export.bundle import data_file
from export.dtypes import graph_bytes, save
from export.vision import ExportValidationError, cpu_session
from runtime import contract as C
from runtime.generator import scatter_features

WHY = (
    f"ORT GenAI {C.GENAI_VERSION} has no LLaVA type; {C.GENAI_MODEL_TYPE} is a multimodal type "
    "whose model is the generic vision -> embedding -> decoder pipeline with no special decoder "
    "handling: one vision run over 4-D pixel_values, plain position ids from the attention mask "
    "(the Qwen-VL types compute 3-D mRoPE positions), no per-image vision loop (mistral3), and "
    "rewind allowed (phi3v refuses it); its only Gemma-specific code is the image processor, "
    "which set_inputs bypasses"
)
_PREFIX = "genai/"  # names of the nodes and tensors the scatter adds (embed_tokens has none)


def unsupported(manifest: dict) -> str | None:
    """Why ORT GenAI cannot run this bundle as our runtime does, or None."""
    pruning, text = manifest[C.KEY_PRUNING], manifest[C.KEY_TEXT]
    batch = manifest[C.KEY_VISION].get(C.V_STATIC_BATCH)
    if pruning.get(C.P_POSITIONS) == C.POSITIONS_ORIGINAL:
        return (
            "ORT GenAI computes compact position ids (0..S-1 from the attention mask) and this "
            "bundle was exported with --positions original: re-export it with --positions "
            "compact (the default) to run it with ORT GenAI, or run it with python -m runtime.run"
        )
    if batch not in (None, 1):
        return (
            f"ORT GenAI runs one image per generator and this bundle's vision graph has a static "
            f"batch of {batch} (--batch): re-export it with --batch 1 or without --batch"
        )
    if not text[C.T_EOS]:
        return (
            "the checkpoint names no eos token id and ORT GenAI would stop at the pad id instead: "
            "set eos_token_id in its generation_config.json and re-export"
        )
    return None


def genai_config(manifest: dict) -> dict:
    """genai_config.json's content, every value from the manifest and every name from the
    contract. ORT GenAI refuses unknown keys, so only the ones its parser knows are written."""
    t = manifest[C.KEY_TEXT]
    past_key, past_value = C.past_names(C.GENAI_LAYER)
    present_key, present_value = C.present_names(C.GENAI_LAYER)
    model = {
        "type": C.GENAI_MODEL_TYPE,
        "context_length": t[C.T_MAX_POS],
        "vocab_size": t[C.T_VOCAB],
        "eos_token_id": t[C.T_EOS],
        # the runtime pads with 0 when the checkpoint has no pad id (runtime/generator.py)
        "pad_token_id": t[C.T_PAD] if t[C.T_PAD] is not None else 0,
        "image_token_id": t[C.T_IMAGE_TOKEN_ID],
        "decoder": {
            "filename": C.DECODER_ONNX,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "hidden_size": t[C.T_HIDDEN],
            "num_attention_heads": t[C.T_HEADS],
            "num_key_value_heads": t[C.T_KV_HEADS],
            "num_hidden_layers": t[C.T_LAYERS],
            "head_size": t[C.T_HEAD_DIM],
            "inputs": {
                "inputs_embeds": C.INPUTS_EMBEDS,
                "attention_mask": C.ATTENTION_MASK,
                "position_ids": C.POSITION_IDS,
                "past_key_names": past_key,
                "past_value_names": past_value,
            },
            "outputs": {
                "logits": C.LOGITS,
                "present_key_names": present_key,
                "present_value_names": present_value,
            },
        },
        "embedding": {
            "filename": C.GENAI_EMBED_ONNX,
            "inputs": {"input_ids": C.INPUT_IDS, "image_features": C.IMAGE_FEATURES},
            "outputs": {"inputs_embeds": C.INPUTS_EMBEDS},
        },
        "vision": {
            "filename": C.VISION_ONNX,
            "config_filename": C.GENAI_PROCESSOR_CONFIG,
            "inputs": {"pixel_values": C.PIXEL_VALUES},
            "outputs": {"image_features": C.IMAGE_FEATURES},
        },
    }
    if t[C.T_BOS] is not None:
        model["bos_token_id"] = t[C.T_BOS]
    search = {
        "do_sample": False,
        "num_beams": 1,
        "max_length": t[C.T_MAX_POS],
        "past_present_share_buffer": False,  # the decoder's KV grows by Concat, no fixed buffer
    }
    return {"model": model, "search": search}


def embed_genai(
    embed: onnx.ModelProto,
    image_token_id: int,
    hidden: int,
    features_axes: tuple = (C.AXIS_IMAGES, C.AXIS_IMAGE_TOKENS),
) -> onnx.ModelProto:
    """embed_tokens' graph with an image_features input scattered over the image tokens.

    input_ids (B,S) ─► [embed_tokens' nodes, unchanged] ─► tokens (B,S,D) ─► Reshape ─► (B*S,D) ─┐
       └─► Equal(image id) ─► Reshape (B*S) ─► NonZero (1,T) ─► Transpose ─► rows (T,1) ───────┤
    image_features (N,R,D) ─► Reshape ─► (N*R,D) ─────────────────────────────────────────────┤
                                 ScatterND(tokens, rows, features) (B*S,D) ◄──────────────────┘
                                 ─► Reshape to Shape(tokens) ─► inputs_embeds (B,S,D)

    Row-major: the i-th image token of the batch gets feature row i, which with K image tokens
    per row is row b's k-th token <- features[b, k], as runtime/generator.py and transformers.js
    scatter. T must equal N*R (ScatterND refuses otherwise); at generation steps both are 0.
    `features_axes`: image_features' axes before D, (num_images, image_tokens) by default; a
    Qwen2.5-VL bundle's are (image_tokens,) (2-D (T, D), as its vision graph returns them).
    `embed` is not modified; its initializers are reused as they are (external data stays so).
    """
    g = embed.graph
    tokens = _PREFIX + "token_embeds"
    nodes = []
    for node in g.node:  # embed_tokens' output becomes an internal tensor
        n = onnx.NodeProto()
        n.CopyFrom(node)
        n.output[:] = [tokens if o == C.INPUTS_EMBEDS else o for o in n.output]
        n.input[:] = [tokens if i == C.INPUTS_EMBEDS else i for i in n.input]
        nodes.append(n)

    def name(s: str) -> str:
        return _PREFIX + s

    consts = [
        helper.make_tensor(name("image_id"), TensorProto.INT64, [], [image_token_id]),
        helper.make_tensor(name("flat"), TensorProto.INT64, [1], [-1]),
        helper.make_tensor(name("rows_by_d"), TensorProto.INT64, [2], [-1, hidden]),
    ]
    step = [
        ("Equal", [C.INPUT_IDS, name("image_id")], "is_image"),  # (B,S) bool
        ("Reshape", [name("is_image"), name("flat")], "is_image_flat"),  # (B*S,)
        ("NonZero", [name("is_image_flat")], "image_pos"),  # (1,T) int64, ascending
        ("Transpose", [name("image_pos")], "rows"),  # (T,1)
        ("Reshape", [tokens, name("rows_by_d")], "tokens_flat"),  # (B*S,D)
        ("Reshape", [C.IMAGE_FEATURES, name("rows_by_d")], "features_flat"),  # (N*R,D)
        ("ScatterND", [name("tokens_flat"), name("rows"), name("features_flat")], "scattered"),
        ("Shape", [tokens], "shape"),  # [B,S,D]
    ]
    for op, inputs, out in step:
        nodes.append(helper.make_node(op, inputs, [name(out)], name=name(op + "_" + out)))
    nodes.append(
        helper.make_node(
            "Reshape", [name("scattered"), name("shape")], [C.INPUTS_EMBEDS], name=name("out")
        )
    )
    features = helper.make_tensor_value_info(
        C.IMAGE_FEATURES, TensorProto.FLOAT, [*features_axes, hidden]
    )
    graph = helper.make_graph(
        nodes,
        "embed_genai",
        [*g.input, features],
        list(g.output),
        initializer=[*g.initializer, *consts],
    )
    model = helper.make_model(graph, opset_imports=list(embed.opset_import))
    model.ir_version = embed.ir_version
    return model


def check_embed(
    root: Path, manifest: dict, seed: int = 0, k: int | None = None, flat: bool = False
) -> float:
    """Max |embed_genai - (embed_tokens + our runtime's scatter)| over a prompt with image
    tokens (batch 1 and 2), a text-only prompt and a generation step (0 feature rows). The
    same nodes compute the token embeddings, so anything but 0.0 fails the export.
    `k`: image tokens per prompt (default the manifest's K); `flat`: feed image_features as
    (rows, D), the Qwen2.5-VL graph's layout, instead of (images, K, D)."""
    t = manifest[C.KEY_TEXT]
    k = k or t[C.T_IMAGE_TOKENS]
    d, image_id, vocab = t[C.T_HIDDEN], t[C.T_IMAGE_TOKEN_ID], t[C.T_VOCAB]
    rng = np.random.default_rng(seed)
    genai, embed = cpu_session(root / C.GENAI_EMBED_ONNX), cpu_session(root / C.EMBED_ONNX)
    worst = 0.0
    for batch, images in ((1, True), (2, True), (1, False), (1, None)):
        s = 1 if images is None else k + 6  # None: one generated token
        ids = rng.integers(0, vocab, size=(batch, s), dtype=np.int64)
        ids[ids == image_id] = (image_id + 1) % vocab
        rows = k if images else 0
        if images:
            ids[:, 3 : 3 + k] = image_id  # the image inside the prompt, as a template puts it
        feats = rng.standard_normal((batch if images else 1, rows, d)).astype(np.float32)
        fed = feats.reshape(-1, d) if flat else feats
        try:
            (got,) = genai.run(None, {C.INPUT_IDS: ids, C.IMAGE_FEATURES: fed})
        except (Fail, InvalidArgument, RuntimeException) as e:  # e.g. ScatterND's row count
            raise ExportValidationError(
                f"{C.GENAI_EMBED_ONNX} cannot run on batch {batch} with {rows} feature rows "
                f"({e}): a bug in export/genai.py"
            ) from e
        (want,) = embed.run(None, {C.INPUT_IDS: ids})
        want = scatter_features(want, ids, 0, feats, image_id)
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        if diff != 0.0:
            raise ExportValidationError(
                f"{C.GENAI_EMBED_ONNX} differs from {C.EMBED_ONNX} + the runtime's scatter by "
                f"{diff:.3g} (batch {batch}, {rows} feature rows); shapes {got.shape} vs "
                f"{want.shape}: a bug in export/genai.py"
            )
        worst = max(worst, diff)
    return worst


def _write_embed(root: Path, manifest: dict, section: dict, features_axes: tuple) -> None:
    """onnx/embed_genai.onnx beside embed_tokens.onnx (sharing its external data), recorded in
    `manifest` (graphs, section.embedding / shared_data); check_embed is the caller's."""
    t = manifest[C.KEY_TEXT]
    # load_external_data=False: a table in embed_tokens.onnx_data stays there, and the new graph
    # (same folder) points at the same bytes instead of holding a second copy
    embed = onnx.load(str(root / C.EMBED_ONNX), load_external_data=False)
    path = root / C.GENAI_EMBED_ONNX
    save(embed_genai(embed, t[C.T_IMAGE_TOKEN_ID], t[C.T_HIDDEN], features_axes), path)
    onnx.checker.check_model(str(path))  # by path: shared external data is found beside it
    shared = data_file(root / C.EMBED_ONNX)
    if shared.is_file():
        section[C.GN_SHARED_DATA] = shared.relative_to(root).as_posix()
    dtype = manifest[C.KEY_GRAPHS][C.EMBED_ONNX][C.G_DTYPE]
    manifest[C.KEY_GRAPHS][C.GENAI_EMBED_ONNX] = {C.G_DTYPE: dtype, C.G_BYTES: graph_bytes(path)}
    section[C.GN_EMBED] = C.GENAI_EMBED_ONNX


def write_genai(root: Path, manifest: dict) -> None:
    """Write ORT GenAI's files into bundle folder `root` and record them in `manifest`.

    Call after the graphs are in their final dtype and before write_manifest hashes the files.
    Adds manifest[ortgenai], graphs[embed_genai] and validation[embed_genai_max_abs_diff].
    """
    reason = unsupported(manifest)
    section = {
        C.GN_MODEL_TYPE: C.GENAI_MODEL_TYPE,
        C.GN_WHY: WHY,
        C.GN_VERSION: C.GENAI_VERSION,
        C.GN_UNSUPPORTED: reason,
        C.GN_CONFIG: None,
        C.GN_EMBED: None,
        C.GN_SHARED_DATA: None,
    }
    manifest[C.KEY_GENAI] = section
    if reason is not None:
        print(f"      note: no ONNX Runtime GenAI files: {reason}", flush=True)
        return
    _write_embed(root, manifest, section, (C.AXIS_IMAGES, C.AXIS_IMAGE_TOKENS))
    manifest[C.KEY_VALIDATION][C.VAL_GENAI_EMBED] = check_embed(root, manifest)
    (root / C.GENAI_CONFIG).write_text(json.dumps(genai_config(manifest), indent=2) + "\n")
    section[C.GN_CONFIG] = C.GENAI_CONFIG
    print(f"      ONNX Runtime GenAI ({C.GENAI_MODEL_TYPE}): {C.GENAI_CONFIG}, "
          f"{C.GENAI_EMBED_ONNX} = {C.EMBED_ONNX} + scatter, identical embeddings")  # fmt: skip


# --- Qwen2.5-VL ---------------------------------------------------------------------------------
# ORT GenAI has a Qwen2.5-VL type of its own (MultiModalLanguageModel with QwenVisionState and
# Qwen2VLPositionInputs); the names below belong to it (not in runtime/contract.py: only this
# module and examples/ortgenai read them, the example through the manifest and genai_config.json).
QWEN_MODEL_TYPE = "qwen2_5_vl"
QWEN_WHY = (
    f"ORT GenAI {C.GENAI_VERSION}'s own Qwen2.5-VL type: one vision call per image over "
    "pixel_values (patches, C*T*P*P) + image_grid_thw, the embedding graph scatters the image "
    "features, and the decoder's (3, B, S) M-RoPE position ids are computed by ORT GenAI from "
    "image_grid_thw as transformers' get_rope_index does (every merged token of the full grid "
    "at its (t, h, w), the text after it from the grid's max + 1), which is our runtime's "
    "layout for a bundle that keeps every token"
)
QWEN_PRUNED = (
    f"ORT GenAI {C.GENAI_VERSION} computes Qwen2.5-VL's M-RoPE position ids itself from "
    "image_grid_thw over the full merged grid (t*h*w/merge^2 image tokens in raster order, the "
    "text after them from the grid's max + 1) and has no input for kept_indices or "
    "position_ids, so the K kept tokens would get the first K raster cells and the text after "
    "them image positions (or it throws when fewer than N-K tokens follow the image); its "
    "processor also writes N image pads for K feature rows. Export with --method none to run "
    "the model in ORT GenAI, or run this bundle with python -m runtime.run (a pruned bundle "
    "needs a change in ORT GenAI: a kept_indices or position_ids input for its Qwen position "
    "ids)"
)
# ortgenai.processor_config: the ort-extensions pipeline ORT GenAI's own QwenImageProcessor runs
# (genai_config.json's vision.config_filename), or null. The example sets our pixels by hand by
# default and runs this one with --genai-processor.
GN_PROCESSOR = "processor_config"
QWEN_PROCESSOR_CONFIG = C.GENAI_PROCESSOR_CONFIG  # HF's processor_config.json name stays free
# PIL resample ids -> ort-extensions Resize interpolation names
_INTERPOLATION = {0: "NEAREST", 2: "LINEAR", 3: "CUBIC", 1: "LANCZOS"}


def unsupported_qwen(manifest: dict) -> str | None:
    """Why ORT GenAI cannot run this Qwen2.5-VL bundle as our runtime does, or None."""
    pruning, text, vision = manifest[C.KEY_PRUNING], manifest[C.KEY_TEXT], manifest[C.KEY_VISION]
    if text[C.T_IMAGE_TOKENS] is not None:
        return QWEN_PRUNED
    if pruning.get(C.P_POSITIONS) == C.POSITIONS_COMPACT:
        return (
            f"ORT GenAI {C.GENAI_VERSION} computes Qwen2.5-VL's M-RoPE position ids from "
            "image_grid_thw (the image's (t, h, w) grid) and this bundle was exported with "
            "--positions compact (sequence indices on all three rows): re-export it with "
            "--positions original (the default) or run it with python -m runtime.run"
        )
    if vision.get(C.V_FIXED_SIZE):
        return (
            f"ORT GenAI {C.GENAI_VERSION} feeds image_grid_thw to the vision graph and this "
            "bundle's fixed-size vision graph (--image-size) has the grid built in, no "
            "image_grid_thw input: re-export it without --image-size"
        )
    if vision.get(C.V_RESAMPLE) not in _INTERPOLATION:
        return (
            f"the processor's resample {vision.get(C.V_RESAMPLE)} has no ort-extensions "
            "equivalent for ORT GenAI's image processor"
        )
    if not text[C.T_EOS]:
        return (
            "the checkpoint names no eos token id and ORT GenAI would stop at the pad id instead: "
            "set eos_token_id in its generation_config.json and re-export"
        )
    return None


def genai_config_qwen(manifest: dict, hf_config: dict) -> dict:
    """genai_config.json for ORT GenAI's qwen2_5_vl type: the LLaVA layout with the type, the
    vision special tokens (from the checkpoint's config.json, `hf_config`) and the grid input."""
    config = genai_config(manifest)
    model, vision = config["model"], manifest[C.KEY_VISION]
    model["type"] = QWEN_MODEL_TYPE
    # ORT GenAI finds an image as vision_start followed by image_token_id (default 0: none)
    model["vision_start_token_id"] = int(hf_config["vision_start_token_id"])
    model["video_token_id"] = int(hf_config["video_token_id"])
    tower = hf_config.get("vision_config", {})
    model["vision"] = {
        "filename": C.VISION_ONNX,
        "config_filename": QWEN_PROCESSOR_CONFIG,
        "spatial_merge_size": vision[C.V_MERGE_SIZE],
        "patch_size": vision[C.V_PATCH_SIZE],
        # t = 1 for an image: the temporal row stays 0 whatever the rate
        "tokens_per_second": float(tower.get("tokens_per_second", 2)),
        "inputs": {"pixel_values": C.PIXEL_VALUES, "image_grid_thw": C.IMAGE_GRID_THW},
        "outputs": {"image_features": C.IMAGE_FEATURES},
    }
    return config


def processor_config_qwen(manifest: dict) -> dict:
    """ort-extensions' image pipeline for ORT GenAI's QwenImageProcessor, from the manifest's
    vision facts (the effective rescale factor, mean and std: 1.0 / 0 / 1 when the processor
    skips that step). Its smart_resize rounds halves away from zero (transformers: to even) and
    its resize is PIL's C resampler on the decoded image: examples/ortgenai measures the
    difference from runtime.preprocess_qwen."""
    v = manifest[C.KEY_VISION]
    patch, merge = v[C.V_PATCH_SIZE], v[C.V_MERGE_SIZE]
    resize = {
        "smart_resize": 1, "min_pixels": v[C.V_MIN_PIXELS], "max_pixels": v[C.V_MAX_PIXELS],
        "patch_size": patch, "merge_size": merge, "interpolation": _INTERPOLATION[v[C.V_RESAMPLE]],
    }  # fmt: skip
    normalize = {  # qwen2_5_vl: its channel order (measured: without it R and B swap)
        "mean": [float(x) for x in v[C.V_IMAGE_MEAN]], "std": [float(x) for x in v[C.V_IMAGE_STD]],
        "qwen2_5_vl": 1,
    }  # fmt: skip
    temporal = v[C.V_TEMPORAL_PATCH]
    patches = {"patch_size": patch, "temporal_patch_size": temporal, "merge_size": merge}
    ops = [
        ("decode_image", "DecodeImage", {"color_space": "RGB"}),
        ("convert_to_rgb", "ConvertRGB", None),
        ("resize", "Resize", resize),
        ("rescale", "Rescale", {"rescale_factor": float(v[C.V_RESCALE])}),
        ("normalize", "Normalize", normalize),
        ("patch_image", "PatchImage", patches),
    ]
    transforms = []
    for name, kind, attrs in ops:
        op = {"name": name, "type": kind} | ({"attrs": attrs} if attrs else {})
        transforms.append({"operation": op})
    return {"processor": {"name": "qwen2_5_image_processor", "transforms": transforms}}


def write_genai_qwen(root: Path, manifest: dict) -> None:
    """write_genai for a Qwen2.5-VL bundle: genai_config.json (type qwen2_5_vl),
    onnx/embed_genai.onnx (image_features (T, D)) and genai_processor_config.json, recorded in
    `manifest` (ortgenai with processor_config, graphs, validation). A pruned bundle gets
    no files and ortgenai.unsupported says why (QWEN_PRUNED).

    Call after copy_side_files (config.json gives the vision token ids) and before
    write_manifest hashes the files."""
    reason = unsupported_qwen(manifest)
    section = {
        C.GN_MODEL_TYPE: QWEN_MODEL_TYPE,
        C.GN_WHY: QWEN_WHY,
        C.GN_VERSION: C.GENAI_VERSION,
        C.GN_UNSUPPORTED: reason,
        C.GN_CONFIG: None,
        C.GN_EMBED: None,
        C.GN_SHARED_DATA: None,
        GN_PROCESSOR: None,
    }
    manifest[C.KEY_GENAI] = section
    if reason is not None:
        print(f"      note: no ONNX Runtime GenAI files: {reason}", flush=True)
        return
    hf_config = json.loads((root / C.HF_CONFIG).read_text())
    _write_embed(root, manifest, section, (C.AXIS_IMAGE_TOKENS,))
    # any count: an unpruned prompt holds each image's N merged tokens
    check = check_embed(root, manifest, k=2 * manifest[C.KEY_VISION][C.V_MERGE_SIZE], flat=True)
    manifest[C.KEY_VALIDATION][C.VAL_GENAI_EMBED] = check
    config = genai_config_qwen(manifest, hf_config)
    (root / C.GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    processor = json.dumps(processor_config_qwen(manifest), indent=2) + "\n"
    (root / QWEN_PROCESSOR_CONFIG).write_text(processor)
    section[C.GN_CONFIG], section[GN_PROCESSOR] = C.GENAI_CONFIG, QWEN_PROCESSOR_CONFIG
    print(f"      ONNX Runtime GenAI ({QWEN_MODEL_TYPE}): {C.GENAI_CONFIG}, "
          f"{C.GENAI_EMBED_ONNX} = {C.EMBED_ONNX} + scatter, identical embeddings, "
          f"{QWEN_PROCESSOR_CONFIG}")  # fmt: skip
