"""`make eval`: POPE questions, metrics on hand-made cases, a LIMIT=8 run, and resuming."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from eval import answers as A
from eval import metrics as M
from eval.cache import Cache
from eval.pope import (
    SETTINGS,
    DataError,
    Question,
    build_pope,
    limit_images,
    load_coco,
    load_jsonl,
    save_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco128"


@pytest.fixture(scope="module")
def coco() -> Path:
    if not (COCO / "classes.txt").is_file():
        pytest.fail(f"shared test data missing: {COCO} (expected ../shared/data beside the repo)")
    return COCO


# --- questions -------------------------------------------------------------------------------
def test_pope_is_deterministic_balanced_and_true(coco: Path) -> None:
    a, b = build_pope(coco, 3, seed=0), build_pope(coco, 3, seed=0)
    assert a == b and len(a) > 1000
    other = build_pope(coco, 3, seed=1)
    assert [q.qid for q in other] != [q.qid for q in a]  # the seed matters (random negatives)
    classes, images = load_coco(coco)
    present = {img: {classes[c] for c in ids} for img, ids in images}
    by_group: dict[tuple, list[Question]] = {}
    for q in a:
        by_group.setdefault((q.image, q.setting), []).append(q)
        assert (q.object in present[q.image]) == (q.answer == "yes")  # labels are the truth
        assert q.question == f"Is there a {q.object} in the image?"
    assert {s for _, s in by_group} == set(SETTINGS)
    for qs in by_group.values():
        yes = [q for q in qs if q.answer == "yes"]
        assert len(yes) == len(qs) - len(yes) >= 1  # balanced per image and setting
        assert len({q.object for q in qs}) == len(qs)  # no object asked twice
    assert len({q.qid for q in a}) == len(a)


def _fake_coco(root: Path, labels: dict[str, list[int]], classes: list[str]) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for stem, ids in labels.items():
        (root / "images" / "train" / f"{stem}.jpg").write_bytes(b"")
        lines = "".join(f"{c} 0.5 0.5 0.1 0.1\n" for c in ids)
        (root / "labels" / "train" / f"{stem}.txt").write_text(lines)
    return root


def test_popular_and_adversarial_negatives_follow_the_statistics(tmp_path: Path) -> None:
    # frequency: a 4, b 3, c 2, d 1, e 0; "c" co-occurs with "d" twice... with "a" once
    classes = ["a", "b", "c", "d", "e"]
    labels = {"1": [0, 1], "2": [0, 1], "3": [0, 1], "4": [0, 2], "5": [3, 2], "6": [4]}
    qs = build_pope(_fake_coco(tmp_path, labels, classes), per_image=1, seed=0)
    neg = {(q.image.stem, q.setting): q.object for q in qs if q.answer == "no"}
    # image 5 holds d and c, per_image=1 keeps one positive; popular = most frequent absent (a)
    assert neg[("5", "popular")] == "a"
    assert neg[("6", "popular")] == "a"  # image 6 holds e only
    # adversarial for image 5 ({c, d}): co-occurrence with c or d: a 1, b 0, e 0 -> a
    assert neg[("5", "adversarial")] == "a"
    # image 4 holds {a, c}: co-occurrence b 3 (with a), d 1 (with c), e 0 -> b
    assert neg[("4", "adversarial")] == "b"
    assert neg[("4", "popular")] == "b"
    assert sum(q.answer == "yes" for q in qs) == sum(q.answer == "no" for q in qs)


def test_jsonl_round_trip_and_limit(coco: Path, tmp_path: Path) -> None:
    qs = build_pope(coco, 2, seed=0)
    path = tmp_path / "sub" / "q.jsonl"
    save_jsonl(qs, path)
    back = load_jsonl(path)  # image paths were written relative to the file
    assert [(q.image.resolve(), q.question, q.answer, q.setting) for q in qs] == [
        (q.image, q.question, q.answer, q.setting) for q in back
    ]
    first = limit_images(back, 3)
    assert len({q.image for q in first}) == 3 and first == back[: len(first)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nope.jpg", "question": "?", "answer": "yes"}) + "\n")
    with pytest.raises(DataError, match="not found"):
        load_jsonl(bad)


# --- metrics ---------------------------------------------------------------------------------
def test_flip_accuracy_yes_ratio() -> None:
    ref = ["yes", "no", "yes", "no"]
    got = ["yes", "yes", "yes", "other"]
    assert M.flip_rate(ref, got) == 0.5
    assert M.flip_rate(ref, ref) == 0.0
    assert M.accuracy(["yes", "no", "no", "no"], got) == 0.25
    assert M.yes_ratio(got) == 0.75
    with pytest.raises(ValueError, match="reference answers"):
        M.flip_rate(ref, got[:2])


def test_kl_and_top1_on_known_distributions() -> None:
    p, q = np.log([0.5, 0.5]), np.log([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert M.kl_divergence(p, q) == pytest.approx(expected, rel=1e-12)
    assert M.kl_divergence(p + 7.0, q - 3.0) == pytest.approx(expected, rel=1e-12)  # shift-free
    assert M.kl_divergence(q, q) == 0.0
    assert M.kl_divergence(q, p) != pytest.approx(expected)  # not symmetric: direction matters
    big = np.array([1000.0, 0.0, -1000.0])  # no overflow for huge logits
    assert math.isfinite(float(M.kl_divergence(big, big[::-1])))
    batch = np.stack([p, q])
    assert M.kl_divergence(batch, batch[::-1]).shape == (2,)
    assert M.top1_agree(np.array([0.1, 2.0, 1.0]), np.array([0.0, 5.0, 4.9]))
    assert not M.top1_agree(np.array([0.1, 2.0, 1.0]), np.array([3.0, 2.0, 1.0]))


def test_ipr_and_leverage_mass() -> None:
    assert M.ipr(np.array([3.0, 0.0, 0.0])) == 1.0  # all energy in one direction
    assert M.ipr(np.ones(4)) == 0.25  # flat spectrum: 1 / n
    assert M.ipr(np.array([math.sqrt(3), 1.0])) == pytest.approx(0.75**2 + 0.25**2)
    assert math.isnan(M.ipr(np.zeros(3)))
    rng = np.random.default_rng(0)
    rank1 = np.outer(rng.normal(size=20), rng.normal(size=5))
    assert M.spectrum_ipr(rank1) == pytest.approx(1.0)
    assert M.spectrum_ipr(np.eye(6)) == pytest.approx(1 / 6)
    assert M.leverage_mass(np.array([0.5, 0.25, 0.25, 0.0]), [0, 3]) == 0.5


def test_spearman_on_hand_made_cases() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert M.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)  # monotone, not linear
    assert M.spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    # ties get average ranks: y ranks (1.5, 1.5, 3, 4) vs x ranks (1..4):
    # rho = cov / (sd sd) = 4.5 / sqrt(5 * 4.5) = 0.9487
    assert M.spearman([1, 2, 3, 4], [0, 0, 1, 2]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert list(M.rankdata([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]
    assert math.isnan(M.spearman(x, [0.0] * 5))  # constant: no ranking
    assert M.spearman([1, 2, float("nan"), 3], [1, 2, 9, 3]) == pytest.approx(1.0)


def test_answers_from_text_and_logits() -> None:
    assert A.text_answer("Yes, there is a cat.") == "yes"
    assert A.text_answer("no") == "no"
    assert A.text_answer("The cat!") == "cat"
    assert A.text_answer("") == ""
    logits = np.zeros(10)
    logits[[1, 2]] = [2.0, 0.0]  # yes ids
    logits[[3]] = [1.5]  # no id
    ans, margin = A.logit_answer(logits, [1, 2], [3])
    assert ans == "yes" and margin == pytest.approx(np.log(np.exp(2.0) + 1.0) - 1.5)
    with pytest.raises(A.AnswerError, match="--answer text"):
        A.check_labels({"yes", "two"}, A.LOGITS)
    A.check_labels({"yes", "two"}, A.TEXT)


def test_cache_survives_a_cut_last_line(tmp_path: Path) -> None:
    c = Cache(tmp_path)
    c.put({"config": "a", "key": "k1", "answer": "yes"})
    c.close()
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"config": "a", "key": "k2", "ans')  # a crash mid-write
    c = Cache(tmp_path)
    assert c.get("a", "k1") == {"config": "a", "key": "k1", "answer": "yes"}
    assert c.get("a", "k2") is None
    c.put({"config": "a", "key": "k2", "answer": "no"})
    c.close()
    assert len(Cache(tmp_path).rows) == 2


# --- end to end ------------------------------------------------------------------------------
METHODS = ["gram", "exact"]  # exact runs on gram's text graphs: two exports cover both


def _args(out: Path, bundles: Path):
    from eval.__main__ import parse_args

    flags = ["--k", "16", "--methods", *METHODS, "--limit", "8", "--provider", "cpu"]
    return parse_args([*flags, "-o", str(out), "--bundles", str(bundles), "--no-progress"])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval_bundles")


class SimulatedCrashError(Exception):
    """Stands for a crash (Ctrl-C, OOM kill) midway through the run."""


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory, bundles: Path, coco: Path):
    """A LIMIT=8 run crashed after 30 answers, then rerun; counts the generate calls of each."""
    from eval.__main__ import main
    from runtime.generate import Pipeline

    calls = {"n": 0, "stop_at": 30}
    real = Pipeline.generate

    def counting(self, *a, **kw):
        if calls["n"] == calls["stop_at"]:
            raise SimulatedCrashError  # midway through the second configuration
        calls["n"] += 1
        return real(self, *a, **kw)

    out = tmp_path_factory.mktemp("eval_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Pipeline, "generate", counting)
        with pytest.raises(SimulatedCrashError):
            main(_args(out, bundles))
        cached_after_crash = len((out / "cache" / "results.jsonl").read_text().splitlines())
        calls.update(n=0, stop_at=-1)
        result = main(_args(out, bundles))
        resumed_calls, resumed_json = calls["n"], (out / "results.json").read_text()
        calls["n"] = 0
        main(_args(out, bundles))
    return {
        "out": out,
        "result": result,
        "cached_after_crash": cached_after_crash,
        "resumed_calls": resumed_calls,
        "resumed_json": resumed_json,
        "again_calls": calls["n"],
    }


def test_bundles_share_their_text_graphs(resumed_run, bundles: Path) -> None:
    from runtime.bundle import load_manifest

    ref, gram = bundles / "tiny-llava-none-k576", bundles / "tiny-llava-gram-k16"
    decoder = "onnx/decoder_model_merged.onnx"
    assert (ref / decoder).stat().st_ino == (gram / decoder).stat().st_ino  # one copy on disk
    assert (ref / "onnx/vision_encoder.onnx").stat().st_ino != (
        gram / "onnx/vision_encoder.onnx"
    ).stat().st_ino
    load_manifest(gram)  # checksums still verify


def test_limit_8_run_writes_every_output(resumed_run) -> None:
    out, result = resumed_run["out"], resumed_run["result"]
    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows, list)
    assert [(r["method"], r["k"]) for r in rows] == [("none", 576), ("gram", 16), ("exact", 16)]
    need = {"method", "k", "accuracy", "yes_ratio", "flip_rate", "first_token_kl",
            "top1_agreement", "leverage_mass", "ipr_flip_spearman"}  # fmt: skip
    for r in rows:
        assert need <= r.keys()
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["flip_rate"] <= 1 and r["n_images"] == 8
    ref = rows[0]
    assert ref["flip_rate"] == 0 and ref["first_token_kl"] == 0 and ref["top1_agreement"] == 1
    assert ref["leverage_mass"] == pytest.approx(1.0)  # all tokens kept
    for r in rows[1:]:
        assert 0 < r["leverage_mass"] < 1 and r["first_token_kl"] > 0
    with (out / "results.csv").open() as f:
        assert [(r["method"], r["k"]) for r in csv.DictReader(f)] == [
            ("none", "576"),
            ("gram", "16"),
            ("exact", "16"),
        ]
    md = (out / "results.md").read_text()
    assert md.startswith("| method | K | accuracy") and md.count("\n") == 5
    assert (out / "results.png").stat().st_size > 10_000
    images = json.loads((out / "images.json").read_text())
    assert len(images["images"]) == 8
    assert all(0 < im["ipr"] <= 1 for im in images["images"])
    assert "ipr_flip_spearman" in images
    assert len(list(out.glob("questions_*.jsonl"))) == 1
    assert result["rows"][1]["flip_rate"] == rows[1]["flip_rate"]


def test_resume_after_interruption_recomputes_nothing_done(resumed_run) -> None:
    r = resumed_run
    assert r["cached_after_crash"] == 30  # every answer finished before the crash was kept
    total = len((r["out"] / "cache" / "results.jsonl").read_text().splitlines())
    assert total == 3 * 54 > 30  # 3 configurations x 54 distinct (image, question) pairs
    assert r["resumed_calls"] == total - 30  # only what the crash had not done
    assert r["again_calls"] == 0  # a finished run recomputes nothing
    assert (r["out"] / "results.json").read_text() == r["resumed_json"]  # same report from cache
