"""Fidelity of the exportable leverage approximations (purify, power, gram) against exact SVD.

For every (method, oversample, rank r, iterations, center) and K, on real-photo features of the
CLIP-L/336 tower (random weights) and on synthetic spectra with a controlled gap s_r / s_{r+1}:
  overlap = |S_approx ∩ S_exact| / K,   mass = sum_{S_approx} l_exact / sum_{S_exact} l_exact
Picks use select.select_topk with select.spatial_priority, as the exported graph does.
(c) adds rank-deficient inputs (a blank page, a flat sky, a screenshot): the real photos'
features projected onto rank 1..p, p = r + oversample, scored at the shipped defaults.

    python -m bench.fidelity [--images 16] [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import NamedTuple

import torch

from bench import models
from bench.report import md_table, ok
from svdprune_onnx import leverage as lev
from svdprune_onnx.select import PruneConfig, select_topk, spatial_priority, token_scores
from svdprune_onnx.vision import PrunedVision

N, D = models.N_TOKENS, models.VISION_HIDDEN
KS = (16, 32, 64)
RANK_RULES = ("8", "16", "K")
ITERS = (2, 3, 4, 6, 8, 12, 16, 24, 32)
GAPS = (1.02, 1.1, 1.2, 1.5)
BASELINES = ("norm", "random", "uniform")
TARGET_OVERLAP, TARGET_MASS = 0.98, 0.995
DEFAULT = PruneConfig(k=16, n=N)  # the shipped defaults (method, rank, iterations, center, ...)
CHUNK = 8  # matrices per leverage call: keeps the batched temporaries small (faster on CPU)
OUT = models.BENCH_DIR / "fidelity.json"  # --quick writes fidelity_quick.json


class Setting(NamedTuple):
    """One point of the grid; rank is a rule ("8", "16" or "K"), iters None for baselines."""

    method: str
    oversample: int | None
    rank: str
    center: bool
    iters: int | None

    def name(self) -> str:
        return self.method if self.oversample is None else f"{self.method} os={self.oversample}"

    def __str__(self) -> str:
        return f"{self.name()} r={self.rank} iters={self.iters} center={ok(self.center)}"


def rule_rank(rule: str, k: int) -> int:
    return k if rule == "K" else int(rule)


def real_features(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Select-layer features of `n` photos, (n, 576, 1024), cached in build/bench/."""
    paths = models.photo_paths(n)
    names = [p.name for p in paths]
    sizes = [p.stat().st_size for p in paths]
    cache = models.BENCH_DIR / "clip_l_features.pt"
    model_key = f"clip_l_llava(seed={seed})"
    if cache.is_file():
        c = torch.load(cache)
        if c["model"] == model_key and c["names"][:n] == names and c["sizes"][:n] == sizes:
            print(f"features: {n} photos from cache {cache}", flush=True)
            return c["features"][:n], names
    pv = PrunedVision(models.build_logged(seed), PruneConfig(k=N, n=N, method="none")).eval()
    pixels = torch.from_numpy(models.pixel_values(paths))  # (n, 3, 336, 336)
    feats = []
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        with torch.no_grad():
            feats.append(pv.features(pixels[i : i + 1])[0])  # (1, 576, 1024)
        print(f"  tower [{i + 1}/{n}] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    X = torch.cat(feats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model_key, "names": names, "sizes": sizes, "features": X}, cache)
    return X, names


def synthetic(gap: float, at: int, seed: int) -> torch.Tensor:
    """(576, 1024): 64-dim signal with s_at / s_at+1 = gap, noise, 2-6 outlier rows (20-50x)."""
    g = torch.Generator().manual_seed(10_000 * seed + 100 * at + round(100 * gap))
    n_out = int(torch.randint(2, 7, (1,), generator=g))
    # The outliers take the top n_out singular values, so the signal's gap sits n_out earlier.
    s = torch.exp(-torch.arange(64.0) / 64)  # neighbour ratio e^(1/64) ~ 1.016
    s[at - n_out :] *= torch.exp(torch.tensor(1 / 64)) / gap
    U = torch.linalg.qr(torch.randn(N, 64, generator=g)).Q  # (N, 64)
    V = torch.linalg.qr(torch.randn(D, 64, generator=g)).Q  # (D, 64)
    X = (U * s) @ V.T + 0.25 * s[-1] / (N**0.5 + D**0.5) * torch.randn(N, D, generator=g)
    rows = torch.randperm(N, generator=g)[:n_out]
    dirs = torch.nn.functional.normalize(torch.randn(n_out, D, generator=g), dim=1)
    scale = 20 + 30 * torch.rand(n_out, 1, generator=g)
    X[rows] += scale * X.norm(dim=1).median() * dirs
    return X


def spectral_gap(X: torch.Tensor, r: int, center: bool) -> torch.Tensor:
    """s_r / s_r+1 per matrix: (B, N, d) -> (B,)."""
    s = torch.linalg.svdvals(lev.prepare(X, center).double())
    return s[:, r - 1] / s[:, r]


def chunked(fn, X: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(X[i : i + CHUNK]) for i in range(0, len(X), CHUNK)])


