"""The on-device CLI: token-for-token equal to transformers, JSON, streaming, chat, bad input.

Every run pins `--provider cpu` (CPU): the references are CPU torch/transformers and exact
numbers, and on a GPU machine `auto` would pick CUDA/TensorRT (TF32 kernels, engine builds).
The GPU paths are tests/test_gpu.py's (`pytest -m gpu`); the `auto` fallback is tested here
with the availability check monkeypatched, so it holds on both kinds of machine."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.__main__ import cli as export_cli
from export.load import load_image_processor, load_llava
from export.photos import validation_batches
from runtime import contract as C
from runtime.run import cli
from svdprune_onnx.select import PruneConfig
from svdprune_onnx.vision import PrunedVision

from .conftest import REPO

PROMPTS = ["What is in the image?", "Describe the colors you see."]
NEW = 6
CPU = ["--provider", "cpu"]


@pytest.fixture(scope="module")
def bundles(tiny_clip: Path, tiny_siglip: Path, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("rt")
    spec = {
        "clip-llama": (tiny_clip, ["--k", "16"]),
        "siglip-qwen2": (tiny_siglip, ["--k", "16"]),
        "clip-llama-full": (tiny_clip, ["--k", "576", "--method", "none"]),
    }
    out = {}
    for name, (ckpt, extra) in spec.items():
        assert export_cli(["-m", str(ckpt), *extra, "-o", str(root / name)]) == 0
        out[name] = (ckpt, root / name)
    return out


def run_json(capsys, *argv: str) -> list[dict]:
    assert cli([*map(str, argv), *CPU, "--json"]) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def reference_tokens(ckpt: Path, image: Path, prompt_ids: list[int], k: int) -> list[int]:
    """transformers generate(inputs_embeds=...) with the same pruned features in the same slots."""
    model = load_llava(ckpt)
    pixels = torch.from_numpy(validation_batches(load_image_processor(ckpt), [image])[0])
    module = PrunedVision(model, PruneConfig(k=k, n=576)).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        feats, _ = module(pixels)
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_index] = feats.reshape(-1, feats.shape[-1])
        gen = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            do_sample=False,
        )
    return gen[0].tolist()


@pytest.mark.parametrize("name", ["clip-llama", "siglip-qwen2"])
def test_token_for_token_with_transformers(bundles, photo_paths, capsys, name: str) -> None:
    ckpt, bundle = bundles[name]
    for image in photo_paths[:2]:
        for prompt in PROMPTS:
            (out,) = run_json(capsys, "-m", bundle, "-i", image, "-p", prompt,
                              "--max-new-tokens", NEW)  # fmt: skip
            assert out["token_ids"] == reference_tokens(ckpt, image, out["prompt_token_ids"], 16)
            assert len(out["kept_indices"]) == 16


def test_unpruned_bundle_equals_plain_generate(bundles, photo_paths, capsys) -> None:
    """K = N: the runtime must reproduce generate(pixel_values=...) with the HF processor."""
    from transformers import AutoProcessor

    ckpt, bundle = bundles["clip-llama-full"]
    (out,) = run_json(capsys, "-m", bundle, "-i", photo_paths[0], "-p", PROMPTS[0],
                      "--max-new-tokens", NEW)  # fmt: skip
    model, processor = load_llava(ckpt), AutoProcessor.from_pretrained(ckpt)
    manifest = json.loads((bundle / C.MANIFEST_FILE).read_text())
    text = manifest[C.KEY_PROMPT][C.PR_TEMPLATE].replace("{prompt}", PROMPTS[0])
    from PIL import Image

    inputs = processor(images=Image.open(photo_paths[0]).convert("RGB"), text=text,
                       return_tensors="pt")  # fmt: skip
    assert out["prompt_token_ids"] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    assert out["token_ids"] == gen[0, inputs["input_ids"].shape[1] :].tolist()


def test_json_schema_and_batch(bundles, photo_paths, capsys) -> None:
    _, bundle = bundles["clip-llama"]
    outs = run_json(capsys, "-m", bundle, *[a for p in photo_paths for a in ("-i", p)],
                    "-p", PROMPTS[0], "--max-new-tokens", 4)  # fmt: skip
    assert len(outs) == len(photo_paths)
    for o in outs:
        assert {"text", "token_ids", "prompt_token_ids", "kept_indices", "tokens_per_s"} <= o.keys()
        assert {"preprocess", "vision", "embed", "prefill", "decode", "ttft", "total"} <= o[
            "timings_ms"
        ].keys()
        assert o["prompt_token_ids"].count(4) == 16  # exactly K image tokens
    singles = [run_json(capsys, "-m", bundle, "-i", p, "-p", PROMPTS[0], "--max-new-tokens", 4)[0]
               for p in photo_paths]  # fmt: skip
    assert [o["token_ids"] for o in outs] == [o["token_ids"] for o in singles]


def test_jsonl_batch_with_different_prompts(bundles, photo_paths, tmp_path, capsys) -> None:
    _, bundle = bundles["clip-llama"]
    batch = tmp_path / "batch.jsonl"
    rows = [{"image": str(p), "prompt": q} for p, q in zip(photo_paths[:2], PROMPTS, strict=True)]
    batch.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outs = run_json(capsys, "-m", bundle, "--jsonl", batch, "--max-new-tokens", 4)
    singles = [
        run_json(capsys, "-m", bundle, "-i", r["image"], "-p", r["prompt"], "--max-new-tokens", 4)
        for r in rows
    ]
    assert [o["token_ids"] for o in outs] == [s[0]["token_ids"] for s in singles]
    batch.write_text('{"image": "x.jpg"}\n')
    assert cli(["-m", str(bundle), "--jsonl", str(batch), *CPU]) == 2
    assert "batch.jsonl:1" in capsys.readouterr().err


def test_sampling_is_reproducible(bundles, photo_paths, capsys) -> None:
    _, bundle = bundles["clip-llama"]
    args = ["-m", bundle, "-i", photo_paths[0], "-p", PROMPTS[0], "--max-new-tokens", 8,
            "--temperature", 1.5, "--top-k", 50, "--top-p", 0.95]  # fmt: skip
    a = run_json(capsys, *args, "--seed", 1)[0]["token_ids"]
    b = run_json(capsys, *args, "--seed", 1)[0]["token_ids"]
    c = run_json(capsys, *args, "--seed", 2)[0]["token_ids"]
    assert a == b and a != c


def test_streaming_and_timings(bundles, photo_paths, capsys) -> None:
    _, bundle = bundles["clip-llama"]
    base = ["-m", str(bundle), "-i", str(photo_paths[0]), "-p", PROMPTS[0], "--max-new-tokens", "6"]
    (ref,) = run_json(capsys, *base)
    base += CPU
    assert cli([*base, "--timings"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == ref["text"].strip()
    assert "time to first token" in captured.err and "tokens/s" in captured.err


def test_chat_over_stdin(bundles, photo_paths, capsys, monkeypatch) -> None:
    _, bundle = bundles["clip-llama"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\nAnd the colors?\n/exit\n"))
    assert cli(["-m", str(bundle), "-i", str(photo_paths[0]), "--max-new-tokens", "4", *CPU]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def _corrupt(tmp: Path, bundle: Path, what: str) -> Path:
    bad = tmp / "bad"
    shutil.copytree(bundle, bad)
    if what == "checksum":
        (bad / C.EMBED_ONNX).write_bytes(b"garbage")
    else:
        m = json.loads((bad / C.MANIFEST_FILE).read_text())
        (bad / C.MANIFEST_FILE).write_text(json.dumps(m | {C.KEY_SCHEMA: 999}))
    return bad


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-bundle", "not a bundle"),
        ("checksum", "sha256"),
        ("schema", "schema_version"),
        ("missing-image", "does not exist"),
        ("empty-image", "empty"),
        ("text-as-jpg", "not a readable image"),
        ("overflow", "positions"),
        ("cuda", "CUDA"),
    ],
)
def test_bad_input(bundles, photo_paths, tmp_path, capsys, case: str, message: str) -> None:
    _, bundle = bundles["clip-llama"]
    image, extra = photo_paths[0], CPU
    if case == "missing-bundle":
        bundle = tmp_path
    elif case in ("checksum", "schema"):
        bundle = _corrupt(tmp_path, bundle, case)
    elif case == "missing-image":
        image = tmp_path / "nope.jpg"
    elif case == "empty-image":
        image = tmp_path / "empty.jpg"
        image.write_bytes(b"")
    elif case == "text-as-jpg":
        image = tmp_path / "notes.jpg"
        image.write_text("this is not a picture")
    elif case == "overflow":
        extra = [*CPU, "--max-new-tokens", "5000"]
    elif case == "cuda":
        from runtime.session import CUDA, unusable_reason

        if unusable_reason(CUDA) is None:
            pytest.skip("CUDA loads on this machine: the no-GPU error path cannot run here")
        extra = ["--provider", "cuda"]
    code = cli(["-m", str(bundle), "-i", str(image), "-p", "hi", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err


def test_runtime_runs_without_torch(bundles, photo_paths) -> None:
    _, bundle = bundles["clip-llama"]
    code = (
        "import sys; from runtime.run import cli\n"
        f"rc = cli(['-m', {str(bundle)!r}, '-i', {str(photo_paths[0])!r}, '-p', 'hi',"
        " '--max-new-tokens', '2', '--provider', 'cpu', '--json'])\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "print('BAD', bad, rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert "BAD [] 0" in proc.stdout, proc.stdout + proc.stderr


# --- `auto` falls back to CPU, loudly: simulated, so these hold with or without a GPU -------------
def _notes(err: str) -> list[str]:
    """The provider notes (the self-test may add notes of its own)."""
    return [ln for ln in err.splitlines() if ln.startswith("note: ") and "ExecutionProvider" in ln]


def test_auto_falls_back_when_gpu_libraries_cannot_load(bundles, photo_paths, capsys, monkeypatch):
    """A GPU provider whose library cannot load: `auto` notes it once per provider and answers
    on CPU (the --provider cpu tokens); an explicit --provider cuda is one error line instead."""
    from runtime import session as S

    _, bundle = bundles["clip-llama"]
    monkeypatch.setattr(S, "unusable_reason", lambda provider: f"{provider} cannot load (test)")
    monkeypatch.setattr(S, "_NOTED", set())  # notes print once per process
    argv = ["-m", str(bundle), "-i", str(photo_paths[0]), "-p", PROMPTS[0], "--max-new-tokens", "4"]
    (ref,) = run_json(capsys, *argv)
    assert cli([*argv, "--provider", "auto", "--json"]) == 0
    captured = capsys.readouterr()
    assert sorted(_notes(captured.err)) == [
        f"note: {p} cannot load (test); using the next provider" for p in (S.CUDA, S.TRT)
    ]
    assert json.loads(captured.out)["token_ids"] == ref["token_ids"]
    assert cli([*argv, "--provider", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {S.CUDA} cannot load (test); pass --provider cpu or --provider auto"


def test_auto_falls_back_when_no_gpu_starts(bundles, photo_paths, capsys, monkeypatch) -> None:
    """onnxruntime-gpu's libraries load but the session ends up on CPU (no device, no driver):
    `auto` says so once per provider; --provider cuda / tensorrt refuse. Sessions are forced onto
    the CPU here, so this holds on a GPU machine too."""
    from runtime import session as S

    _, bundle = bundles["clip-llama"]
    real = S.ort.InferenceSession

    def cpu_only(path, sess_options=None, providers=None, **kw):
        return real(path, sess_options=sess_options, providers=[S.CPU], **kw)

    monkeypatch.setattr(S, "unusable_reason", lambda provider: None)
    monkeypatch.setattr(S.ort, "InferenceSession", cpu_only)
    monkeypatch.setattr(S, "_NOTED", set())
    argv = ["-m", str(bundle), "-i", str(photo_paths[0]), "-p", PROMPTS[0], "--max-new-tokens", "4"]
    (ref,) = run_json(capsys, *argv)
    assert cli([*argv, "--provider", "auto", "--json"]) == 0
    captured = capsys.readouterr()
    tail = "could not start (no usable GPU, driver, CUDA or cuDNN); running on CPU"
    assert sorted(_notes(captured.err)) == [f"note: {p} {tail}" for p in (S.CUDA, S.TRT)]
    assert json.loads(captured.out)["token_ids"] == ref["token_ids"]
    # The decoder opens first; under --provider tensorrt it runs on CUDA (TensorRT builds the
    # vision graph only), so both refusals name CUDA, the first provider that failed.
    for provider, first in (("cuda", S.CUDA), ("tensorrt", S.CUDA)):
        assert cli([*argv, "--provider", provider]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {first} could not start"), err
