"""Smoke test of `make bench-peers` (bench/peers.py) on the tiny preset: one repetition, 4 tokens.

tiny bundle (exported into tmp) ─► ours, ORT GenAI, transformers.js, PyTorch, one process each
─► the Markdown table, <preset>-k<K>.json and .png; ours' ratios are 1.0; every peer's
   greedy tokens equal ours
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import peers

pytestmark = pytest.mark.slow
TOKENS = 4
HAVE_NODE = shutil.which("node") is not None and shutil.which("npm") is not None


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("bench-peers")
    chosen = [p for p in peers.PEERS if p != "tjs" or HAVE_NODE]
    argv = ["--preset", "tiny", "--k", "16", "--bundle", str(tmp / "bundle"), "--reps", "1",
            "--tokens", str(TOKENS), "--threads", "1", "-o", str(tmp)]  # fmt: skip
    argv += ["--peers", *chosen]
    return peers.run(peers.parse_args(argv)), tmp


def test_table_json_and_plot_are_written(report) -> None:
    result, out = report
    saved = json.loads((out / "tiny-k16.json").read_text())
    assert saved["table"] == result["table"]
    assert (out / "tiny-k16.png").stat().st_size > 0
    assert saved["settings"]["tokens"] == TOKENS and saved["settings"]["reps"] == 1
    lines = result["table"].splitlines()
    assert len(lines) == 2 + len(result["peers"])
    assert all(peers.LABELS[name] in result["table"] for name in result["peers"])
    for name, s in result["peers"].items():
        m = s["median"]
        assert m["ttft_ms"] > 0 and m["peak_rss_mib"] > 0, name
        assert 1 <= m["tokens"] <= TOKENS, name


def test_ours_is_the_ratio_base(report) -> None:
    ours = report[0]["peers"]["ours"]
    assert ours["ratio_to_ours"] == {"ttft_ms": 1.0, "decode_tokens_per_s": 1.0,
                                     "peak_rss_mib": 1.0}  # fmt: skip
    parts = sum(ours["median"][f"{s}_ms"] for s in peers.STAGES)
    assert parts == pytest.approx(ours["median"]["ttft_ms"], rel=0.05)


@pytest.mark.parametrize("peer", ["genai", "tjs", "torch"])
def test_greedy_tokens_equal_ours(report, peer: str) -> None:
    if peer == "tjs" and not HAVE_NODE:
        pytest.skip("node and npm are not installed (the transformers.js peer runs in Node)")
    s = report[0]["peers"][peer]
    assert s["same_tokens_as_ours"], (peer, s["token_ids"], report[0]["peers"]["ours"]["token_ids"])
