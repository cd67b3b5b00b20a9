"""The bundle contract: every file name, graph I/O name, axis name and manifest key, defined once.

Export writes these, the runtime reads them, tests check them. Nothing here may import torch.
Axis names follow what optimum writes and transformers.js reads (unknown names resolve to 0 there).
"""

from __future__ import annotations

# 2: preprocessing flags (pad to square, no resize, exact resize size), scale-relative validation
# figures and the device self-test. A runtime that predates a flag must refuse the bundle rather
# than compute other pixels, so the exporter writes 2; this runtime still reads 1 (its vision
# section means the same here: absent flags keep the version-1 rules).
SCHEMA_VERSION = 2
READ_SCHEMAS = (1, 2)

# --- files (relative to the bundle root) -----------------------------------------------------
MANIFEST_FILE = "svdprune.json"
ONNX_DIR = "onnx"
VISION_ONNX = f"{ONNX_DIR}/vision_encoder.onnx"
EMBED_ONNX = f"{ONNX_DIR}/embed_tokens.onnx"
DECODER_ONNX = f"{ONNX_DIR}/decoder_model_merged.onnx"
GRAPH_FILES = (VISION_ONNX, EMBED_ONNX, DECODER_ONNX)
TOKENIZER_FILE = "tokenizer.json"  # the runtime's tokenizer
# The side files the export adapts so transformers.js loads the bundle unchanged
# (export/transformersjs.py); its session names are the graph file stems above.
HF_CONFIG = "config.json"
HF_PROCESSOR_CONFIG = "processor_config.json"
HF_PREPROCESSOR_CONFIG = "preprocessor_config.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE_JINJA = "chat_template.jinja"
HF_CHAT_TEMPLATE_JSON = "chat_template.json"
# Hugging Face side files copied beside the graphs when the checkpoint has them.
HF_SIDE_FILES = (
    HF_CONFIG,
    "generation_config.json",
    HF_PREPROCESSOR_CONFIG,
    HF_PROCESSOR_CONFIG,
    TOKENIZER_FILE,
    HF_TOKENIZER_CONFIG,
    "special_tokens_map.json",
    HF_CHAT_TEMPLATE_JSON,
    HF_CHAT_TEMPLATE_JINJA,
)
# The device self-test's reference (runtime/selftest.py): an .npz of these arrays.
SELFTEST_FILE = "selftest.npz"
ST_IMAGE = "image_{}"  # (h, w, 3) uint8 per photo: a few real photos, downscaled
ST_KEPT = "kept_indices"  # (B, K) int64 on the export's CPU run
ST_FEATURES = "image_features"  # (B, K, D) float32
ST_SCORES = "scores"  # (B, N) float32: PyTorch's selection scores (for the leverage mass)
ST_PROMPT = "prompt_ids"  # (S,) int64: a fixed question in the bundle's template
ST_TOKENS = "token_ids"  # (B, T) int64: greedy tokens, -1 after an early eos
ST_MARGIN = "first_margin"  # (B,) float32: first token's lead over the runner-up / max |logit|
TJS_CONFIG = "transformers.js_config"  # config.json block: {dtype, use_external_data_format}
TJS_DTYPE = "fp32"  # transformers.js dtype whose file suffix is "" (our fixed graph names)
ORT_DISABLE_PREPACKING = "session.disable_prepacking"  # an ONNX Runtime session config key
EXTERNAL_DATA_SUFFIX = "_data"  # decoder_model_merged.onnx -> decoder_model_merged.onnx_data
# ONNX Runtime GenAI's files (export/genai.py writes them, examples/ortgenai/ reads the bundle).
GENAI_CONFIG = "genai_config.json"  # the name ORT GenAI opens in the model folder
# input_ids + image_features -> inputs_embeds: embed_tokens' nodes plus the scatter, as ORT
# GenAI's "embedding" session (transformers.js and our runtime keep EMBED_ONNX)
GENAI_EMBED_ONNX = f"{ONNX_DIR}/embed_genai.onnx"
# genai_config.json's vision.config_filename: written only for an unpruned Qwen2.5-VL bundle (the
# ort-extensions pipeline of GenAI's own Qwen processor, export/genai.py); a LLaVA bundle's GenAI
# type never reads it. GenAI's default name, processor_config.json, is the HF processor's file.
GENAI_PROCESSOR_CONFIG = "genai_processor_config.json"
GENAI_FILES = (GENAI_CONFIG, GENAI_EMBED_ONNX)
# The ORT GenAI model type the config names, and the release it was checked against
# (export/genai.py says why; tests/test_ortgenai.py fails when the installed release differs).
GENAI_MODEL_TYPE = "gemma3"
GENAI_VERSION = "0.18.0"

