"""What the evaluation computes in PyTorch from the checkpoint: exact pruning, spectra, leverage.

    pixels (1,3,H,W) ─► PrunedVision(method none).features ─► scored features X (N, d)
                                                               ├─ IPR of svd(prepare(X))
                                                               └─ exact rank-r leverage l (N,)
                     ─► PrunedVision(method exact, K)      ─► features (1,K,D), kept (1,K)

The checkpoint loads once, on first use; its language model is dropped (the bundles run it).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from eval.metrics import spectrum_ipr
from runtime import contract as C
from svdprune_onnx import leverage as lev
from svdprune_onnx.select import PruneConfig
from svdprune_onnx.vision import PrunedVision


class TorchSide:
    """Lazily loaded checkpoint; results memoised per image within one process."""

    def __init__(self, src: Path, device: str = "cpu") -> None:
        self.src, self.device = src, device
        self._model = None
        self._modules: dict[PruneConfig, PrunedVision] = {}
        self._feats: dict[tuple[str, str], np.ndarray] = {}
        self._memo: dict[tuple, object] = {}  # (what, image, scored, rank/center) -> result

    def _module(self, cfg: PruneConfig) -> PrunedVision:
        if self._model is None:
            from export.load import load_llava

            model = load_llava(self.src)
            model.model.language_model = None  # keep the vision tower and projector only
            model.lm_head = None
            self._model = model
        if cfg not in self._modules:
            self._modules[cfg] = PrunedVision(self._model, cfg).eval().to(self.device)
        return self._modules[cfg]

    @torch.no_grad()
    def scored_features(self, image: str, pixels: np.ndarray, cfg: PruneConfig) -> np.ndarray:
        """(N, d) float32: the features cfg's scorer sees (vision-layer, or projected)."""
        key = (image, cfg.scored_features)
        if key not in self._feats:
            pv = self._module(replace(cfg, k=cfg.n, method="none"))
            feats, _ = pv.features(torch.from_numpy(pixels).to(self.device))  # (1, N, d_v)
            if cfg.scored_features == C.SCORED_PROJECTED:
                feats = pv.projector(feats)  # (1, N, D)
            self._feats[key] = feats[0].float().cpu().numpy()
        return self._feats[key]

    @staticmethod
    def ipr(X: np.ndarray, center: bool) -> float:
        """IPR of X's singular values after the scorer's own preparation (scale, centring)."""
        return spectrum_ipr(lev.prepare(torch.from_numpy(X)[None], center)[0].numpy())

    def image_ipr(self, image: str, X: np.ndarray, cfg: PruneConfig) -> float:
        """`ipr` of one image's scored features, memoised (an SVD of N x d per image)."""
        key = ("ipr", image, cfg.scored_features, cfg.center)
        if key not in self._memo:
            self._memo[key] = self.ipr(X, cfg.center)
        return self._memo[key]

    def leverage(self, image: str, X: np.ndarray, cfg: PruneConfig) -> np.ndarray:
        """Exact rank-r leverage (N,) float64 of X as cfg's scorer prepares it, memoised."""
        key = ("leverage", image, cfg.scored_features, cfg.rank, cfg.center)
        if key not in self._memo:
            X_t = torch.from_numpy(X)[None]
            self._memo[key] = lev.leverage(X_t, cfg.rank, lev.EXACT, center=cfg.center)[0].numpy()
        return self._memo[key]

    @torch.no_grad()
    def exact(self, pixels: np.ndarray, cfg: PruneConfig) -> tuple[np.ndarray, np.ndarray]:
        """(features (1,K,D) float32, kept (1,K) int64) of the exact-SVD pruned vision module."""
        feats, kept = self._module(replace(cfg, method=lev.EXACT))(
            torch.from_numpy(pixels).to(self.device)
        )
        return feats.float().cpu().numpy(), kept.cpu().numpy()
