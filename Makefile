# svdprune-onnx: two commands on a fresh machine.
#   make export K=16   -> build/tiny-llava-k16/ (creates .venv, installs pinned deps, builds the tiny model)
#   make run           -> answers a question with the bundle `make export` writes for the same
#                         variables (exported first if missing); IMAGE=, PROMPT=
#   make test          -> the CPU test suite that CI runs
# Variables for export: K, MODEL (local HF LLaVA checkpoint dir) or PRESET=medium, METHOD, RANK,
# ITERS, CENTER, SCORE, POSITIONS, DECODER_EXPORTER, OUT, DTYPE (fp32|fp16|int8|q4|q4f16), BATCH,
# QUALITY_GATE (fail|warn: a variant past its tolerance fails the export, or is kept and recorded),
# FAMILY (llava | qwen2.5-vl: the built-in model when no MODEL), IMAGE_SIZE (Qwen2.5-VL: HxW, a
# static vision graph), SCORE_SITE (Qwen2.5-VL: merged | merger_input | patches).

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
K       ?= 16

# Only pass the options that were given, so the CLI's defaults stay the single source of truth.
EXPORT_ARGS := --k $(K)
ifdef MODEL
EXPORT_ARGS += -m $(MODEL)
endif
ifdef PRESET
EXPORT_ARGS += --preset $(PRESET)
endif
ifdef DECODER_EXPORTER
EXPORT_ARGS += --decoder-exporter $(DECODER_EXPORTER)
endif
ifdef POSITIONS
EXPORT_ARGS += --positions $(POSITIONS)
endif
ifdef METHOD
EXPORT_ARGS += --method $(METHOD)
endif
ifdef RANK
EXPORT_ARGS += --rank $(RANK)
endif
ifdef ITERS
EXPORT_ARGS += --iters $(ITERS)
endif
ifdef CENTER
EXPORT_ARGS += --center $(CENTER)
endif
ifdef SCORE
EXPORT_ARGS += --score $(SCORE)
endif
ifdef OUT
EXPORT_ARGS += -o $(OUT)
endif
ifdef DTYPE
EXPORT_ARGS += --dtype $(DTYPE)
endif
ifdef BATCH
EXPORT_ARGS += --batch $(BATCH)
endif
ifdef FAMILY
EXPORT_ARGS += --family $(FAMILY)
endif
ifdef IMAGE_SIZE
EXPORT_ARGS += --image-size $(IMAGE_SIZE)
endif
ifdef SCORE_SITE
EXPORT_ARGS += --score-site $(SCORE_SITE)
endif
ifdef QUALITY_GATE
EXPORT_ARGS += --quality-gate $(QUALITY_GATE)
endif

.PHONY: venv export run test lint format bench-fidelity bench-overhead clean

venv: $(STAMP)

