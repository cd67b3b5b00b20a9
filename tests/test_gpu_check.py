"""`make gpu-check` on a machine without a GPU says so and exits 0; its report renders."""

from __future__ import annotations

from bench import gpu_check


def test_no_gpu_is_not_an_error(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: "nvidia-smi not found")
    assert gpu_check.main(["-o", str(tmp_path / "g")]) == 0
    assert "no usable NVIDIA GPU here (nvidia-smi not found)" in capsys.readouterr().out
    assert not (tmp_path / "g").exists()  # nothing exported, nothing written


def test_report_markdown() -> None:
    report = {
        "tensorrt": "usable",
        "bundles": {
            "medium-k16-fp32": {
                "export": {"ok": True, "seconds": 61.0},
                "selftest": {"cpu": {"ok": True}, "cuda": {"ok": True}, "tensorrt": {"ok": False}},
                "tokens_equal_prefix": {"cuda": [16, 16], "tensorrt": [16, 3]},
            },
            "medium-k576-q4f16": {"export": {"ok": False, "skipped": "out of time budget"}},
        },
    }
    md = gpu_check.markdown(report)
    assert "| medium-k16-fp32 | 61.0 | ok / ok / FAIL | cuda: [16, 16]; tensorrt: [16, 3] |" in md
    assert "| medium-k576-q4f16 | out of time budget | - | - |" in md


def test_same_prefix() -> None:
    assert gpu_check.same_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert gpu_check.same_prefix([], [1]) == 0
