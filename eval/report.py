"""Aggregate the cached per-question rows into results.json / .csv / .md / .png and images.json.

cache rows ─► per (method, K): accuracy (overall + per setting), yes ratio, flip rate,
              first-token KL, top-1 agreement, kept-token leverage mass, IPR of kept features,
              Spearman(per-image IPR, per-image flip rate)
           ─► per image: IPR of the scored features, flip rate pooled over every pruned job
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from eval import metrics as M
from eval.cache import Cache
from eval.pope import Question
from eval.run import Job

TABLE = (  # (column title, row key, format)
    ("method", "method", "{}"),
    ("K", "k", "{}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("yes ratio", "yes_ratio", "{:.3f}"),
    ("flip rate", "flip_rate", "{:.3f}"),
    ("first-token KL", "first_token_kl", "{:.2e}"),
    ("top-1 agree", "top1_agreement", "{:.3f}"),
    ("leverage mass", "leverage_mass", "{:.3f}"),
    ("IPR kept / all", "ipr_ratio", "{:.2f}"),
    ("ρ(IPR, flip)", "ipr_flip_spearman", "{:+.2f}"),
)


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _clean(x):
    """NaN -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    return x


def summarize(
    jobs: list[Job], questions: list[Question], cache: Cache
) -> tuple[list[dict], list[dict], float]:
    """(rows per job, per-image records, pooled Spearman of IPR vs flip rate)."""
    ref = next(j for j in jobs if j.is_reference)
    ref_rows = [cache.get(ref.config, q.key) for q in questions]
    ref_answers = [r["answer"] for r in ref_rows]
    ipr_of = {r["image"]: r["ipr"] for r in ref_rows}
    images = list(ipr_of)
    settings = sorted({q.setting for q in questions})
    pooled: dict[str, list[float]] = defaultdict(list)  # image -> per-job flip rates
    rows, flips_by_job = [], {}
    for job in jobs:
        got = [cache.get(job.config, q.key) for q in questions]
        answers = [g["answer"] for g in got]
        labels = [q.answer for q in questions]
        per_image = defaultdict(list)
        for g, r in zip(got, ref_answers, strict=True):
            per_image[g["image"]].append(g["answer"] != r)
        flip_img = {img: float(np.mean(v)) for img, v in per_image.items()}
        first = {g["image"]: g for g in got}  # per-image stats repeat on every question
        row = {
            "method": job.method,
            "k": job.k,
            "accuracy": M.accuracy(labels, answers),
            "yes_ratio": M.yes_ratio(answers),
            "flip_rate": M.flip_rate(ref_answers, answers),
            "first_token_kl": _mean(g["kl"] for g in got),
            "top1_agreement": _mean(float(g["top1_agree"]) for g in got),
            "leverage_mass": _mean(s["leverage_mass"] for s in first.values()),
            "ipr_kept": _mean(s["ipr_kept"] for s in first.values()),
            "ipr_ratio": _mean(s["ipr_kept"] / s["ipr"] for s in first.values()),
            "ipr_flip_spearman": M.spearman(
                [ipr_of[i] for i in images], [flip_img[i] for i in images]
            ),
            "n_questions": len(questions),
            "n_images": len(images),
        }
        for s in settings:
            idx = [i for i, q in enumerate(questions) if q.setting == s]
            row[f"accuracy_{s}"] = M.accuracy([labels[i] for i in idx], [answers[i] for i in idx])
        rows.append(row)
        if not job.is_reference:
            flips_by_job[job.label] = flip_img
            for img, f in flip_img.items():
                pooled[img].append(f)
    per_image = [
        {
            "image": img,
            "ipr": ipr_of[img],
            "flip_rate": _mean(pooled[img]),
            "flip_by_config": {label: f[img] for label, f in flips_by_job.items()},
        }
        for img in images
    ]
    rho = M.spearman([p["ipr"] for p in per_image], [p["flip_rate"] for p in per_image])
    return rows, per_image, rho


def markdown(rows: list[dict]) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        v = row.get(key)
        missing = v is None or (isinstance(v, float) and not math.isfinite(v))
        return "n/a" if missing else fmt.format(v)

    lines = ["| " + " | ".join(t for t, _, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in TABLE) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in _clean(r).items()})


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy and flip rate against K, one line per method; the reference as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = next(r for r in rows if r["method"] == "none")
    ks = sorted({r["k"] for r in rows if r["method"] != "none"})
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        pts = sorted((r["k"], r["accuracy"], r["flip_rate"]) for r in rows if r["method"] == method)
        x = [p[0] for p in pts]
        axes[0].plot(x, [p[1] for p in pts], marker="o", label=method)
        axes[1].plot(x, [p[2] for p in pts], marker="o", label=method)
    axes[0].axhline(ref["accuracy"], color="k", ls="--", lw=1, label=f"unpruned (K={ref['k']})")
    for ax, name in zip(axes, ("accuracy", "answer flip rate vs unpruned"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (vision tokens kept)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(rows: list[dict], per_image: list[dict], rho: float, out: Path, meta: dict) -> dict:
    """Every output file; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / n for k, n in (("json", "results.json"), ("csv", "results.csv"),
             ("md", "results.md"), ("png", "results.png"), ("images", "images.json"))}  # fmt: skip
    paths["json"].write_text(json.dumps(_clean(rows), indent=1) + "\n")
    write_csv(rows, paths["csv"])
    table = markdown(rows)
    paths["md"].write_text(table + "\n")
    images = {"ipr_flip_spearman": rho, "meta": meta, "images": per_image}
    paths["images"].write_text(json.dumps(_clean(images), indent=1) + "\n")
    plot(rows, paths["png"], meta.get("title", ""))
    return paths
