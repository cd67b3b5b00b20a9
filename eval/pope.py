"""POPE-style yes/no object questions from a labelled image set, and user question files.

    coco128/labels/train/*.txt ─► objects present per image ─► class frequency, co-occurrence
      per image: positives = present classes (at most `per_image`, seeded pick)
                 negatives = as many absent classes, in each POPE setting:
                   random       uniformly drawn (seeded)
                   popular      the most frequent classes over the whole set
                   adversarial  the classes co-occurring most often with the present ones
      ─► "Is there a {object} in the image?"  yes / no, balanced per image and setting

Statistics come from all images of the set, and questions are drawn for all of them before any
limit, so `--limit` only picks a prefix: the same image always gets the same questions.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SETTINGS = ("random", "popular", "adversarial")
USER_SETTING = "user"
TEMPLATE = "Is there a {} in the image?"  # POPE's wording
YES, NO = "yes", "no"


class DataError(ValueError):
    """The question data is missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class Question:
    """One question about one image with its ground-truth answer."""

    qid: str
    image: Path
    question: str
    answer: str
    setting: str
    object: str | None = None

    @property
    def key(self) -> str:
        """What a model sees: identical (image, question) pairs are computed once."""
        return f"{self.image.as_posix()}|{self.question}"


def load_coco(root: Path) -> tuple[list[str], list[tuple[Path, set[int]]]]:
    """Class names and (image, present class ids) for every image of a YOLO-layout set."""
    classes_file = root / "classes.txt"
    image_dir, label_dir = root / "images" / "train", root / "labels" / "train"
    if not classes_file.is_file() or not image_dir.is_dir():
        raise DataError(
            f"{root} is not a coco128-style folder (classes.txt, images/train, labels/train); "
            "pass --coco PATH or --data FILE.jsonl"
        )
    classes = [c.strip() for c in classes_file.read_text().splitlines() if c.strip()]
    out = []
    for img in sorted(image_dir.glob("*.jpg")):
        label = label_dir / f"{img.stem}.txt"
        ids: set[int] = set()
        if label.is_file():  # COCO images without objects have no label file
            for n, line in enumerate(label.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                cid = int(line.split()[0])
                if not 0 <= cid < len(classes):
                    raise DataError(f"{label}:{n}: class id {cid} not in classes.txt")
                ids.add(cid)
        out.append((img, ids))
    if not out:
        raise DataError(f"no *.jpg images in {image_dir}")
    return classes, out


def _stats(images: list[tuple[Path, set[int]]], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images per class (C,) and images per class pair (C, C), zero diagonal."""
    present = np.zeros((len(images), n_classes), np.int64)
    for i, (_, ids) in enumerate(images):
        present[i, sorted(ids)] = 1
    cooc = present.T @ present
    np.fill_diagonal(cooc, 0)
    return present.sum(0), cooc


def build_pope(root: Path, per_image: int = 3, seed: int = 0) -> list[Question]:
    """Balanced questions for every labelled image of `root` in the three POPE settings.

    Each image gets the same positives (up to `per_image` present classes) in every setting and
    as many negatives, so yes and no are balanced per image and setting. Images with no
    labelled object are skipped (they cannot be balanced). Deterministic for a given seed.
    """
    if per_image < 1:
        raise DataError(f"--per-image must be >= 1, got {per_image}")
    classes, images = load_coco(root)
    freq, cooc = _stats(images, len(classes))
    rng = np.random.default_rng(seed)
    questions = []
    for img, present in images:
        if not present:
            continue
        pos = sorted(present)
        if len(pos) > per_image:
            pos = sorted(int(c) for c in rng.choice(pos, per_image, replace=False))
        absent = [c for c in range(len(classes)) if c not in present]
        n = len(pos)
        affinity = cooc[sorted(present)].sum(0)  # (C,) co-occurrences with the present classes
        negatives = {
            "random": sorted(int(c) for c in rng.choice(absent, n, replace=False)),
            "popular": sorted(absent, key=lambda c: (-freq[c], c))[:n],
            "adversarial": sorted(absent, key=lambda c: (-affinity[c], -freq[c], c))[:n],
        }
        for setting in SETTINGS:
            for cid, answer in [(c, YES) for c in pos] + [(c, NO) for c in negatives[setting]]:
                name = classes[cid]
                qid = f"{img.stem}/{setting}/{name}"
                questions.append(Question(qid, img, TEMPLATE.format(name), answer, setting, name))
    return questions


def save_jsonl(questions: list[Question], path: Path) -> None:
    """Write questions with image paths relative to the file, so `--data path` reads it back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for q in questions:
            rel = os.path.relpath(q.image.resolve(), path.parent.resolve())
            row = {"id": q.qid, "image": Path(rel).as_posix(), "question": q.question,
                   "answer": q.answer, "setting": q.setting, "object": q.object}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def load_jsonl(path: Path) -> list[Question]:
    """Questions from a user JSONL: one {image, question, answer} per line.

    `image` is relative to the JSONL file (or absolute); optional `id` and `setting` (or
    `category`) are kept. Answers are stored lower-cased and stripped.
    """
    if not path.is_file():
        raise DataError(f"question file {path} not found; pass --data FILE.jsonl")
    questions, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e})") from e
        missing = [k for k in ("image", "question", "answer") if not row.get(k)]
        if missing:
            raise DataError(f"{path}:{n}: missing {', '.join(missing)}; each line needs "
                            "{image, question, answer}")  # fmt: skip
        image = (path.parent / row["image"]).resolve()
        if not image.is_file():
            raise DataError(f"{path}:{n}: image {image} not found (paths are relative to the file)")
        qid = str(row.get("id", row.get("question_id", f"{path.stem}-{n}")))
        if qid in seen:
            raise DataError(f"{path}:{n}: duplicate id {qid!r}")
        seen.add(qid)
        setting = str(row.get("setting", row.get("category", USER_SETTING)))
        questions.append(Question(qid, image, str(row["question"]), normalize(str(row["answer"])),
                                  setting, row.get("object")))  # fmt: skip
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """VQA-style answer normalisation: lower case, no punctuation or articles, single spaces."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def limit_images(questions: list[Question], limit: int | None) -> list[Question]:
    """The questions of the first `limit` distinct images (in file order); all when None."""
    if limit is None:
        return questions
    if limit < 1:
        raise DataError(f"--limit must be >= 1 image, got {limit}")
    keep: dict[Path, None] = {}
    for q in questions:
        if q.image not in keep and len(keep) < limit:
            keep[q.image] = None
    return [q for q in questions if q.image in keep]