# --- graph inputs / outputs ------------------------------------------------------------------
PIXEL_VALUES = "pixel_values"  # (batch_size, 3, H, W) float32
IMAGE_FEATURES = "image_features"  # (batch_size, K, D) float32
KEPT_INDICES = "kept_indices"  # (batch_size, K) int64, ascending
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
NUM_IMAGE_TOKENS = "num_image_tokens"  # ORT GenAI Generator input: (num_images,) int64, K each
PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"
# The decoder emits logits for the last position only: (batch_size, LOGITS_POSITIONS, vocab), a
# literal 1 (not a symbolic axis) for prefill and decode alike, so lm_head runs on one row per
# sequence. A client reading logits[:, -1] (ours, transformers.js) is unaffected; full-sequence
# scoring needs one step per token. The manifest says so: text.logits = LOGITS_LAST.
LOGITS_POSITIONS = 1


def past_names(layer: int | str) -> tuple[str, str]:
    """One layer's cache inputs (key, value): (batch, kv_heads, past, head_dim)."""
    return f"{PAST_PREFIX}.{layer}.key", f"{PAST_PREFIX}.{layer}.value"


def present_names(layer: int | str) -> tuple[str, str]:
    """One layer's cache outputs (key, value): (batch, kv_heads, past + seq, head_dim)."""
    return f"{PRESENT_PREFIX}.{layer}.key", f"{PRESENT_PREFIX}.{layer}.value"


GENAI_LAYER = "%d"  # ORT GenAI's layer placeholder: past_names(GENAI_LAYER) is its name pattern


# --- symbolic axis names ---------------------------------------------------------------------
AXIS_BATCH = "batch_size"
AXIS_SEQ = "sequence_length"
AXIS_PAST = "past_sequence_length"
AXIS_TOTAL = "past_sequence_length + sequence_length"
# GENAI_EMBED_ONNX's image_features (num_images, image_tokens, D): K rows per image at the
# prompt, 0 at each generation step
AXIS_IMAGES = "num_images"
AXIS_IMAGE_TOKENS = "image_tokens"

# --- manifest keys (svdprune.json) -----------------------------------------------------------
KEY_SCHEMA = "schema_version"
KEY_MODEL = "model"  # {family, source, name}
KEY_PRUNING = "pruning"
KEY_VISION = "vision"
KEY_TEXT = "text"
KEY_FILES = "files"  # {relative path: sha256}
KEY_EXPORTER = "exporter"  # {packages: {name: version}, opset}
KEY_VALIDATION = "validation"  # max differences measured against PyTorch at export
KEY_PROMPT = "prompt"  # {template, prompt_marker, image_placeholder, chat_template}
KEY_DTYPE = "dtype"  # the bundle variant: one of DTYPES (absent in older bundles: fp32)
KEY_GRAPHS = "graphs"  # {graph path: {dtype, bytes}}: what each graph file holds
KEY_SELFTEST = "selftest"  # {file, images, new_tokens}: the device self-test's reference
KEY_GENAI = "ortgenai"  # {model_type, why, version, unsupported, config, embedding, shared_data}

# pruning.*
P_K = "k"
P_N = "n"
P_METHOD = "method"
P_RANK = "rank"
P_ITERS = "iterations"
P_OVERSAMPLE = "oversample"
P_CENTER = "center"
P_SCORED = "scored_features"
P_SEED = "seed"
P_POSITIONS = "position_ids"  # "compact" (0..S-1) or "original" (kept tokens keep their slots)

