"""bench.qwen_profile and bench.qwen_methods on the tiny Qwen2.5-VL: the table's rows, the
shared text graphs, and the method comparison's figures (seconds; no timing is asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench import qwen_methods, qwen_profile
from runtime import contract as C
from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl


def test_qwen_profile_rows_and_shared_decoder(models_root: Path, tmp_path: Path, capsys) -> None:
    ckpt = ensure_tiny_qwen25vl(models_root)
    args = ["-m", str(ckpt), "--k", "all", "16", "--sizes", "448x448", "--reps", "1"]
    args += ["--new-tokens", "2", "-o", str(tmp_path / "out"), "--bundles", str(tmp_path)]
    assert qwen_profile.main(args) == 0
    rows = json.loads((tmp_path / "out" / "qwen.json").read_text())["rows"]
    assert [(r["k"], r["image_tokens"], r["image_tokens_unpruned"]) for r in rows] == [
        ("all", 256, 256), ("16", 16, 256),
    ]  # fmt: skip
    assert rows[0]["kv_cache_bytes"] > rows[1]["kv_cache_bytes"]
    assert all(r["vision_ms"] > 0 and r["ttft_ms"] >= r["vision_ms"] for r in rows)
    full, pruned = (tmp_path / f"{ckpt.name}-k{k}" / C.DECODER_ONNX for k in ("all", "16"))
    assert os.path.samefile(full, pruned)  # one decoder on disk for every K
    assert "| 448x448 (448x448) | 16 | 16 of 256 |" in capsys.readouterr().out


def test_qwen_methods_table(models_root: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(qwen_methods, "RESIZES", ())  # the three photos at their own size
    assert qwen_methods.main([str(ensure_tiny_qwen25vl(models_root))]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 3 * 2 * 3  # photos x K x methods
    for _, _, _, method, agree, mass, _ in rows:
        assert 0.0 <= float(agree) <= 1.0 and 0.0 <= float(mass) <= 1.0 + 1e-9
        if method.strip() == "gram":  # the default: near-exact on the real photos
            assert float(agree) >= 0.9 and float(mass) >= 0.99