def power_trajectory(X: torch.Tensor, r: int, center: bool, iters: list[int]) -> dict:
    """leverage(X, r, "power", t, center) for every t, from one run of max(iters) steps."""
    Xp = lev.prepare(X, center)  # (B, N, d)
    Q = lev.start_block(N, r, 0).expand(len(X), -1, -1)  # (B, N, r)
    out = {}
    for t in range(1, max(iters) + 1):
        Q = lev.orthonormalize(Xp @ (Xp.transpose(1, 2) @ Q))
        if t in iters:
            out[t] = Q.square().sum(dim=-1)  # (B, N)
    ref = lev.leverage(X[:1], r, lev.POWER, iters[0], center)
    if not torch.allclose(out[iters[0]][:1], ref, atol=1e-5):
        raise RuntimeError("bench power_trajectory no longer matches leverage(); update it")
    return out


def exact_all(X: torch.Tensor, center: bool, ranks: list[int]) -> dict[int, torch.Tensor]:
    """leverage(X, r, "exact", center) for every r from one float64 SVD per matrix: r -> (B, N)."""
    U = chunked(lambda x: torch.linalg.svd(lev.prepare(x, center).double())[0], X)  # (B, N, N)
    out = {r: U[..., :r].square().sum(dim=-1) for r in ranks}
    for r in ranks:  # self-check against the library's reference on one matrix
        if not torch.allclose(out[r][:1], lev.leverage(X[:1], r, lev.EXACT, center=center)):
            raise RuntimeError("bench exact_all no longer matches leverage(exact); update it")
    return out


def evaluate(X, groups, iters, oversamples, centers) -> list[dict]:
    """All rows of the grid, aggregated per source group (label -> image indices).

    Real photos run at every rank; a synthetic group only at the rank where its gap sits.
    """
    prio = {k: spatial_priority(N, models.GRID, k) for k in KS}  # (N,) each
    ranks = sorted({rule_rank(rule, k) for rule in RANK_RULES for k in KS})
    rows: list[dict] = []
    t_start = time.perf_counter()
    for center in centers:
        exact = exact_all(X, center, ranks)  # r -> (B, N)
        for r in ranks:
            labels = [lab for lab in groups if lab == "real" or lab.endswith(f"@{r}")]
            sel, sub = subgroups(groups, labels)
            if not sel:
                continue
            Xs, ref_l = X[sel], exact[r][sel]  # (b, N, d), (b, N)
            ks = [k for k in KS if r in {rule_rank(rule, k) for rule in RANK_RULES}]
            ref = {k: mask(select_topk(ref_l, k, prio[k])) for k in ks}  # (b, N) bool

            scores = {  # (method, oversample) -> {iters: (b, N)}
                (m, None): {None: token_scores(Xs, PruneConfig(k=N, n=N, method=m))}
                for m in BASELINES
            }
            scores[(lev.POWER, None)] = power_trajectory(Xs, r, center, iters)
            scores[(lev.PURIFY, None)] = {
                t: chunked(lambda x: lev.leverage(x, r, lev.PURIFY, t, center), Xs)  # noqa: B023
                for t in iters
            }
            for o in oversamples:
                scores[(lev.GRAM, o)] = {
                    t: chunked(lambda x: lev.leverage(x, r, lev.GRAM, t, center, o), Xs)  # noqa: B023
                    for t in iters
                }
            for (m, o), by_t in scores.items():
                for t, s in by_t.items():
                    for k in ks:
                        a = mask(select_topk(s, k, prio[k]))  # (b, N) bool
                        overlap = (a & ref[k]).sum(1) / k  # (b,)
                        mass = (ref_l * a).sum(1) / (ref_l * ref[k]).sum(1)  # (b,)
                        base = dict(method=m, oversample=o, k=k, rank=r, iters=t, center=center)
                        for lab, idx in sub.items():
                            kind = "real" if lab == "real" else "synthetic"
                            rows.append(dict(source=lab, kind=kind, **base, images=len(idx),
                                             **summary(overlap[idx], mass[idx])))  # fmt: skip
            elapsed = time.perf_counter() - t_start
            print(f"  center={ok(center)} r={r} on {len(sel)} matrices: {elapsed:.0f} s")
    return rows


