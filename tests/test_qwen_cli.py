"""Qwen2.5-VL through the two CLIs: `python -m export --family qwen2.5-vl` and runtime.run, the
self-test, the fixed-size (TensorRT) graph, and bad input: each a clear error, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.__main__ import cli as export_cli
from runtime import contract as C
from runtime.generate import Pipeline, PromptError, Sampling
from runtime.run import cli as run_cli
from runtime.selftest import run_selftest
from runtime.session import SessionConfig
from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl


@pytest.fixture(scope="module")
def ckpt(models_root: Path) -> Path:
    return ensure_tiny_qwen25vl(models_root)


@pytest.fixture(scope="module")
def bundle(qwen_bundle) -> Path:
    return qwen_bundle("16")


@pytest.fixture(scope="module")
def fixed(qwen_bundle) -> Path:
    return qwen_bundle("fixed16")


def test_manifest_records_the_family_choices(bundle: Path) -> None:
    m = json.loads((bundle / C.MANIFEST_FILE).read_text())
    p = m[C.KEY_PRUNING]
    assert m[C.KEY_MODEL]["family"] == C.FAMILY_QWEN25VL
    assert (p[C.P_METHOD], p[C.P_SCORE_SITE], p[C.P_POSITIONS]) == (
        "gram", "merged", C.POSITIONS_ORIGINAL,
    )  # fmt: skip
    assert p[C.P_MIN_TOKENS] == 16 and p[C.P_SITE_CHOICE]["site"] == "merged"
    assert m[C.KEY_VISION][C.V_FIXED_SIZE] is None and m[C.KEY_TEXT][C.T_IMAGE_TOKENS] == 16
    assert m[C.KEY_SELFTEST][C.S_IMAGES] == 2


def test_selftest_passes(bundle: Path) -> None:
    report = run_selftest(Pipeline(bundle, SessionConfig(provider="cpu")))
    assert report["passed"] and report["pixels_equal"], report
    assert min(report["tokens_equal"]) == report["tokens"]


def test_run_cli_json_batch(bundle: Path, photo_paths: list[Path], capsys) -> None:
    """Three photos of three sizes in one batch: K image tokens in every prompt, K kept
    indices into each image's own merged grid."""
    args = ["-m", str(bundle), "-p", "What is it?", "--json", "--max-new-tokens", "3"]
    assert run_cli([*args, *(a for p in photo_paths for a in ("-i", str(p)))]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    image_id = json.loads((bundle / C.MANIFEST_FILE).read_text())[C.KEY_TEXT]["image_token_id"]
    for row in rows:
        assert row["prompt_token_ids"].count(image_id) == 16 and len(row["token_ids"]) == 3
        assert (
            row["kept_indices"] == sorted(set(row["kept_indices"]))
            and len(row["kept_indices"]) == 16
        )


def test_fixed_size_graph(fixed: Path, bundle: Path, photo_paths: list[Path]) -> None:
    """--image-size: a static graph without the grid input; every image is resized to it, and
    it answers as the dynamic graph does on a 448x448 image."""
    import onnx

    graph = onnx.load(str(fixed / C.VISION_ONNX), load_external_data=False).graph
    assert [i.name for i in graph.input] == [C.PIXEL_VALUES]
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1024, 3 * 2 * 14 * 14]
    image = Image.open(photo_paths[0]).convert("RGB")
    pipes = [Pipeline(b, SessionConfig(provider="cpu")) for b in (fixed, bundle)]
    outs = []
    images = (image, image.resize((448, 448), Image.Resampling.BICUBIC))
    for pipe, im in zip(pipes, images, strict=True):
        px = pipe.preprocess([im])
        (r,) = pipe.generate(px, [pipe.prompt_ids("What is it?")], Sampling(4))
        outs.append((r.kept_indices, r.token_ids))
    assert outs[0] == outs[1]


def test_small_image_is_raised_to_k_tokens(bundle: Path) -> None:
    """An image the processor would give 4 tokens gets K = 16 (min_pixels raised), not an error."""
    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    px = pipe.preprocess([Image.new("RGB", (60, 40), (200, 30, 30))])
    assert int(px[0][1][0, 1] * px[0][1][0, 2]) // 4 >= 16
    (r,) = pipe.generate(px, [pipe.prompt_ids("Color?")], Sampling(2))
    assert len(r.kept_indices) == 16


def test_runtime_refusals(bundle: Path, tmp_path: Path, capsys) -> None:
    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    px = pipe.preprocess([Image.new("RGB", (224, 224))])
    with pytest.raises(PromptError, match="positions"):  # overflows the context
        pipe.generate(px, [pipe.prompt_ids("hi")], Sampling(max_new_tokens=200_000))
    with pytest.raises(ValueError, match="grid"):  # a grid the graph cannot take
        pipe.run_vision([(px[0][0], np.array([[2, 16, 16]]))])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    assert run_cli(["-m", str(bundle), "-i", str(bad), "-p", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image-size", "447x448"], "multiples of 28"),
        (["--image-size", "big"], "HxW"),
        (["--dtype", "fp16"], "fp32"),
        (["--method", "exact"], "no SVD"),
        (["--k", "16", "--rank", "32"], "rank"),
    ],
)
def test_export_refusals(ckpt: Path, tmp_path: Path, capsys, extra, message) -> None:
    out = tmp_path / "b"
    if extra[1] == "big":  # argparse's own refusal: exit 2 with the message
        with pytest.raises(SystemExit, match="2"):
            export_cli(["-m", str(ckpt), "-o", str(out), *extra])
    else:
        assert export_cli(["-m", str(ckpt), "-o", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_family_mismatch_and_llava_image_size(tiny_clip: Path, tmp_path: Path, capsys) -> None:
    assert (
        export_cli(["-m", str(tiny_clip), "--family", "qwen2.5-vl", "-o", str(tmp_path / "a")]) == 2
    )
    assert "is a llava checkpoint" in capsys.readouterr().err
    assert (
        export_cli(["-m", str(tiny_clip), "--image-size", "448x448", "-o", str(tmp_path / "b")])
        == 2
    )
    assert "--image-size" in capsys.readouterr().err


def test_chat_turn_equals_a_fresh_run(bundle: Path, photo_paths: list[Path]) -> None:
    """A second chat turn on top of the KV cache (text after the image continues from the
    M-RoPE maximum) answers as a fresh run of the whole conversation does."""
    from runtime.chat import render
    from runtime.generator import Generator

    pipe = Pipeline(bundle, SessionConfig(provider="cpu"))
    px = pipe.preprocess([Image.open(photo_paths[1]).convert("RGB")])
    image = pipe.run_vision(px)
    gen = Generator(pipe, Sampling(4), 1)
    messages = [{"role": "user", "text": "What is it?"}]
    gen.resume(pipe.encode_with_image(render(pipe, messages)), image)
    while not gen.is_done():
        gen.generate_next_token()
    messages += [{"role": "assistant", "text": gen.text(0)}, {"role": "user", "text": "Why?"}]
    ids = pipe.encode_with_image(render(pipe, messages))
    cached = len(ids) - gen.resume(ids, image)
    while not gen.is_done():
        gen.generate_next_token()
    (fresh,) = pipe.generate(px, [ids], Sampling(4), vision_out=image)
    assert cached > 0 and gen.new_tokens[0] == fresh.token_ids
