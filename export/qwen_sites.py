"""Where to score a Qwen2.5-VL image's tokens: the measurement behind qwen_vision.SITE_CHOICE.

    python -m export.qwen_sites [QWEN2.5-VL CHECKPOINT DIR]   (default: the built-in tiny one)

For each real photo at each size and each K, the tower runs once; then every site's features
(merged, merger_input, patches: svdprune_onnx/qwen_vision.py) are scored with exact float64
leverage and with the graph's method, and the kept sets compared (runtime/parity.py's figures):

    fidelity[site]    the method's picks vs exact leverage at the same site (agreement, mass)
    vs_merged[site]   exact picks at the site vs exact picks on the merged features, what the
                      language model receives (agreement; share of the merged leverage mass)
    captured[name]    share of the merged features' energy spanned by the kept merged rows
                      (also for the uniform and random baselines)
    pairwise[a|b]     agreement of two sites' exact picks
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from runtime import parity as P
from svdprune_onnx import qwen_vision as QV
from svdprune_onnx.select import PruneConfig, token_scores

SIZES = ((448, 448), (640, 480))  # (W, H) PIL resizes; smart_resize makes 640x480 644x476
KS = (16, 64)
BASELINES = ("uniform", "random")
Sample = tuple[np.ndarray, np.ndarray]  # (pixel_values, image_grid_thw)


def site_picks(module: QV.PrunedQwenVision, sample: Sample, k: int) -> dict:
    """{(site, method): (kept (K,), scores (N,))} for exact and the module's method, and
    {baseline: kept} and "merged_features": (N, D) float64."""
    x, g = torch.from_numpy(sample[0]), torch.from_numpy(sample[1])
    with torch.no_grad():
        ln, z = module.merger_input(x, g)  # (P, d), (N, 4 d)
        feats = {QV.MERGED: module.visual.merger.mlp(z), QV.MERGER_INPUT: z, QV.PATCHES: ln}
        n, m = z.shape[0], module.merge
        rank = QV.morton_rank(g[0, 1] // m, g[0, 2] // m, torch.tensor(n))
        out = {"merged_features": feats[QV.MERGED].double().numpy()}
        for base in BASELINES:
            s = token_scores(feats[QV.MERGED][None], PruneConfig(k=k, n=n, method=base))[0]
            out[base] = QV.select_tokens(s, k, rank).numpy()
        for site, f in feats.items():
            for method in ("exact", module.prune.method):
                cfg = PruneConfig(k=k, n=f.shape[0], method=method, rank=module.prune.rank)
                s = token_scores(f[None], cfg)[0]  # (rows,)
                s = s.reshape(n, -1).sum(-1) if site == QV.PATCHES else s  # (N,)
                out[site, method] = (QV.select_tokens(s, k, rank).numpy(), s.double().numpy())
    return out


def captured(X: np.ndarray, kept: np.ndarray) -> float:
    """1 - ||X - X X_S^+ X_S||^2 / ||X||^2: X's energy in the span of its kept rows S."""
    Xs = X[kept]
    resid = X - X @ np.linalg.pinv(Xs) @ Xs
    return float(1.0 - np.square(resid).sum() / max(np.square(X).sum(), 1e-300))


def _figures(picks: dict, method: str) -> dict[str, tuple[float, float]]:
    """name -> (agreement or captured share, mass or nan) for one image."""
    rows = {}
    m_ref, m_s = picks[QV.MERGED, "exact"]
    for site in QV.SCORE_SITES:
        ref, s = picks[site, "exact"]
        for name, a, b, sc in (("fidelity", picks[site, method][0], ref, s),
                               ("vs_merged", ref, m_ref, m_s)):  # fmt: skip
            f = P.selection_figures(a[None], b[None], sc[None])
            rows[f"{name}[{site}]"] = (f["agreement_min"], f["mass_min"])
    X = picks["merged_features"]
    for name in (*QV.SCORE_SITES, *BASELINES):
        kept = picks[name, "exact"][0] if name in QV.SCORE_SITES else picks[name]
        rows[f"captured[{name}]"] = (captured(X, kept), float("nan"))
    for i, a in enumerate(QV.SCORE_SITES):
        for b in QV.SCORE_SITES[i + 1 :]:
            agree = P.kept_agreement(picks[a, "exact"][0][None], picks[b, "exact"][0][None])
            rows[f"pairwise[{a}|{b}]"] = (float(agree[0]), float("nan"))
    return rows


def measure_sites(module: QV.PrunedQwenVision, samples: list[Sample], ks=KS) -> dict:
    """{K: {name: ((mean, min) of the first figure, (mean, min) of the second)}} over samples."""
    report = {}
    for k in ks:
        per_image = [
            _figures(site_picks(module, s, k), module.prune.method)
            for s in samples
            if int(s[1].prod()) // module.merge**2 >= k
        ]
        report[k] = {
            name: tuple(
                (float(np.mean(v)), float(np.min(v)))
                for v in zip(*(img[name] for img in per_image), strict=True)
            )
            for name in per_image[0]
        }
    return report


def main(model_dir: Path | None) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    from runtime.preprocess_qwen import preprocess_qwen, vision_from_processor
    from svdprune_onnx.tiny import DEFAULT_MODELS_DIR
    from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl

    ckpt = model_dir or ensure_tiny_qwen25vl(DEFAULT_MODELS_DIR)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(ckpt, use_fast=False, local_files_only=True)
    vis = vision_from_processor(processor.to_dict())
    images = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
    photos = sorted(p for p in images.iterdir() if p.suffix in {".jpg", ".png"})
    module = QV.PrunedQwenVision(model.eval(), PruneConfig(k=16, n=QV.N_MAX)).eval()
    for size in SIZES:
        samples = [preprocess_qwen(Image.open(p).convert("RGB").resize(size), vis) for p in photos]
        print(f"== {size[0]}x{size[1]}: grid {samples[0][1][0].tolist()}, {len(photos)} photos")
        for k, table in measure_sites(module, samples).items():
            for name, ((a, a_min), (m, m_min)) in table.items():
                mass = "" if np.isnan(m) else f"  mass {m:.4f} (min {m_min:.4f})"
                print(f"K={k:3d} {name:34s} {a:.3f} (min {a_min:.3f}){mass}")


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:2] in (["-h"], ["--help"]):
        raise SystemExit("usage: python -m export.qwen_sites [QWEN2.5-VL CHECKPOINT DIR]")
    main(Path(sys.argv[1]) if len(sys.argv) == 2 else None)