def rank_deficient(real: torch.Tensor, k: int = 16) -> list[dict]:
    """(c): real features (n, N, D) projected onto rank 1..p (p = r + oversample at the
    defaults) and scored by the defaults' method and by `power` at the same rank / iterations.

    Built in float64 and rounded once, so s_{rank+1} ~ 1e-8 s_1: exact leverage (which drops
    s_j <= 1e-7 s_1) is well defined. With rank < K, exact scores may tie at the
    selector's resolution; the mass share is the meaningful figure then.
    """
    d, prio = DEFAULT, spatial_priority(N, models.GRID, k)
    U, s, Vh = torch.linalg.svd(real.double(), full_matrices=False)  # (n, N, D), (n, D), (n, D, D)
    cfgs = [PruneConfig(k=k, n=N, method=m) for m in dict.fromkeys([d.method, lev.POWER])]
    rows = []
    for rank in range(1, d.rank + d.oversample + 1):
        Xk = ((U[..., :rank] * s[:, None, :rank]) @ Vh[:, :rank]).float()  # (n, N, D)
        ref_l = chunked(lambda x: lev.leverage(x, d.rank, lev.EXACT, center=d.center), Xk)
        ref = mask(select_topk(ref_l, k, prio))  # (n, N) bool
        for cfg in cfgs:
            a = mask(select_topk(chunked(lambda x: token_scores(x, cfg), Xk), k, prio))  # noqa: B023
            overlap = (a & ref).sum(1) / k  # (n,)
            mass = (ref_l * a).sum(1) / (ref_l * ref).sum(1)  # (n,)
            rows.append(dict(rank_of_x=rank, method=cfg.method, k=k, r=cfg.rank,
                             iters=cfg.iterations, **summary(overlap, mass)))  # fmt: skip
    return rows


def rank_deficient_table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(row["method"] for row in rows))
    body = [
        [rank]
        + [
            f"{row['overlap_mean']:.3f} / {row['mass_mean']:.4f} (min {row['mass_min']:.4f})"
            for m in methods
            for row in rows
            if row["rank_of_x"] == rank and row["method"] == m
        ]
        for rank in dict.fromkeys(row["rank_of_x"] for row in rows)
    ]
    iters = {row["method"]: row["iters"] for row in rows}  # each method at its own default
    head = ["rank of X", *[f"{m} r={DEFAULT.rank} iters={iters[m]}" for m in methods]]
    return md_table(head, body)


def summary(overlap: torch.Tensor, mass: torch.Tensor) -> dict[str, float]:
    """Mean and worst overlap / mass share over a group's images, (b,) each."""
    return dict(overlap_mean=overlap.mean().item(), overlap_min=overlap.min().item(),
                mass_mean=mass.mean().item(), mass_min=mass.min().item())  # fmt: skip


def subgroups(groups: dict, labels: list[str]) -> tuple[list[int], dict[str, list[int]]]:
    """Rows of X to take for `labels`, and each label's positions within that selection."""
    sel: list[int] = []
    sub = {}
    for lab in labels:
        sub[lab] = list(range(len(sel), len(sel) + len(groups[lab])))
        sel += groups[lab]
    return sel, sub