# vision.*
V_FEATURE_LAYER = "feature_layer"
V_SELECT_STRATEGY = "select_strategy"
V_IMAGE_SIZE = "image_size"  # [H, W]
V_IMAGE_MEAN = "image_mean"
V_IMAGE_STD = "image_std"
V_RESAMPLE = "resample"  # PIL resample id
V_RESIZE = "resize_shortest_edge"
V_CROP = "crop"  # "center" or "none"
V_RESCALE = "rescale_factor"
V_TOWER = "tower"  # vision config model_type
V_STATIC_BATCH = "static_batch"  # int: the vision graph's fixed batch (--batch); null: dynamic
# Preprocessing, in transformers' order: convert RGB -> pad -> resize -> crop -> rescale ->
# normalize -> CHW (export/processor.py writes these, runtime/preprocess.py applies them). The keys
# above keep their meaning; every key below is optional, its default being older bundles' rule.
# V_RESCALE / V_IMAGE_MEAN / V_IMAGE_STD hold the *effective* values: 1.0 when the processor has
# do_rescale false, mean 0 / std 1 when do_normalize false (both exact no-ops on the pixels).
V_PROCESSOR = "image_processor"  # the HF slow processor class the pixels equal (checked at export)
V_CONVERT_RGB = "convert_rgb"  # its do_convert_rgb; the runtime converts any mode regardless
V_PAD = "pad"  # PAD_SQUARE or PAD_NONE (default)
V_PAD_COLOR = "pad_color"  # [r, g, b] ints 0..255: the fill of PAD_SQUARE, else null
V_DO_RESIZE = "do_resize"  # bool, default true; false: no resize (then V_CROP is "center")
V_RESIZE_SIZE = "resize_size"  # [H, W]: resize to exactly this; null: V_RESIZE or V_IMAGE_SIZE
V_DO_RESCALE = "do_rescale"  # bool, informational: V_RESCALE already holds the effective factor
V_DO_NORMALIZE = "do_normalize"  # bool, informational: mean/std already hold the effective values
# validation.*: runtime.preprocess vs the checkpoint's own image processor (export/processor.py)
VAL_PREPROCESS = "preprocess_max_abs_diff"  # float, must be 0.0: pixels are bit-exact
VAL_PREPROCESS_IMAGES = "preprocess_images"  # how many images (photos and variants) were compared

# validation.* (figures measured at export; the floors are in runtime/parity.py)
VAL_FEATURES_REL = "image_features_rel_diff"  # max |ORT - torch| / max |torch|, agreeing rows
VAL_SELECTION = "kept_indices"  # {agreement_min, agreement_mean, mass_min, mass_mean}
VAL_DECODER_REL = "decoder_rel_diff"  # worst over logits and presents, each relative to its scale
VAL_GENAI_EMBED = "embed_genai_max_abs_diff"  # GENAI_EMBED_ONNX vs embed_tokens + scatter: 0.0

# text.*
T_IMAGE_TOKEN_ID = "image_token_id"
T_IMAGE_TOKENS = "image_tokens_per_image"  # = K
T_MODEL_TYPE = "model_type"
T_HIDDEN = "hidden_size"
T_LAYERS = "num_layers"
T_HEADS = "num_attention_heads"
T_KV_HEADS = "num_kv_heads"
T_HEAD_DIM = "head_dim"
T_VOCAB = "vocab_size"
T_EOS = "eos_token_id"  # list of ids
T_PAD = "pad_token_id"
T_BOS = "bos_token_id"
T_MAX_POS = "max_position_embeddings"
T_DTYPE = "dtype"
T_LOGITS = "logits"  # which positions the decoder's logits cover: LOGITS_LAST (absent: all, S)

# prompt.*
PR_TEMPLATE = "template"  # one user turn with the image, rendered, with PR_MARKER for the text
PR_MARKER = "prompt_marker"
PR_IMAGE = "image_placeholder"  # expanded by the runtime to exactly K image tokens
PR_CHAT = "chat_template"  # the checkpoint's jinja template, for multi-turn chat (or null)

# selftest.*
S_FILE = "file"
S_IMAGES = "images"
S_NEW_TOKENS = "new_tokens"
S_PIXELS_SHA256 = "pixels_sha256"  # of the photos' float32 pixel_values at export

# ortgenai.* (export/genai.py)
GN_MODEL_TYPE = "model_type"  # GENAI_MODEL_TYPE
GN_WHY = "why"  # why that type: one sentence
GN_VERSION = "version"  # GENAI_VERSION: the ORT GenAI release the files were made for
GN_UNSUPPORTED = "unsupported"  # null, or why ORT GenAI cannot run this bundle (then no files)
GN_CONFIG = "config"  # GENAI_CONFIG, or null
GN_EMBED = "embedding"  # GENAI_EMBED_ONNX, or null
# the external-data file embed_genai reads with EMBED_ONNX (one copy of the table on disk; not
# counted again in graphs.<GENAI_EMBED_ONNX>.bytes), or null: its table is its own
GN_SHARED_DATA = "shared_data"

