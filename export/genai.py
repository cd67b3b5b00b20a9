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


def embed_genai(embed: onnx.ModelProto, image_token_id: int, hidden: int) -> onnx.ModelProto:
    """embed_tokens' graph with an image_features input scattered over the image tokens.

    input_ids (B,S) ─► [embed_tokens' nodes, unchanged] ─► tokens (B,S,D) ─► Reshape ─► (B*S,D) ─┐
       └─► Equal(image id) ─► Reshape (B*S) ─► NonZero (1,T) ─► Transpose ─► rows (T,1) ───────┤
    image_features (N,R,D) ─► Reshape ─► (N*R,D) ─────────────────────────────────────────────┤
                                 ScatterND(tokens, rows, features) (B*S,D) ◄──────────────────┘
                                 ─► Reshape to Shape(tokens) ─► inputs_embeds (B,S,D)

    Row-major: the i-th image token of the batch gets feature row i, which with K image tokens
    per row is row b's k-th token <- features[b, k], as runtime/generator.py and transformers.js
    scatter. T must equal N*R (ScatterND refuses otherwise); at generation steps both are 0.
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
        C.IMAGE_FEATURES, TensorProto.FLOAT, [C.AXIS_IMAGES, C.AXIS_IMAGE_TOKENS, hidden]
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


def check_embed(root: Path, manifest: dict, seed: int = 0) -> float:
    """Max |embed_genai - (embed_tokens + our runtime's scatter)| over a prompt with image
    tokens (batch 1 and 2), a text-only prompt and a generation step (0 feature rows). The
    same nodes compute the token embeddings, so anything but 0.0 fails the export."""
    t = manifest[C.KEY_TEXT]
    k, d, image_id, vocab = t[C.T_IMAGE_TOKENS], t[C.T_HIDDEN], t[C.T_IMAGE_TOKEN_ID], t[C.T_VOCAB]
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
        try:
            (got,) = genai.run(None, {C.INPUT_IDS: ids, C.IMAGE_FEATURES: feats})
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
    t = manifest[C.KEY_TEXT]
    # load_external_data=False: a table in embed_tokens.onnx_data stays there, and the new graph
    # (same folder) points at the same bytes instead of holding a second copy
    embed = onnx.load(str(root / C.EMBED_ONNX), load_external_data=False)
    path = root / C.GENAI_EMBED_ONNX
    save(embed_genai(embed, t[C.T_IMAGE_TOKEN_ID], t[C.T_HIDDEN]), path)
    onnx.checker.check_model(str(path))  # by path: shared external data is found beside it
    shared = data_file(root / C.EMBED_ONNX)
    if shared.is_file():
        section[C.GN_SHARED_DATA] = shared.relative_to(root).as_posix()
    manifest[C.KEY_VALIDATION][C.VAL_GENAI_EMBED] = check_embed(root, manifest)
    dtype = manifest[C.KEY_GRAPHS][C.EMBED_ONNX][C.G_DTYPE]
    manifest[C.KEY_GRAPHS][C.GENAI_EMBED_ONNX] = {C.G_DTYPE: dtype, C.G_BYTES: graph_bytes(path)}
    (root / C.GENAI_CONFIG).write_text(json.dumps(genai_config(manifest), indent=2) + "\n")
    section[C.GN_CONFIG], section[C.GN_EMBED] = C.GENAI_CONFIG, C.GENAI_EMBED_ONNX
    print(f"      ONNX Runtime GenAI ({C.GENAI_MODEL_TYPE}): {C.GENAI_CONFIG}, "
          f"{C.GENAI_EMBED_ONNX} = {C.EMBED_ONNX} + scatter, identical embeddings")  # fmt: skip