def mask(idx: torch.Tensor) -> torch.Tensor:
    """Kept indices (B, K) -> membership mask (B, N) bool."""
    return torch.zeros(len(idx), N, dtype=torch.bool).scatter_(1, idx, True)


def find(rows: list[dict], s: Setting, k: int, source: str = "real") -> dict | None:
    """The row of setting `s` at K on `source` (synthetic: the group with the gap at rank r)."""
    r = rule_rank(s.rank, k)
    src = source if source == "real" else f"{source}@{r}"
    key = {**s._asdict(), "rank": r, "k": k, "source": src}
    return next((row for row in rows if all(row[f] == v for f, v in key.items())), None)


def meets(row: dict | None) -> bool:
    return bool(row) and row["overlap_mean"] >= TARGET_OVERLAP and row["mass_mean"] >= TARGET_MASS


def min_iters(rows, iters, oversamples, centers) -> tuple[str, list[tuple[Setting, int]]]:
    """(a): smallest t meeting the target per K on real photos, and at all K at once.

    Returns the table and the candidates for the defaults: settings meeting it at all K for
    their t and every larger t in the grid, with their block width p at K=64.
    """
    table, cands = [], []
    methods = [(lev.PURIFY, None)] + [(lev.GRAM, o) for o in oversamples] + [(lev.POWER, None)]
    for m, o in methods:
        for rule in RANK_RULES:
            for c in centers:
                ok_t = {
                    t: [meets(find(rows, Setting(m, o, rule, c, t), k)) for k in KS] for t in iters
                }
                per_k = [next((t for t in iters if ok_t[t][j]), "-") for j in range(len(KS))]
                t_all = next((t for t in iters if all(ok_t[t])), "-")
                table.append(
                    [Setting(m, o, rule, c, None).name(), f"r={rule}", ok(c), *per_k, t_all]
                )
                stable = [t for t in iters if all(all(ok_t[u]) for u in iters if u >= t)]
                if stable:  # purify has no block: p = 0
                    p = max(lev.block_width(m, rule_rank(rule, k), o or 0, N) for k in KS)
                    p *= m != lev.PURIFY
                    cands.append((Setting(m, o, rule, c, stable[0]), p))
    head = ["method", "rank", "center", *[f"K={k}" for k in KS], "all K"]
    return md_table(head, table), cands


def cell(row: dict | None) -> str:
    return "n/a" if row is None else f"{row['overlap_mean']:.3f} / {row['mass_mean']:.4f}"


def compact_table(rows: list[dict], settings: list[Setting], k: int) -> str:
    """(b): mean overlap / mean mass at a few settings, real photos and synthetic gaps."""
    body = [
        [s.name(), f"r={s.rank}", ok(s.center), s.iters or "-", cell(find(rows, s, k))]
        + [cell(find(rows, s, k, f"gap{g}")) for g in GAPS]
        for s in settings
    ]
    head = ["method", "rank", "center", "iters", "real photos", *[f"synth gap {g}" for g in GAPS]]
    return md_table(head, body)