# graphs.<path>.*
G_DTYPE = "dtype"  # one of DTYPES: the weights' format inside that graph (graph I/O stays float32)
G_BYTES = "bytes"  # file size including its external data

# --- values ----------------------------------------------------------------------------------
SCORED_VISION = "vision"
SCORED_PROJECTED = "projected"
SCORED_CHOICES = (SCORED_VISION, SCORED_PROJECTED)
POSITIONS_COMPACT = "compact"
POSITIONS_ORIGINAL = "original"
POSITIONS_CHOICES = (POSITIONS_COMPACT, POSITIONS_ORIGINAL)
DECODER_EXPORTERS = ("optimum", "torch")
CROP_CENTER = "center"  # vision.crop: center crop to V_IMAGE_SIZE (zero-pads a smaller image)
CROP_NONE = "none"
# vision.pad: PAD_SQUARE centres the RGB image on a max(H, W) square of V_PAD_COLOR before the
# resize (offset floored): LlavaImageProcessor do_pad, LLaVA-1.5's expand2square.
PAD_SQUARE = "square"
PAD_NONE = "none"
LOGITS_LAST = "last"  # text.logits: (batch_size, 1, vocab), the last position's only

# Bundle variants (python -m export --dtype, make export DTYPE=...). Every variant keeps float32
# graph inputs/outputs (as transformers.js ships them), so the runtime handles each unchanged.
DTYPE_FP32 = "fp32"
DTYPE_FP16 = "fp16"  # fp16 weights and activations; the leverage scoring stays float32
DTYPE_INT8 = "int8"  # dynamic int8 quantisation (MatMulInteger; CPU kernels only)
DTYPE_Q4 = "q4"  # 4-bit weight-only blocks of 32 (MatMulNBits, GatherBlockQuantized)
DTYPE_Q4F16 = "q4f16"  # q4 weights over an fp16 graph
DTYPES = (DTYPE_FP32, DTYPE_FP16, DTYPE_INT8, DTYPE_Q4, DTYPE_Q4F16)

# --- the verification stamp (runtime/bundle.py): outside the bundle, never inside it ---------
# A stamp records which listed files were hashed and their filesystem identity, so a later open
# checks stat() only. It lives in the user's cache, ($XDG_CACHE_HOME or ~/.cache)/STAMP_CACHE_DIR/
# <sha256 of the bundle's resolved path>.json, or, with no writable cache, beside the bundle as
# <bundle>STAMP_SUFFIX.
STAMP_CACHE_DIR = "svdprune-onnx/verified"
STAMP_SUFFIX = ".verified.json"
STAMP_VERSION = 1
SK_VERSION = "stamp_version"
SK_BUNDLE = "bundle"  # the bundle's resolved path: a stamp for another folder is ignored
SK_MANIFEST = "manifest_sha256"  # of svdprune.json's bytes: a changed manifest voids the stamp
SK_FILES = "files"  # {relative path: {sha256, size, mtime_ns, ctime_ns, ino, dev}}
SK_SHA256 = "sha256"
SK_STAT = ("size", "mtime_ns", "ctime_ns", "ino", "dev")  # os.stat_result st_<name>

