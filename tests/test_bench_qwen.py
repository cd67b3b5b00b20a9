"""bench.qwen_profile and bench.qwen_methods on the tiny Qwen2.5-VL: the table's rows, the
shared text graphs, and the method comparison's figures (seconds; no timing is asserted)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bench import qwen_methods, qwen_profile
from runtime import contract as C


def test_qwen_profile_rows_and_shared_decoder(
    tiny_qwen: Path, qwen_bundle, tmp_path: Path, capsys
) -> None:
    """On the session's bundles (bench.qwen_profile's naming, so it exports nothing itself)."""
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
    assert "| 448x448 (448x448) | 16 | 16 of 256 |" in capsys.readouterr().out


def test_text_graphs_are_shared_by_checksum(qwen_bundle, tmp_path: Path) -> None:
    """share_text_graphs hard-links embed/decoder files whose manifest sha256 match (bundles of
    one checkpoint exported by separate processes, as bench.qwen_profile does) and leaves a
    file whose checksum differs alone."""
    first, other = tmp_path / "a", tmp_path / "b"
    for dst in (first, other):
        shutil.copytree(qwen_bundle("16"), dst)
    changed = json.loads((other / C.MANIFEST_FILE).read_text())
    changed[C.KEY_FILES][C.EMBED_ONNX] = "0" * 64  # as if its embed graph differed
    (other / C.MANIFEST_FILE).write_text(json.dumps(changed))
    saved = qwen_profile.share_text_graphs(first, other)
    assert os.path.samefile(first / C.DECODER_ONNX, other / C.DECODER_ONNX)
    assert not os.path.samefile(first / C.EMBED_ONNX, other / C.EMBED_ONNX)
    assert not os.path.samefile(first / C.VISION_ONNX, other / C.VISION_ONNX)
    assert saved >= (first / C.DECODER_ONNX).stat().st_size
    assert qwen_profile.share_text_graphs(first, other) == 0  # already shared


def test_qwen_methods_table(tiny_qwen: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(qwen_methods, "RESIZES", ())  # the three photos at their own size
    assert qwen_methods.main([str(tiny_qwen)]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 3 * 2 * 3  # photos x K x methods
    for _, _, _, method, agree, mass, _ in rows:
        assert 0.0 <= float(agree) <= 1.0 and 0.0 <= float(mass) <= 1.0 + 1e-9
        if method.strip() == "gram":  # the default: near-exact on the real photos
            assert float(agree) >= 0.9 and float(mass) >= 0.99
