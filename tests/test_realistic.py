"""The realistic tiny variant: real-checkpoint numerics, and parity + fidelity that hold on them.

    preset "realistic" (svdprune_onnx/realistic.py) = tiny shapes + a few tokens 10-100x the
    median norm at the tower's select layer + residual units ~500x the rest at BOS
      ├─ statistics on the real photos (the edits really show; plain tiny has none)
      ├─ vision graph vs PyTorch per method: scale-relative features, agreement + mass floors
      ├─ decoder graph vs PyTorch from BOS-first token embeddings: relative to each tensor
      └─ leverage approximations vs exact SVD on the outlier-laden features
The end-to-end greedy tokens on this variant are in tests/test_end_to_end.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.decoder import export_decoder_optimum
from export.load import load_image_processor, load_llava
from export.manifest import text_facts
from export.photos import validation_batches
from export.text_graphs import decoder_parity, decoder_refs
from export.vision import OPSET, export_vision, validate_vision, vision_refs
from runtime import contract as C
from runtime.parity import DECODER_RTOL, FEATURE_RTOL, below_floor, selection_figures
from svdprune_onnx import leverage as lev
from svdprune_onnx.select import PruneConfig, select_topk, spatial_priority
from svdprune_onnx.text import causal_lm
from svdprune_onnx.vision import PrunedVision

from .conftest import IMAGES, SHARED

K, N = 16, 576
# Fidelity floors on outlier-laden real-photo features (K = 16, defaults): every photo keeps
# at least MASS_MIN of the exact leverage mass, and the average photo MASS_MEAN.
MASS_MIN, MASS_MEAN, OVERLAP_MEAN = 0.9, 0.98, 0.85


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    """The 3 demo photos and the first 21 COCO photos (24: a few outliers in each)."""
    coco = sorted((SHARED / "coco128" / "images" / "train").glob("*.jpg"))[:21]
    demo = sorted(p for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png"})
    return demo + coco


def _pixels(ckpt: Path, photos: list[Path]) -> np.ndarray:
    return validation_batches(load_image_processor(ckpt), photos, big=len(photos))[1]


def _features(ckpt: Path, pixels: np.ndarray) -> torch.Tensor:
    module = PrunedVision(load_llava(ckpt), PruneConfig(k=K, n=N)).eval()
    with torch.no_grad():
        return module.features(torch.from_numpy(pixels))[0]  # (B, N, d)


def _norm_ratio(feats: torch.Tensor) -> np.ndarray:
    norms = feats.norm(dim=-1)  # (B, N)
    return (norms.max(dim=1).values / norms.median(dim=1).values).numpy()


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_outlier_tokens_show_on_real_photos(request, tower: str, photos) -> None:
    real = request.getfixturevalue(f"realistic_{tower}")
    plain = request.getfixturevalue(f"tiny_{tower}")
    ratio = _norm_ratio(_features(real, _pixels(real, photos)))
    assert np.median(ratio) >= 10 and ratio.max() <= 200, ratio  # CLIP-L: 10-100x
    assert (ratio >= 4).all(), ratio  # every photo has some
    assert _norm_ratio(_features(plain, _pixels(plain, photos[:3]))).max() < 3  # random: none


def test_massive_activations_at_bos(realistic_clip: Path) -> None:
    model = load_llava(realistic_clip)
    lm = causal_lm(model)
    bos = model.config.text_config.bos_token_id
    ids = torch.tensor([[bos, *range(5, 40)]])
    with torch.no_grad():
        h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]  # (S, H)
    median = h.abs().median()
    assert h[0].abs().max() >= 100 * median  # BOS: massive units
    assert h[1:].abs().max() <= 20 * median  # other tokens: ordinary


@pytest.mark.parametrize("method", ["purify", "gram", "power", "norm", "cls_attn"])
def test_vision_parity_relative(realistic_clip: Path, photos, tmp_path: Path, method) -> None:
    pixels = _pixels(realistic_clip, photos[:6])
    module = PrunedVision(load_llava(realistic_clip), PruneConfig(k=K, n=N, method=method)).eval()
    export_vision(module, tmp_path / "v.onnx", (336, 336))
    batches = [pixels[:1], pixels]
    report = validate_vision(tmp_path / "v.onnx", batches, vision_refs(module, batches))  # raises
    assert report[C.VAL_FEATURES_REL] <= FEATURE_RTOL
    assert below_floor(report[C.VAL_SELECTION]) is None


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_decoder_parity_relative(request, tower: str, tmp_path: Path) -> None:
    model = load_llava(request.getfixturevalue(f"realistic_{tower}"))
    lm = causal_lm(model)
    export_decoder_optimum(lm, tmp_path / "d.onnx", OPSET)
    worst = decoder_parity(tmp_path / "d.onnx", decoder_refs(lm), text_facts(model))  # raises
    assert worst["rel"] <= DECODER_RTOL


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["purify", "gram", "power"])
def test_fidelity_on_outlier_features(request, tower: str, method: str, photos) -> None:
    ckpt = request.getfixturevalue(f"realistic_{tower}")
    feats = _features(ckpt, _pixels(ckpt, photos))
    cfg = PruneConfig(k=K, n=N, method=method)
    prio = spatial_priority(N, (24, 24), K)
    exact = lev.leverage(feats, cfg.rank, lev.EXACT)  # (B, N) float64
    ref = select_topk(exact.float(), K, prio)
    got = select_topk(lev.leverage(feats, cfg.rank, method, cfg.iterations), K, prio)
    fig = selection_figures(got.numpy(), ref.numpy(), exact.numpy())
    assert fig["mass_min"] >= MASS_MIN and fig["mass_mean"] >= MASS_MEAN, fig
    assert fig["agreement_mean"] >= OVERLAP_MEAN, fig
