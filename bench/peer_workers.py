"""The Python peers of bench/peers.py: one timed answer in this process, written as JSON.

    python -m bench.peer_workers NAME REQUEST.json OUT.json     (bench/peers.py starts it)
      NAME: ours | genai | torch; REQUEST: {bundle, image, prompt, max_new_tokens, threads,
      provider, warmup}
      load the peer ─► (warm-up answer) ─► timed answer ─► + load_ms, VmHWM ─► OUT
      timed: t0 ─► image file + prompt ─► inputs (t1) ─► vision+prune ─► prefill ─► token times

OUT: token_ids, stages_ms {preprocess, vision, prefill} (None where the peer does not split
them), ttft_ms, decode_ms (first -> last token), decode_in_graph_ms (None where unknown),
load_ms, peak_rss_kib. examples/node/peer_timing.mjs writes the same for transformers.js.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from runtime import contract as C
from runtime.profile import status_kb

REPO = Path(__file__).resolve().parents[1]
GENAI_EXAMPLE = REPO / "examples" / "ortgenai" / "generate.py"
GENAI_SESSIONS = ("decoder", "vision", "embedding")  # genai_config.json's model.* sessions


def _answer(t0: float, t1: float, ids: list[int], vision_ms, prefill_ms, times, in_graph=None):
    """A worker's result from its clock readings: t0 before the image file is read, t1 when
    the inputs are ready, `times` the perf_counter of each new token."""
    return {
        "token_ids": [int(i) for i in ids],
        "stages_ms": {"preprocess": (t1 - t0) * 1e3, "vision": vision_ms, "prefill": prefill_ms},
        "ttft_ms": (times[0] - t0) * 1e3,
        "decode_ms": (times[-1] - times[0]) * 1e3,
        "decode_in_graph_ms": in_graph,
    }


def worker_ours(req: dict):
    """runtime.generate.Pipeline, as runtime.run drives it (CPU provider)."""
    from runtime.generate import Pipeline, Sampling
    from runtime.preprocess import load_image, preprocess_batch
    from runtime.session import SessionConfig

    pipe = Pipeline(Path(req["bundle"]), SessionConfig(req["provider"], req["threads"]))

    def answer() -> dict:
        times: list[float] = []
        t0 = time.perf_counter()
        pixels = preprocess_batch([load_image(req["image"])], pipe.m[C.KEY_VISION])
        ids = pipe.prompt_ids(req["prompt"])
        t1 = time.perf_counter()
        on_token = lambda _row, _tok: times.append(time.perf_counter())  # noqa: E731
        (r,) = pipe.generate(pixels, [ids], Sampling(req["max_new_tokens"]), on_token)
        t = r.timings_ms
        return _answer(t0, t1, r.token_ids, t["vision"], t["embed"] + t["prefill"], times,
                       t["decode_in_graph"])  # fmt: skip

    return answer


def worker_genai(req: dict):
    """ONNX Runtime GenAI's C++ loop through the repo's example (examples/ortgenai/generate.py,
    GenaiRunner: our pixels and prompt ids, set_inputs, generate_next_token). It does not
    split vision from prefill: both are set_inputs' (plus the first pick)."""
    spec = importlib.util.spec_from_file_location("ortgenai_generate", GENAI_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    if req["threads"]:  # the example has no thread option: overlay genai_config.json's
        og = example.import_genai()
        opts = {"intra_op_num_threads": req["threads"], "inter_op_num_threads": 1}
        overlay = {"model": {s: {"session_options": opts} for s in GENAI_SESSIONS}}

        def config(path: str):
            cfg = og.Config(path)
            cfg.overlay(json.dumps(overlay))
            return cfg

        names = ("Model", "GeneratorParams", "Generator", "NamedTensors", "__version__")
        patched = SimpleNamespace(Config=config, **{n: getattr(og, n) for n in names})
        example.import_genai = lambda: patched
    runner = example.GenaiRunner(Path(req["bundle"]))

    def answer() -> dict:
        out = runner.answer(req["image"], req["prompt"], req["max_new_tokens"])
        t = out["timings_ms"]
        stages = {"preprocess": t["preprocess"] + t["prompt"], "vision": None, "prefill": None}
        return {"token_ids": out["token_ids"], "stages_ms": stages,
                "ttft_ms": stages["preprocess"] + t["prefill"] + t["first_token"],
                "decode_ms": t["decode"], "decode_in_graph_ms": None}  # fmt: skip

    return answer


def worker_torch(req: dict):
    """transformers' eager generate on the source checkpoint, fed the same pruned features
    (tests/test_end_to_end.py's torch_reference): PrunedVision ─► scatter ─► generate."""
    import torch
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from export.load import load_image_processor, load_llava
    from export.manifest import prune_config
    from runtime.preprocess import load_image
    from svdprune_onnx.vision import PrunedVision

    if req["threads"]:
        torch.set_num_threads(req["threads"])
    m = json.loads((Path(req["bundle"]) / C.MANIFEST_FILE).read_text())
    src = Path(m[C.KEY_MODEL]["source"])
    model, processor = load_llava(src), load_image_processor(src)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    module = PrunedVision(model, prune_config(m[C.KEY_PRUNING])).eval()
    p, k = m[C.KEY_PROMPT], m[C.KEY_TEXT][C.T_IMAGE_TOKENS]
    text = p[C.PR_TEMPLATE].replace(p[C.PR_MARKER], req["prompt"])
    text = text.replace(p[C.PR_IMAGE], p[C.PR_IMAGE] * k)
    image_id = model.config.image_token_index

    class Times(BaseStreamer):  # generate's first put() is the prompt, then one per new token
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt = True

        def put(self, value) -> None:
            if not self.prompt:
                self.times.append(time.perf_counter())
            self.prompt = False

        def end(self) -> None:
            pass

    def answer() -> dict:
        streamer = Times()
        t0 = time.perf_counter()
        px = processor(images=load_image(req["image"]), return_tensors="pt")["pixel_values"]
        ids = tokenizer(text, return_tensors="pt").input_ids  # (1, S)
        t1 = time.perf_counter()
        with torch.no_grad():
            feats, _ = module(px)  # (1, K, D)
            t2 = time.perf_counter()
            embeds = model.get_input_embeddings()(ids)
            embeds[ids == image_id] = feats.reshape(-1, feats.shape[-1])
            out = model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=req["max_new_tokens"], pad_token_id=m[C.KEY_TEXT][C.T_PAD],
                streamer=streamer,
            )  # fmt: skip
        st = streamer.times
        return _answer(t0, t1, out[0].tolist(), (t2 - t1) * 1e3, (st[0] - t2) * 1e3, st)

    return answer


WORKERS = {"ours": worker_ours, "genai": worker_genai, "torch": worker_torch}


def work(name: str, request: Path, out: Path) -> None:
    """A worker process: load, one warm-up answer, the timed answer, VmHWM -> `out`."""
    req = json.loads(request.read_text())
    t = time.perf_counter()
    answer = WORKERS[name](req)
    load_ms = (time.perf_counter() - t) * 1e3
    if req["warmup"]:
        answer()
    result = answer() | {"load_ms": load_ms, "peak_rss_kib": status_kb("VmHWM")}
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    work(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
