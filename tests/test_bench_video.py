"""bench.video_profile on the tiny models: the frames x K table's invariants (tokens, KV bytes,
ratios, the context check); timings are only checked to exist (the session's bundles, no export)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import video_profile as vp
from runtime import contract as C
from runtime.generate import Pipeline
from runtime.media import load_video
from runtime.session import SessionConfig

FRAMES = [2, 4]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vp.pan_clip(tmp_path_factory.mktemp("video") / "pan", frames=max(FRAMES))


def test_qwen_frames_by_k(qwen_bundle, clip: Path, capsys) -> None:
    """Pruned: text + F/2 slices x 16 tokens; unpruned: F/2 x 192 (448x336 frames); the KV ratio
    is the prompt-token ratio; every measured figure of the unpruned bundle is the larger."""
    bundles = {vp.ALL: qwen_bundle("all"), "16": qwen_bundle("16")}
    rows = vp.profile(bundles, clip, FRAMES, vp.parse_args([]))
    got = {(r["k"], r["frames"]): r for r in rows}
    assert sorted(got) == [("16", 2), ("16", 4), ("all", 2), ("all", 4)]
    for f in FRAMES:
        full, cut = got[vp.ALL, f], got["16", f]
        assert full["measured"] and cut["measured"]
        assert cut["text_tokens"] == full["text_tokens"]
        assert cut["prompt_tokens"] == cut["text_tokens"] + f // 2 * 16
        assert full["image_tokens"] == f // 2 * 192
        assert cut["kv_ratio"] == pytest.approx(cut["prompt_tokens"] / full["prompt_tokens"])
        assert cut["kv_ratio"] == pytest.approx(cut["token_ratio"])
        assert full["kv_cache_bytes"] > cut["kv_cache_bytes"]
        assert full["prefill_gflops"] > cut["prefill_gflops"]
        assert all(r["vision_ms"] > 0 and r["ttft_ms"] > r["prefill_ms"] > 0 for r in (full, cut))
        assert cut["ttft_ratio"] > 0 and cut["prefill_ratio"] > 0
    md = vp.table(rows)
    assert md.count("\n") == 2 + len(rows) - 1
    assert f"| 4      | 16  | 32           | {got['16', 4]['prompt_tokens']} " in md


def test_llava_frames_and_context(llava_bundle, clip: Path) -> None:
    """LLaVA: every frame an image block of K tokens; a prompt past the positions is reported
    as not fitting, with the F that fits, and not run."""
    rows = vp.profile({"16": llava_bundle("16norm")}, clip, FRAMES, vp.parse_args([]))
    assert [r["image_tokens"] for r in rows] == [f * 16 for f in FRAMES]
    assert all(r["positions"] == r["prompt_tokens"] for r in rows)  # compact positions
    assert all(r["measured"] and "ttft_ratio" not in r for r in rows)  # no unpruned bundle
    pipe = Pipeline(llava_bundle("16norm"), SessionConfig(provider="cpu"))
    per_frame = (rows[1]["prompt_tokens"] - rows[0]["prompt_tokens"]) // 2  # K and a newline
    pipe.text[C.T_MAX_POS] = rows[0]["prompt_tokens"] + per_frame + 2  # 3 frames, 2 new tokens
    row = {"k": "16", "measured": False, **vp.sizes(pipe, load_video(clip, 4), 2)}
    assert not row["fits"] and row["fits_frames"] == 3
    assert "does not fit" in vp.table([row]) and "F = 3 fits" in vp.table([row])
