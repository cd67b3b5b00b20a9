"""bench.qwen_profile and bench.qwen_methods on the tiny Qwen2.5-VL: the table's rows, the
shared text graphs, and the method comparison's figures (seconds; no timing is asserted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench import qwen_methods, qwen_profile
from runtime import contract as C


def test_qwen_profile_rows_and_shared_decoder(
    tiny_qwen: Path, qwen_bundle, tmp_path: Path, capsys
) -> None:
    """On the session's bundles (bench.qwen_profile's naming, so it exports nothing itself);
    their identical decoders get hard-linked, which changes no byte of them."""
    for name in ("all", "16"):
        qwen_bundle(name)  # exported here unless an earlier test did
    args = ["-m", str(tiny_qwen), "--k", "all", "16", "--sizes", "448x448", "--reps", "1"]
    args += ["--new-tokens", "2", "-o", str(tmp_path / "out"), "--bundles", str(qwen_bundle.root)]
    assert qwen_profile.main(args) == 0
    rows = json.loads((tmp_path / "out" / "qwen.json").read_text())["rows"]
    assert [(r["k"], r["image_tokens"], r["image_tokens_unpruned"]) for r in rows] == [
        ("all", 256, 256), ("16", 16, 256),
    ]  # fmt: skip
    assert rows[0]["kv_cache_bytes"] > rows[1]["kv_cache_bytes"]
    assert all(r["vision_ms"] > 0 and r["ttft_ms"] >= r["vision_ms"] for r in rows)
    full, pruned = (qwen_bundle(k) / C.DECODER_ONNX for k in ("all", "16"))
    assert os.path.samefile(full, pruned)  # one decoder on disk for every K
    assert "| 448x448 (448x448) | 16 | 16 of 256 |" in capsys.readouterr().out


def test_qwen_methods_table(tiny_qwen: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(qwen_methods, "RESIZES", ())  # the three photos at their own size
    assert qwen_methods.main([str(tiny_qwen)]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 3 * 2 * 3  # photos x K x methods
    for _, _, _, method, agree, mass, _ in rows:
        assert 0.0 <= float(agree) <= 1.0 and 0.0 <= float(mass) <= 1.0 + 1e-9
        if method.strip() == "gram":  # the default: near-exact on the real photos
            assert float(agree) >= 0.9 and float(mass) >= 0.99
