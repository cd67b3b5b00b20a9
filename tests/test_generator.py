"""The stateful generator (runtime/generator.py) and the chat that keeps its KV cache.

Greedy tokens equal transformers' and Pipeline.generate's; a batch equals its rows run alone;
rewind(n) and re-generating gives the same tokens; a chat turn prefills only the tokens the cache
lacks and answers exactly as a fresh run over the whole conversation. All on CPU."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from export.__main__ import cli as export_cli
from runtime import contract as C
from runtime.chat import render
from runtime.generate import Pipeline, PromptError, Sampling
from runtime.generator import Generator
from runtime.preprocess import load_image, preprocess_batch
from runtime.run import cli
from runtime.session import SessionConfig

from .test_runtime_cli import NEW, reference_tokens

QUESTIONS = ["What is in the image?", "And the colors?", "Describe it in more detail, please."]


@pytest.fixture(scope="module")
def bundle(tiny_clip: Path, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("gen") / "clip-llama"
    assert export_cli(["-m", str(tiny_clip), "--k", "16", "-o", str(out)]) == 0
    return tiny_clip, out


@pytest.fixture(scope="module")
def pipe(bundle) -> Pipeline:
    return Pipeline(bundle[1], SessionConfig(provider="cpu"))


@pytest.fixture(scope="module")
def pixels(pipe, photo_paths) -> np.ndarray:
    return preprocess_batch([load_image(p) for p in photo_paths], pipe.m["vision"])


def greedy(gen: Generator) -> list[list[int]]:
    while not gen.is_done():
        gen.generate_next_token()
    return gen.new_tokens


def test_generator_equals_transformers_and_pipeline(bundle, pipe, pixels, photo_paths) -> None:
    ckpt, _ = bundle
    s = Sampling(NEW)
    for i in range(2):
        ids = pipe.prompt_ids(QUESTIONS[i])
        image = pipe.run_vision(pixels[i : i + 1])
        gen = Generator(pipe, s)
        gen.append_tokens([ids], image=image)
        assert gen.prefill_tokens == len(ids) == gen.length
        (tokens,) = greedy(gen)
        assert tokens == reference_tokens(ckpt, photo_paths[i], ids, 16)
        assert tokens == pipe.generate(pixels[i : i + 1], [ids], s)[0].token_ids


@pytest.mark.parametrize("sampling", [Sampling(8), Sampling(8, 1.5, 50, 0.95, 1)])
def test_left_padded_batch_equals_single_rows(pipe, pixels, sampling) -> None:
    prompts = [pipe.prompt_ids(q) for q in QUESTIONS]  # three lengths: left padding
    assert len({len(p) for p in prompts}) > 1
    batch = pipe.generate(pixels, prompts, sampling)
    if sampling.temperature == 0:  # sampled rows draw from one stream, so only greedy compares
        for b, r in enumerate(batch):
            (one,) = pipe.generate(pixels[b : b + 1], [prompts[b]], sampling)
            assert r.token_ids == one.token_ids and r.prompt_token_ids == prompts[b]
    gen = Generator(pipe, sampling, len(prompts))
    gen.append_tokens(prompts, image=pipe.run_vision(pixels))
    assert greedy(gen) == [r.token_ids for r in batch]


def test_streaming_callback_sees_every_token(pipe, pixels) -> None:
    seen: list[tuple[int, int]] = []
    prompts = [pipe.prompt_ids(q) for q in QUESTIONS[:2]]
    rs = pipe.generate(pixels[:2], prompts, Sampling(6), lambda b, t: seen.append((b, t)))
    assert [[t for b, t in seen if b == row] for row in range(2)] == [r.token_ids for r in rs]


@pytest.mark.parametrize("back", [1, 2, 5])
def test_rewind_regenerates_the_same_tokens(pipe, pixels, back: int) -> None:
    ids = pipe.prompt_ids(QUESTIONS[0])
    gen = Generator(pipe, Sampling(10))
    gen.append_tokens([ids], image=pipe.run_vision(pixels[:1]))
    (first,) = [list(r) for r in greedy(gen)]
    n = len(first)
    assert gen.length == len(ids) + n and gen.computed == gen.length - 1
    gen.rewind(back)
    assert gen.length == len(ids) + n - back
    again = [int(gen.generate_next_token()[0]) for _ in range(back)]
    assert again == first[n - back :]
    assert gen.sequence() == ids + first


def test_rewind_into_the_prompt_then_append(pipe, pixels) -> None:
    ids = pipe.prompt_ids(QUESTIONS[2])
    gen = Generator(pipe, Sampling(6))
    gen.append_tokens([ids], image=pipe.run_vision(pixels[:1]))
    (first,) = [list(r) for r in greedy(gen)]
    gen.rewind(gen.length - (len(ids) - 4))  # the generated tokens and the prompt's last 4
    assert gen.computed == len(ids) - 4
    gen.append_tokens([ids[-4:]])
    assert gen.prefill_tokens == 4
    assert greedy(gen) == [first]
    with pytest.raises(ValueError, match="rewind"):
        gen.rewind(gen.length)


def test_image_tokens_need_features(pipe) -> None:
    gen = Generator(pipe, Sampling(4))
    with pytest.raises(PromptError, match="image features"):
        gen.append_tokens([pipe.prompt_ids(QUESTIONS[0])])


def fresh_tokens(pipe, pixels, ids, s) -> list[int]:
    return pipe.generate(pixels, [ids], s)[0].token_ids


def conversation_ids(pipe, turns: list[dict]) -> list[int]:
    return pipe.encode_with_image(render(pipe, turns))


@pytest.mark.parametrize("positions", [C.POSITIONS_COMPACT, C.POSITIONS_ORIGINAL])
def test_resume_reuses_the_cache_and_equals_a_fresh_run(pipe, pixels, positions) -> None:
    pruning = pipe.m[C.KEY_PRUNING]
    saved = pruning.get(C.P_POSITIONS)
    pruning[C.P_POSITIONS] = positions  # Pipeline.positions reads the manifest at run time
    try:
        s = Sampling(8)
        image = pipe.run_vision(pixels[:1])
        gen = Generator(pipe, s)
        turns: list[dict] = []
        for q in QUESTIONS:
            turns.append({"role": "user", "text": q})
            ids = conversation_ids(pipe, turns)
            cached = gen.computed
            have = gen.sequence()
            common = next(
                (i for i, (a, b) in enumerate(zip(have, ids, strict=False)) if a != b),
                min(len(have), len(ids)),
            )
            assert gen.resume(ids, image) == len(ids) - min(common, cached)
            assert gen.sequence() == ids
            (tokens,) = [list(r) for r in greedy(gen)]
            assert tokens == fresh_tokens(pipe, pixels[:1], ids, s)
            text = pipe.tokenizer.decode([t for t in tokens if t not in gen.eos])
            turns.append({"role": "assistant", "text": text})
        # a reply that re-tokenizes as generated: only the last reply token and the delta go in
        delta = pipe.tokenizer.encode(" USER: Thanks. ASSISTANT:", add_special_tokens=False).ids
        before, ids = gen.computed, gen.sequence() + delta
        assert gen.resume(ids, image) == len(delta) + 1
        assert gen.computed == before + len(delta) + 1 == len(ids)
        assert greedy(gen) == [fresh_tokens(pipe, pixels[:1], ids, s)]
    finally:
        pruning[C.P_POSITIONS] = saved


def test_sampled_chat_turn_equals_a_fresh_run(pipe, pixels) -> None:
    s = Sampling(8, 1.2, 40, 0.9, 7)
    image = pipe.run_vision(pixels[:1])
    gen = Generator(pipe, s)
    turns = [{"role": "user", "text": QUESTIONS[0]}]
    gen.resume(conversation_ids(pipe, turns), image)
    (tokens,) = greedy(gen)
    turns += [{"role": "assistant", "text": pipe.tokenizer.decode(tokens)}]
    turns += [{"role": "user", "text": QUESTIONS[1]}]
    ids = conversation_ids(pipe, turns)
    gen.resume(ids, image)
    assert greedy(gen) == [fresh_tokens(pipe, pixels[:1], ids, s)]


def test_chat_json_turns(bundle, pipe, pixels, photo_paths, capsys, monkeypatch) -> None:
    _, path = bundle
    stdin = "\n".join([*QUESTIONS, "/exit", "never asked"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    argv = ["-m", path, "-i", photo_paths[0], "--max-new-tokens", 6, "--provider", "cpu"]
    assert cli([*map(str, argv), "--json"]) == 0
    turns = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    s = Sampling(6)
    messages: list[dict] = []
    prev = None
    for q, t in zip(QUESTIONS, turns, strict=True):
        messages.append({"role": "user", "text": q})
        ids = conversation_ids(pipe, messages)
        assert t["prompt_token_ids"] == ids  # exactly what a fresh run of the conversation feeds
        assert t["token_ids"] == fresh_tokens(pipe, pixels[:1], ids, s)  # ... and its answer
        if prev is None:
            assert t["prefill_tokens"] == len(ids) and t["cached_tokens"] == 0
        else:  # the cache holds the last turn's prompt and reply, less its final token
            have = prev["prompt_token_ids"] + prev["token_ids"]
            pairs = enumerate(zip(have, ids, strict=False))
            common = next((i for i, (a, b) in pairs if a != b), len(have))
            new = ids[min(common, len(have) - 1) :]
            assert t["prefill_tokens"] == len(new) < len(ids)
            assert t["cached_tokens"] == len(ids) - len(new)
        assert {"vision", "embed", "prefill", "decode", "ttft"} <= t["timings_ms"].keys()
        messages.append({"role": "assistant", "text": t["text"]})
        prev = t