# torch is installed on its own first so that nothing else can resolve it to a CUDA build.
# onnxruntime-genai comes last, with --no-deps: its `onnxruntime` dependency would replace
# onnxruntime-gpu's files. Its pin is the "# no-deps:" line of requirements/dev.txt.
$(STAMP): pyproject.toml $(wildcard requirements/*.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps $$(sed -n 's/^# no-deps: //p' requirements/dev.txt)
	touch $(STAMP)

export: $(STAMP)
	$(PY) -m export $(EXPORT_ARGS)

# Answer a question about a real photo with the bundle `make export` writes for the same
# variables (K, MODEL or PRESET, DTYPE, OUT, ...), exporting it first if missing. The folder comes
# from the export CLI itself (--print-out), the one place that names bundles. VIDEO=path (a
# video file, GIF or folder of frames) [FRAMES=8] adds a clip to the same prompt as the image.
IMAGE  ?= ../shared/data/images/coco_cats.png
PROMPT ?= What is in the image?
run: $(STAMP)
	bundle="$$($(PY) -m export $(EXPORT_ARGS) --print-out)" && \
	{ test -f "$$bundle/svdprune.json" || $(PY) -m export $(EXPORT_ARGS); } && \
	$(PY) -m runtime.run -m "$$bundle" -i $(IMAGE) -p "$(PROMPT)" --max-new-tokens 32 --timings \
		$(if $(VIDEO),--video $(VIDEO) --frames $(or $(FRAMES),8))

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench-fidelity: $(STAMP)
	$(PY) -m bench.fidelity

bench-overhead: $(STAMP)
	$(PY) -m bench.overhead

clean:
	rm -rf build

# Latency across K (runtime.profile + transformers side by side; exports missing bundles):
#   make profile [KS="576 64 32 16"] [REPS=5] [PRESET=medium | MODEL=dir] [PROVIDER=cpu] [TRACE=1]
#                [NO_TORCH=1] [TORCH_THREADS=1]
# FAMILY=qwen2.5-vl: bench.qwen_profile instead, K x image size (448x448, 1008x1008, 2 MP):
#   make profile FAMILY=qwen2.5-vl [PRESET=medium | MODEL=dir] [KS="all 256 64 16"] [REPS=2]
# VIDEO= or FRAMES=: bench.video_profile instead, frames x K (TTFT, KV bytes, prefill FLOPs, pruned
# vs unpruned) -> build/profile/video.{json,md}; VIDEO=pan (or FRAMES alone) is the built-in clip,
# a camera pan over a real photo; else a video file, animated GIF or folder of frames:
#   make profile VIDEO=pan FRAMES="4 8 16" [FAMILY=llava|qwen2.5-vl] [PRESET=medium | MODEL=dir]
#                [KS="all 64 16"] [REPS=1]
.PHONY: profile
ifneq ($(VIDEO)$(FRAMES),)
profile: $(STAMP)
	$(PY) -m bench.video_profile --family $(or $(FAMILY),llava) --video $(or $(VIDEO),pan) \
		--frames $(or $(FRAMES),4 8 16) --k $(or $(KS),all 64 16) --reps $(or $(REPS),1) \
		$(if $(MODEL),-m $(MODEL)) $(if $(PRESET),--preset $(PRESET))
else ifeq ($(FAMILY),qwen2.5-vl)
profile: $(STAMP)
	$(PY) -m bench.qwen_profile --k $(or $(KS),all 256 64 16) --reps $(or $(REPS),2) \
		$(if $(MODEL),-m $(MODEL)) $(if $(PRESET),--preset $(PRESET))
else
profile: $(STAMP)
	$(PY) -m bench.profile --k $(or $(KS),N 64 32 16) --reps $(or $(REPS),5) \
		$(if $(MODEL),-m $(MODEL)) $(if $(PRESET),--preset $(PRESET)) \
		$(if $(PROVIDER),--provider $(PROVIDER)) $(if $(TRACE),--trace) $(if $(NO_TORCH),--no-torch) \
		$(if $(TORCH_THREADS),--torch-threads $(TORCH_THREADS))
endif

# `make eval`: POPE-style yes/no questions from ../shared/data/coco128 (or DATA=file.jsonl) through
# the unpruned bundle and every METHOD at every K (exporting what is missing into
# build/eval/bundles); writes build/eval/results.{json,csv,md,png} and images.json. Resumable.
# Variables: MODEL or PRESET, KS="16 32 64", METHODS="gram power exact ...", LIMIT (images),
# DATA, ANSWER=logits|text, PROVIDER, EVAL_OUT, FAMILY=qwen2.5-vl, POSITIONS="original compact"
# (each pruned bundle once per position mode; Qwen's default: both).
.PHONY: eval
eval: $(STAMP)
	$(PY) -m eval $(if $(MODEL),-m $(MODEL)) $(if $(PRESET),--preset $(PRESET)) \
		$(if $(KS),--k $(KS)) $(if $(METHODS),--methods $(METHODS)) \
		$(if $(LIMIT),--limit $(LIMIT)) $(if $(DATA),--data $(DATA)) \
		$(if $(ANSWER),--answer $(ANSWER)) $(if $(PROVIDER),--provider $(PROVIDER)) \
		$(if $(EVAL_OUT),-o $(EVAL_OUT)) $(if $(FAMILY),--family $(FAMILY)) \
		$(if $(POSITIONS),--positions $(POSITIONS))

# 1000 runtime calls in one process on the tiny default (exported if missing): RSS growth, slope.
.PHONY: soak
soak: $(STAMP)
	$(PY) -m bench.soak

# One command for a GPU machine: medium preset x K = N/64/16 x fp32/q4f16, self-test, tokens vs CPU
# on CUDA and TensorRT, CUDA profile -> build/gpu-check/report.{json,md}. On a CPU machine it
# says there is no GPU and exits 0.
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check

# Our runtime vs ONNX Runtime GenAI, transformers.js (Node) and PyTorch eager generate on one
# bundle (exported if missing), one interleaved run, each peer a fresh process per repetition:
# TTFT and its stages, decode tokens/s, peak RSS, ratios to ours, greedy-token agreement ->
# build/bench-peers/<preset>-k<K>.{json,png}.
#   make bench-peers [PRESET=tiny|medium] [K=16] [IMAGE=...] [PROMPT=...] [TOKENS=32] [REPS=3]
#                    [THREADS=1]
.PHONY: bench-peers
bench-peers: $(STAMP)
	$(PY) -m bench.peers --preset $(or $(PRESET),tiny) --k $(K) --image $(IMAGE) \
		--prompt "$(PROMPT)" --tokens $(or $(TOKENS),32) --reps $(or $(REPS),3) \
		$(if $(THREADS),--threads $(THREADS))

# Serving (README "Serving"): the bundle `make run` would use (the same variables; exported first
# if missing) behind an OpenAI-compatible endpoint.
#   make serve [PORT=8080] [HOST=127.0.0.1] [PROVIDER=cpu] [THREADS=1] [MAX_BATCH=8]
#              [ALLOWED_DIR=dir]                       -> python -m runtime.serve
#   make serve-ray [RAY_ADDRESS=head:6379] [REPLICAS=2] [PORT=8000] ...
#                                                      -> python -m runtime.serve_ray (Ray Serve;
#                                                         no RAY_ADDRESS: a local Ray instance)
#   make bench-serve [REQUESTS=48] [CONCURRENCY="1 4 16"] [RAY_REPLICAS="1 2"] [TOKENS=32]
#                                                      -> bench.serve_load on 127.0.0.1
ENSURE_BUNDLE = bundle="$$($(PY) -m export $(EXPORT_ARGS) --print-out)" && \
	{ test -f "$$bundle/svdprune.json" || $(PY) -m export $(EXPORT_ARGS); }
SERVE_ARGS = $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST)) \
	$(if $(PROVIDER),--provider $(PROVIDER)) $(if $(THREADS),--threads $(THREADS)) \
	$(if $(MAX_BATCH),--max-batch $(MAX_BATCH)) $(if $(ALLOWED_DIR),--allowed-dir $(ALLOWED_DIR))
.PHONY: serve serve-ray bench-serve
serve: $(STAMP)
	$(ENSURE_BUNDLE) && $(PY) -m runtime.serve -m "$$bundle" $(SERVE_ARGS)

serve-ray: $(STAMP)
	$(ENSURE_BUNDLE) && $(PY) -m runtime.serve_ray -m "$$bundle" $(SERVE_ARGS) \
		$(if $(RAY_ADDRESS),--address $(RAY_ADDRESS)) $(if $(REPLICAS),--replicas $(REPLICAS))

bench-serve: $(STAMP)
	$(ENSURE_BUNDLE) && $(PY) -m bench.serve_load -m "$$bundle" --requests $(or $(REQUESTS),48) \
		--concurrency $(or $(CONCURRENCY),1 4 16) --ray-replicas $(or $(RAY_REPLICAS),1 2) \
		--max-tokens $(or $(TOKENS),32) $(if $(PROVIDER),--provider $(PROVIDER)) \
		$(if $(THREADS),--threads $(THREADS))
