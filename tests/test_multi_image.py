"""Several images and a video in one prompt, tiny LLaVA: our runtime against transformers.

The reference is transformers end to end except for the pruning: LlavaProcessor renders the
checkpoint's chat template with the same content parts and expands every <image> to N tokens
from its own pixels; LlavaForConditionalGeneration.get_image_features gives every image's N
features; each image's run of N tokens is cut to K and given the features at the runtime's
kept indices; `generate(inputs_embeds=...)` answers greedily. Pairs of the real photos, and a
clip made from a real photo (a camera pan: 8 crops sliding across it, a folder of PNG frames).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from bench.video_profile import pan_clip
from runtime import contract as C
from runtime import rows
from runtime.generate import Pipeline, PromptError, Sampling
from runtime.media import load_video
from runtime.parity import rel_diff
from runtime.preprocess import load_image
from runtime.run import cli
from runtime.session import SessionConfig

NEW_TOKENS = 6
LOGITS_RTOL = 1e-4  # first-step logits vs transformers, relative to their scale
FEATURES_RTOL = 1e-4


@pytest.fixture(scope="module")
def pipe(llava_bundle) -> Pipeline:
    return Pipeline(llava_bundle("16norm"), SessionConfig(provider="cpu"))


@pytest.fixture(scope="module")
def hf(tiny_clip: Path):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_clip).eval()
    return model, AutoProcessor.from_pretrained(tiny_clip)


@pytest.fixture(scope="module")
def clip(photo_paths, tmp_path_factory) -> Path:
    return pan_clip(tmp_path_factory.mktemp("clip") / "pan", 8, (320, 240), photo_paths[0])


def reference(hf, pipe: Pipeline, images: list[Image.Image], content: list[dict], kept):
    """transformers' prompt ids (cut to K per image), greedy tokens and first logits, with its
    own features gathered at `kept` ((images, K), the runtime's)."""
    model, proc = hf
    text = proc.apply_chat_template([{"role": "user", "content": content}],
                                    add_generation_prompt=True)  # fmt: skip
    inputs = proc(images=images, text=[text], return_tensors="pt")
    ids = inputs["input_ids"][0].numpy()
    image_id = pipe.text[C.T_IMAGE_TOKEN_ID]
    with torch.no_grad():
        feats = model.get_image_features(
            inputs["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )  # fmt: skip
        feats = torch.as_tensor(np.asarray(feats if torch.is_tensor(feats) else torch.stack(feats)))
        n = feats.shape[1]
        # each image's run of N image tokens -> its first K (the runtime's layout)
        keep = np.ones(len(ids), bool)
        img = np.flatnonzero(ids == image_id).reshape(len(images), n)
        keep[img[:, pipe.k :].reshape(-1)] = False
        ids = ids[keep]
        picked = torch.cat([feats[i, torch.as_tensor(kept[i])] for i in range(len(images))])
        emb = model.get_input_embeddings()(torch.as_tensor(ids)[None])
        emb[0, torch.as_tensor(ids == image_id)] = picked
        out = model.generate(
            inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return ids.tolist(), out.sequences[0].tolist(), out.logits[0][0].numpy(), picked.numpy()


def ours(pipe: Pipeline, media: list, text: str):
    """The runtime: one row, one prompt; (ids, tokens, first logits, features, kept)."""
    (row,) = rows.prepare(pipe, [media])
    ids = rows.prompt_ids(pipe, text, row)
    image = rows.run(pipe, [row])
    (r,) = pipe.generate(None, [ids], Sampling(NEW_TOKENS), vision_out=image)
    n = len(image[1][0])
    return ids, r, image[0][0][:n], image[1][0].reshape(-1, pipe.k)


def _check(hf, pipe, images, content, text) -> None:
    ids, r, feats, kept = ours(pipe, images, text)
    ref_ids, ref_tokens, ref_logits, ref_feats = reference(hf, pipe, images, content, kept)
    assert ids == ref_ids, "prompt ids differ from LlavaProcessor's"
    assert rel_diff(feats, ref_feats) <= FEATURES_RTOL
    assert r.token_ids[: len(ref_tokens)] == ref_tokens[: len(r.token_ids)]
    assert len(r.token_ids) == NEW_TOKENS or r.token_ids[-1] in pipe.text[C.T_EOS]
    assert rel_diff(r.first_logits, ref_logits) <= LOGITS_RTOL


@pytest.mark.parametrize("pair", [(0, 1), (2, 0), (1, 2)])
def test_two_photos_one_prompt_equal_transformers(hf, pipe, photo_paths, pair) -> None:
    images = [load_image(photo_paths[i]) for i in pair]
    text = "What changed between the two pictures?"
    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]
    _check(hf, pipe, images, parts, text)


def test_markers_place_the_images(hf, pipe, photo_paths) -> None:
    """`<image>` markers in the text put each image where it stands (here the checkpoint's
    template moves them first: the content parts still say where the user put them)."""
    images = [load_image(p) for p in photo_paths[:2]]
    text = "First <image> then <image>: which is brighter?"
    parts = [{"type": "text", "text": "First "}, {"type": "image"},
             {"type": "text", "text": " then "}, {"type": "image"},
             {"type": "text", "text": ": which is brighter?"}]  # fmt: skip
    _check(hf, pipe, images, parts, text)
    (row,) = rows.prepare(pipe, [images])
    with pytest.raises(rows.MediaPromptError, match="one marker per"):
        rows.prompt_ids(pipe, "only <image> one marker for two", row)


def test_video_is_one_image_block_per_frame(hf, pipe, clip) -> None:
    video = load_video(clip, 6)
    assert len(video) == 6 and video.fps == pytest.approx(6 / 8 * 2.0)
    text = "What happens in the video?"
    parts = [{"type": "image"}] * 6 + [{"type": "text", "text": text}]
    _check(hf, pipe, list(video.frames), parts, text)


def test_original_positions_per_image(pipe, photo_paths) -> None:
    """Original positions with two images: each image's kept tokens at block start + index,
    and every text token after an image shifted by N - K."""
    (row,) = rows.prepare(pipe, [[load_image(p) for p in photo_paths[:2]]])
    ids = np.array([rows.prompt_ids(pipe, "Compare.", row)])
    image = rows.run(pipe, [row])
    saved = pipe.m[C.KEY_PRUNING][C.P_POSITIONS]
    pipe.m[C.KEY_PRUNING][C.P_POSITIONS] = C.POSITIONS_ORIGINAL
    try:
        pos = pipe.positions(ids, np.ones_like(ids), image)[0, 0]
    finally:
        pipe.m[C.KEY_PRUNING][C.P_POSITIONS] = saved
    n, k = pipe.m[C.KEY_PRUNING][C.P_N], pipe.k
    img = np.flatnonzero(ids[0] == pipe.text[C.T_IMAGE_TOKEN_ID])
    first, second = img[:k], img[k:]
    np.testing.assert_array_equal(pos[first], first[0] + image[1][0, :k])
    start2 = second[0] + (n - k)  # the text between the images was shifted once
    np.testing.assert_array_equal(pos[second], start2 + image[1][0, k:])
    assert pos[-1] == len(ids[0]) - 1 + 2 * (n - k)
    assert rows.positions_needed(pipe, ids[0].tolist(), row) == len(ids[0])  # compact bundle


def test_context_error_names_the_frames_that_fit(pipe, clip, photo_paths, capsys) -> None:
    """16 frames of K tokens against a context cut to 120 positions: the error names F."""
    pipe_m = pipe.text[C.T_MAX_POS]
    pipe.text[C.T_MAX_POS] = 120
    try:
        (row,) = rows.prepare(pipe, [[load_video(clip, 16)]])  # 8 frames on disk: 8 sampled
        assert len(row[0].inputs) == 8
        with pytest.raises(PromptError, match=r"--frames (\d+) fits") as e:
            rows.check_context(pipe, "What happens?", row, 32, 8)
        fit = int(e.value.args[0].split("--frames ")[1].split()[0])
        cut = rows.shortened(pipe, row, fit)
        assert (
            rows.positions_needed(pipe, rows.prompt_ids(pipe, "What happens?", cut), cut) + 32
            <= 120
        )
        cut = rows.shortened(pipe, row, fit + 1)
        assert (
            rows.positions_needed(pipe, rows.prompt_ids(pipe, "What happens?", cut), cut) + 32 > 120
        )
    finally:
        pipe.text[C.T_MAX_POS] = pipe_m
    # the CLI: 2048 positions, 8 frames x 16 tokens + 2000 new tokens do not fit
    code = cli(["-m", str(pipe.bundle), "--video", str(clip), "--frames", "8", "-p", "Go?",
                "--max-new-tokens", "2000", "--provider", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--frames" in err and "fits" in err, err


def test_cli_one_prompt_equals_the_api(pipe, photo_paths, clip, capsys) -> None:
    import json

    argv = ["-m", str(pipe.bundle), "-i", str(photo_paths[0]), "-i", str(photo_paths[1]),
            "--one-prompt", "-p", "Compare them.", "--json", "--max-new-tokens", "4",
            "--provider", "cpu"]  # fmt: skip
    assert cli(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids, r, _, kept = ours(pipe, [load_image(p) for p in photo_paths[:2]], "Compare them.")
    assert got["prompt_token_ids"] == ids and got["token_ids"] == r.token_ids[:4]
    assert got["kept_indices"] == kept.reshape(-1).tolist()


def test_rows_of_different_counts_batch_like_singles(pipe, photo_paths, clip) -> None:
    """One left-padded batch of rows holding 2 images, 1 image and a 4-frame video: each row's
    answer and first logits equal that row run alone."""
    photos = [load_image(p) for p in photo_paths]
    media = [[photos[0], photos[1]], [photos[2]], [load_video(clip, 4)]]
    texts = ["Compare them.", "Describe it.", "What happens?"]
    items = rows.prepare(pipe, media)
    ids = [rows.prompt_ids(pipe, t, r) for t, r in zip(texts, items, strict=True)]
    batch = pipe.generate(None, ids, Sampling(NEW_TOKENS), vision_out=rows.run(pipe, items))
    for i, row in enumerate(items):
        (one,) = pipe.generate(
            None, [ids[i]], Sampling(NEW_TOKENS), vision_out=rows.run(pipe, [row])
        )
        assert batch[i].token_ids == one.token_ids
        assert batch[i].kept_indices == one.kept_indices
        assert rel_diff(batch[i].first_logits, one.first_logits) <= LOGITS_RTOL


def test_chat_adds_an_image_in_a_later_turn(pipe, photo_paths, capsys, monkeypatch) -> None:
    """`/image PATH` in a chat: the next turn's answer equals a fresh run of the whole
    conversation (both images, both questions, the first reply) from an empty cache."""
    import io
    import json
    import sys

    from runtime.chat import render
    from runtime.generator import Generator

    lines = f"Describe it.\n/image {photo_paths[2]}\nAnd this one?\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    argv = ["-m", str(pipe.bundle), "-i", str(photo_paths[0]), "--json", "--max-new-tokens",
            "4", "--provider", "cpu"]  # fmt: skip
    assert cli(argv) == 0
    turns = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(turns) == 2 and turns[1]["cached_tokens"] == 0  # a new image: prefilled again
    photos = [load_image(photo_paths[0]), load_image(photo_paths[2])]
    (a,), (b,) = rows.prepare(pipe, [[photos[0]], [photos[1]]])
    messages = [
        {"role": "user", "content": rows.content(pipe, "Describe it.", [a])},
        {"role": "assistant", "content": [{"type": "text", "text": turns[0]["text"]}]},
        {"role": "user", "content": rows.content(pipe, "And this one?", [b])},
    ]
    ids = rows.encode(pipe, render(pipe, messages), rows.slots(pipe, [a, b]))
    assert ids == turns[1]["prompt_token_ids"]
    gen = Generator(pipe, Sampling(4), 1)
    gen.append_tokens([ids], image=rows.run(pipe, [[a, b]]))
    while not gen.is_done():
        gen.generate_next_token()
    assert gen.new_tokens[0] == turns[1]["token_ids"]


def test_a_generated_image_token_is_text(pipe, photo_paths, monkeypatch) -> None:
    """A sampled token that happens to be the image token id is fed back as text: no features
    are scattered there (it used to index past the row's features), the answer goes on."""
    import runtime.generate as G

    image_id = pipe.text[C.T_IMAGE_TOKEN_ID]
    real_pick, calls = G.pick, []

    def pick(logits, s, rng):  # the second pick is the image token id
        calls.append(1)
        out = real_pick(logits, s, rng)
        return np.full_like(out, image_id) if len(calls) == 2 else out

    monkeypatch.setattr(G, "pick", pick)
    (row,) = rows.prepare(pipe, [[load_image(photo_paths[0]), load_image(photo_paths[1])]])
    ids = rows.prompt_ids(pipe, "Compare them.", row)
    (r,) = pipe.generate(None, [ids], Sampling(NEW_TOKENS), vision_out=rows.run(pipe, [row]))
    assert r.token_ids[1] == image_id and len(r.token_ids) == NEW_TOKENS