# --- Qwen2-VL / Qwen2.5-VL preprocessing (runtime/preprocess_qwen.py) --------------------------
# A Qwen bundle's vision section keeps V_PROCESSOR, V_CONVERT_RGB, V_DO_RESIZE, V_RESAMPLE,
# V_DO_RESCALE, V_RESCALE, V_DO_NORMALIZE, V_IMAGE_MEAN and V_IMAGE_STD above (same meanings,
# effective values) and adds these. V_PAD / V_CROP / V_RESIZE / V_RESIZE_SIZE must be absent
# or none there: Qwen2VLImageProcessor neither pads nor crops.
QWEN_PROCESSOR = "Qwen2VLImageProcessor"  # V_PROCESSOR of such a bundle (the slow class)
V_MIN_PIXELS = "min_pixels"  # int: smart_resize's floor on H*W (the processor's min_pixels)
V_MAX_PIXELS = "max_pixels"  # int: its ceiling on H*W (the processor's max_pixels)
V_PATCH_SIZE = "patch_size"  # int: the vision tower's spatial patch (14)
V_TEMPORAL_PATCH = "temporal_patch_size"  # int: frames per patch; a still image is repeated (2)
V_MERGE_SIZE = "merge_size"  # int: patches merged per side into one LLM token (2)
# [H, W], multiples of patch_size * merge_size: resize every image to exactly this (a static
# vision graph, e.g. TensorRT), NOT what the processor does; absent or null: smart_resize.
V_FIXED_SIZE = "fixed_size"
# The vision keys only a Qwen2.5-VL bundle carries (LLaVA readers, e.g. preprocess.mjs, never see
# them; V_PATCH_SIZE is written for both families).
QWEN_VISION_KEYS = (V_MIN_PIXELS, V_MAX_PIXELS, V_TEMPORAL_PATCH, V_MERGE_SIZE, V_FIXED_SIZE)
# Videos (Qwen2.5-VL): each frame smart-resized with these instead of V_MIN/MAX_PIXELS (the
# checkpoint's video_preprocessor_config.json, else Qwen2VLVideoProcessor's defaults), and the
# M-RoPE time step: t index = slice * int(temporal_patch_size / fps) * V_TOKENS_PER_SECOND.
V_VIDEO_MIN_PIXELS = "video_min_pixels"
V_VIDEO_MAX_PIXELS = "video_max_pixels"
V_TOKENS_PER_SECOND = "tokens_per_second"
QWEN_VISION_KEYS += (V_VIDEO_MIN_PIXELS, V_VIDEO_MAX_PIXELS, V_TOKENS_PER_SECOND)
T_VIDEO_TOKEN_ID = "video_token_id"  # text.*: the token a video block repeats (Qwen2.5-VL)
PR_VIDEO = "video_placeholder"  # prompt.*: the chat template's video token (Qwen2.5-VL)
# pruning.video: how a video's tokens are pruned. VIDEO_PER_SLICE: K per temporal slice (the
# image graph on each slice of temporal_patch_size frames; LLaVA: K per frame, each an image).
P_VIDEO = "video"
VIDEO_PER_SLICE = "per_slice"
# The Qwen vision graph's second input, beside PIXEL_VALUES ((patches, C*T*P*P) float32 there):
IMAGE_GRID_THW = "image_grid_thw"  # (num_images, 3) int64: (t, h, w) patches per image

# --- Qwen2.5-VL decoder (export/qwen_decoder.py, runtime/mrope.py) ----------------------------
# The Qwen decoder graph keeps every name and axis above except POSITION_IDS, which carries the
# three M-RoPE rows (temporal, height, width): (MROPE_ROWS, batch_size, sequence_length) int64,
# a literal 3 (not a symbolic axis). runtime/mrope.py computes them; text has equal rows.
MROPE_ROWS = 3
MROPE_POSITION_AXES = (MROPE_ROWS, AXIS_BATCH, AXIS_SEQ)

# --- Qwen2.5-VL vision graph (export/qwen_vision.py, runtime/qwen_vision_inputs.py) -----------
# Dynamic graph: inputs (PIXEL_VALUES (AXIS_PATCHES, C*T*P*P) float32, IMAGE_GRID_THW (1, 3)),
# one still image per call; a fixed-size graph takes PIXEL_VALUES only (the grid is built in).
# Outputs IMAGE_FEATURES (K, D) and KEPT_INDICES (K,) int64 ascending, indices into the merged
# grid row-major over (t, h/merge, w/merge); method none: AXIS_IMAGE_TOKENS rows, all of them.
AXIS_PATCHES = "num_patches"
QWEN_VISION_INPUTS = (PIXEL_VALUES, IMAGE_GRID_THW)
P_SCORE_SITE = "score_site"  # pruning.score_site: svdprune_onnx.qwen_vision.SCORE_SITES
P_SITE_CHOICE = "score_site_evidence"  # the measurement behind the default site (SITE_CHOICE)
P_MIN_TOKENS = "min_tokens"  # fewest merged tokens an image must give (K, or the rank r)
P_N_MAX = "n_max"  # most merged tokens one image may give (the graph's constants' size)
# A Qwen bundle's text.image_tokens is K, or null for method none (N varies with the image).
FAMILY_LLAVA = "llava"  # model.family of a LLaVA bundle (the checkpoint's model_type)
FAMILY_QWEN25VL = "qwen2_5_vl"  # model.family of a Qwen2.5-VL bundle