def figures(rows: list[dict], s: Setting) -> tuple[str, bool]:
    """Real-photo figures of `s` at every K, and whether it meets the target at all of them."""
    found = {k: find(rows, s, k) for k in KS}
    text = ", ".join(
        f"K={k} {cell(r)} (min {r['overlap_min']:.3f} / {r['mass_min']:.4f})"
        if r
        else f"K={k} not in grid"
        for k, r in found.items()
    )
    return text, all(meets(r) for r in found.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="real photos (3 demo + COCO-128)")
    ap.add_argument("--seeds", type=int, default=3, help="synthetic matrices per (gap, position)")
    ap.add_argument("--oversample", type=int, nargs="+", default=[4, 8], help="gram oversampling")
    ap.add_argument("--quick", action="store_true", help="4 photos, 1 seed, 4 iteration counts")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = [2, 4, 8, 16] if args.quick else list(ITERS)
    n_img, n_seed = (4, 1) if args.quick else (args.images, args.seeds)
    centers = (True, False)
    t0 = time.perf_counter()

    real, names = real_features(n_img)  # (n, N, D)
    positions = sorted({rule_rank(rule, k) for rule in RANK_RULES for k in KS})
    syn = {
        f"gap{g}@{p}": [synthetic(g, p, s) for s in range(n_seed)] for g in GAPS for p in positions
    }
    X = torch.cat([real, *[torch.stack(v) for v in syn.values()]])  # (B, N, D)
    groups, i = {"real": list(range(n_img))}, n_img
    for label, mats in syn.items():
        groups[label], i = list(range(i, i + len(mats))), i + len(mats)
    gaps = {
        lab: {ok(c): spectral_gap(X[idx], int(lab.split("@")[1]), c).mean().item() for c in centers}
        for lab, idx in groups.items()
        if lab != "real"
    }
    gaps["real"] = {
        f"r={r} {ok(c)}": spectral_gap(real, r, c).median().item()
        for r in positions
        for c in centers
    }
    print(f"grid on {len(X)} matrices ({n_img} photos, {len(X) - n_img} synthetic) ...")
    rows = evaluate(X, groups, iters, args.oversample, centers)

    md_a, cands = min_iters(rows, iters, args.oversample, centers)
    # purify first (its graph does not grow with r or the iterations), then fewest G products;
    # at equal count gram before power, then the narrower block, centring on.
    rank_key = lambda c: (  # noqa: E731
        c[0].method != lev.PURIFY,
        c[0].iters,
        c[0].method != lev.GRAM,
        c[1],
        not c[0].center,
    )
    best = min(cands, key=rank_key)[0] if cands else None
    d = DEFAULT
    oversample = d.oversample if d.method == lev.GRAM else None  # only gram has a block
    default = Setting(d.method, oversample, str(d.rank), d.center, d.iterations)
    settings = [Setting(lev.PURIFY, None, r, False, t) for r in ("8", "K") for t in (16, 24, 32)]
    settings = [s for s in settings if s.iters in iters]
    settings += [Setting(lev.GRAM, 4, "16", True, t) for t in (4, 8, 16) if t in iters]
    settings += [Setting(lev.POWER, None, "16", True, t) for t in (8, 16, 32) if t in iters]
    settings += [Setting(lev.GRAM, 4, "K", True, 8)]
    settings = ([best] if best and best not in settings else []) + settings
    settings += [Setting(m, None, "16", True, None) for m in BASELINES]

    print(
        "\nreal-photo features, median s_r/s_r+1 (center on/off): "
        + " ".join(f"{k}: {v:.3f}" for k, v in gaps["real"].items())
    )
    print(
        f"\n(a) smallest iterations meeting the target on real photos (mean overlap >= "
        f"{TARGET_OVERLAP}, mean mass >= {TARGET_MASS}); '-' = not within {max(iters)}\n"
    )
    print(md_a)
    for k in (16, 64):
        print(
            f"\n(b) K={k}: mean overlap / mean mass share vs exact at the same rank and "
            "centring (synthetic: gap placed at that rank, baselines vs r=16)\n"
        )
        print(compact_table(rows, settings, k))
    rd_rows = rank_deficient(real)
    print(
        f"\n(c) K=16, rank-deficient features: the {n_img} photos projected onto rank k, "
        "mean overlap / mean mass share (min mass) vs exact at the defaults\n"
    )
    print(rank_deficient_table(rd_rows))
    text, default_ok = figures(rows, default)
    print(
        f"\ncurrent defaults {default}: {'MEETS' if default_ok else 'MISSES'} the target on "
        f"real photos: {text}"
    )
    if best:
        p = dict(cands)[best]
        unit = "(N, N) products" if best.method == lev.PURIFY else f"G products of {p} columns"
        print(f"recommended {best} ({best.iters} {unit} at K=64): {figures(rows, best)[0]}")
    else:
        print("recommended: no setting in the grid meets the target at K=16, 32 and 64")
    out = OUT.with_name("fidelity_quick.json") if args.quick else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        images=names,
        synthetic_seeds=n_seed,
        iters=iters,
        spectral_gaps=gaps,
        target=dict(overlap_mean=TARGET_OVERLAP, mass_mean=TARGET_MASS),
        current_defaults=dict(**default._asdict(), meets_target=default_ok),
        recommended=best._asdict() if best else None,
        rows=rows,
        rank_deficient=rd_rows,
    )
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out} ({len(rows)} rows) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
