"""Aggregate the cached per-question rows into results.json / .csv / .md / .png and images.json.

cache rows ─► per (method, K[, positions]): accuracy (overall + per setting), yes ratio,
              agreement with the unpruned model's answers (1 - flip rate), flip rate,
              first-token KL, top-1 agreement, mean |yes-no margin - the unpruned model's|
              (--answer logits), kept-token leverage mass, IPR of kept features,
              Spearman(per-image IPR, per-image flip rate), image tokens per image
           ─► per image: IPR of the scored features, flip rate pooled over every pruned job
           ─► per positions mode (when a run compares them): mean agreement, yes-no margin Δ,
              KL, top-1 over its pruned configurations, and which mode is closer to the
              unpruned model (CLOSENESS: agreement first, then margin Δ, then KL)

Statistics a family has no PyTorch side for (Qwen2.5-VL: leverage mass, IPR) are null in the
rows and "n/a" in the table.
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
    ("agreement", "agreement", "{:.3f}"),
    ("flip rate", "flip_rate", "{:.3f}"),
    ("first-token KL", "first_token_kl", "{:.2e}"),
    ("top-1 agree", "top1_agreement", "{:.3f}"),
    ("yes-no margin Δ", "margin_mae", "{:.2e}"),
    ("leverage mass", "leverage_mass", "{:.3f}"),
    ("IPR kept / all", "ipr_ratio", "{:.2f}"),
    ("ρ(IPR, flip)", "ipr_flip_spearman", "{:+.2f}"),
)
# Columns shown only where they say something: (after column key, (title, key, format)).
EXTRA = {
    "positions": ("k", ("positions", "positions", "{}")),
    "image_tokens": ("k", ("image tokens", "image_tokens", "{:.1f}")),
}


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b is not None and b != 0 else None


def _float(x) -> float:
    return float("nan") if x is None else float(x)


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
    ref_margins = [r.get("margin") for r in ref_rows]  # None: --answer text
    ipr_of = {r["image"]: _float(r.get("ipr")) for r in ref_rows}
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
        flip = M.flip_rate(ref_answers, answers)
        row = {
            "method": job.method,
            "k": job.k,
            "positions": job.positions,
            "accuracy": M.accuracy(labels, answers),
            "yes_ratio": M.yes_ratio(answers),
            "agreement": 1.0 - flip,  # share of answers equal to the unpruned model's
            "flip_rate": flip,
            "first_token_kl": _mean(g["kl"] for g in got),
            "top1_agreement": _mean(float(g["top1_agree"]) for g in got),
            # log P(yes) - log P(no) against the reference's: how close the decision is, where
            # the answers themselves agree (a model that says yes to everything)
            "margin_mae": _mean(
                abs(g["margin"] - m) if m is not None and g.get("margin") is not None else None
                for g, m in zip(got, ref_margins, strict=True)
            ),
            "leverage_mass": _mean(s.get("leverage_mass") for s in first.values()),
            "ipr_kept": _mean(s.get("ipr_kept") for s in first.values()),
            "ipr_ratio": _mean(_ratio(s.get("ipr_kept"), s.get("ipr")) for s in first.values()),
            "ipr_flip_spearman": M.spearman(
                [ipr_of[i] for i in images], [flip_img[i] for i in images]
            ),
            "image_tokens": _mean(s.get("image_tokens") for s in first.values()),
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


def columns(extra: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """TABLE with the EXTRA columns named in `extra` inserted after their anchor column."""
    cols = list(TABLE)
    for name in reversed(extra):
        anchor, col = EXTRA[name]
        cols.insert(next(i for i, c in enumerate(cols) if c[1] == anchor) + 1, col)
    return cols


def markdown(rows: list[dict], extra: tuple[str, ...] = ()) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        v = row.get(key)
        missing = v is None or (isinstance(v, float) and not math.isfinite(v))
        return "n/a" if missing else fmt.format(v)

    table = columns(extra)
    lines = ["| " + " | ".join(t for t, _, _ in table) + " |", "|" + "---|" * len(table)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in table) + " |" for r in rows]
    return "\n".join(lines)


# How a positions mode is judged closer to the unpruned model, in order: the share of answers
# equal to its answers (the question eval asks), then the yes/no decision's margin (logits
# answers: the quantity the answer is read from), then the first-token distribution. A later
# criterion only decides where the earlier ones are equal (e.g. a model that answers yes to
# everything agrees 1.000 in every mode).
CLOSENESS = (("agreement", -1.0), ("margin_mae", 1.0), ("first_token_kl", 1.0))  # (key, sign)


def _closeness(stats: dict) -> tuple[float, ...]:
    """Sort key, smaller = closer; a missing figure (margin with --answer text) ties."""
    return tuple(
        sign * v if (v := stats.get(key)) is not None and math.isfinite(v) else 0.0
        for key, sign in CLOSENESS
    )


def positions_summary(rows: list[dict]) -> dict:
    """Per positions mode, over its pruned rows: mean agreement with the unpruned model's
    answers, yes-no margin Δ, first-token KL and top-1 agreement, and the (method, K) pairs it
    is the closer mode on; "closer": the mode whose means are closer by CLOSENESS, "decided_by":
    the first criterion on which the modes differ (None: equal on all). Empty unless the rows
    hold more than one mode."""
    pruned = [r for r in rows if r["method"] != "none"]
    modes = list(dict.fromkeys(r.get("positions") for r in pruned))
    if len(modes) < 2:
        return {}
    stats: dict = {}
    for mode in modes:
        mine = [r for r in pruned if r.get("positions") == mode]
        stats[mode] = {
            "configs": len(mine),
            "agreement": _mean(r["agreement"] for r in mine),
            "margin_mae": _mean(r.get("margin_mae") for r in mine),
            "first_token_kl": _mean(r["first_token_kl"] for r in mine),
            "top1_agreement": _mean(r["top1_agreement"] for r in mine),
            "closer_on": 0,  # (method, K) pairs where this mode is the closest
        }
    pairs = defaultdict(dict)
    for r in pruned:
        pairs[(r["method"], r["k"])][r.get("positions")] = _closeness(r)
    complete = [by_mode for by_mode in pairs.values() if len(by_mode) == len(modes)]
    for by_mode in complete:
        if len(set(by_mode.values())) > 1:
            stats[min(by_mode, key=by_mode.get)]["closer_on"] += 1
    keys = {m: _closeness(stats[m]) for m in modes}
    differ = [i for i in range(len(CLOSENESS)) if len({k[i] for k in keys.values()}) > 1]
    return {
        "modes": stats,
        "pairs": len(complete),
        "closer": min(modes, key=keys.get),
        "decided_by": CLOSENESS[differ[0]][0] if differ else None,
    }


def positions_text(summary: dict) -> str:
    """The positions comparison as a few lines of text (empty without one)."""
    if not summary:
        return ""
    lines = ["positions modes (means over each mode's pruned configurations):"]
    for mode, s in summary["modes"].items():
        lines.append(
            f"  {mode}: agreement with unpruned {s['agreement']:.3f}, yes-no margin Δ "
            f"{s['margin_mae']:.3e}, first-token KL {s['first_token_kl']:.3e}, top-1 agree "
            f"{s['top1_agreement']:.3f} over {s['configs']} configs; the closer mode on "
            f"{s['closer_on']} of {summary['pairs']} (method, K)"
        )
    how = summary["decided_by"]
    how = f"by {how}" if how else "equal on every figure; the first mode is named"
    lines.append(f"closer to the unpruned model: {summary['closer']} ({how}; order: "
                 f"{', '.join(k for k, _ in CLOSENESS)})")  # fmt: skip
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in _clean(r).items()})


def plot(rows: list[dict], path: Path, title: str, by_positions: bool = False) -> None:
    """Accuracy and flip rate against K, one line per method (and positions mode, when
    `by_positions`); the reference as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = next(r for r in rows if r["method"] == "none")
    ks = sorted({r["k"] for r in rows if r["method"] != "none"})

    def line(r: dict) -> str:
        return f"{r['method']} ({r.get('positions')})" if by_positions else r["method"]

    for name in dict.fromkeys(line(r) for r in rows if r["method"] != "none"):
        pts = sorted((r["k"], r["accuracy"], r["flip_rate"]) for r in rows
                     if r["method"] != "none" and line(r) == name)  # fmt: skip
        x = [p[0] for p in pts]
        axes[0].plot(x, [p[1] for p in pts], marker="o", label=name)
        axes[1].plot(x, [p[2] for p in pts], marker="o", label=name)
    tokens = ref.get("image_tokens")
    varies = tokens is not None and math.isfinite(tokens) and tokens != ref["k"]  # Qwen2.5-VL
    ref_label = f"unpruned ({tokens:.0f} tokens/image)" if varies else f"unpruned (K={ref['k']})"
    axes[0].axhline(ref["accuracy"], color="k", ls="--", lw=1, label=ref_label)
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
    """Every output file; returns their paths by kind. meta["columns"]: EXTRA columns of the
    table; meta["positions"]: positions_summary (written to results.md and images.json)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / n for k, n in (("json", "results.json"), ("csv", "results.csv"),
             ("md", "results.md"), ("png", "results.png"), ("images", "images.json"))}  # fmt: skip
    paths["json"].write_text(json.dumps(_clean(rows), indent=1) + "\n")
    write_csv(rows, paths["csv"])
    extra = tuple(meta.get("columns", ()))
    table = markdown(rows, extra)
    summary = positions_text(meta.get("positions") or {})
    paths["md"].write_text(table + "\n" + (f"\n{summary}\n" if summary else ""))
    images = {"ipr_flip_spearman": rho, "meta": meta, "images": per_image}
    paths["images"].write_text(json.dumps(_clean(images), indent=1) + "\n")
    plot(rows, paths["png"], meta.get("title", ""), "positions" in extra)
    return paths
