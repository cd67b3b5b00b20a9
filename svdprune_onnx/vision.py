"""The pruned vision module of a LlavaForConditionalGeneration: what vision_encoder.onnx holds.

    pixel_values (B,3,H,W)
      └─ embeddings [+ pre-LN] ─ layers[:L_sel] ─► hidden state(s) at vision_feature_layer
           └─ drop [CLS] ("default") ─► feats (B, N, d_v)
                ├─ score (leverage / baseline) on feats or on projector(feats) ─► (B, N)
                ├─ select_topk ─► kept_indices (B, K) int64, ascending
                └─ Gather K rows ─► projector ─► image_features (B, K, D_text)

Only the layers up to the select layer run (LLaVA-1.5 discards the last one anyway), and by
default only the K kept tokens go through the projector, which is cheaper than projecting N.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from svdprune_onnx.families import VISION_TOWERS
from svdprune_onnx.select import (
    CLS_ATTN,
    PruneConfig,
    PruneError,
    score_constant,
    select_topk,
    spatial_priority,
    token_scores,
)

# |pixel| cap inside the graph; real pixel_values are within ~3 of 0 (mean/std normalised).
PIXEL_LIMIT = 1e4


class UnsupportedModelError(ValueError):
    """The checkpoint is not a LLaVA-family model this exporter supports."""


def llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, object]:
    """(vision tower, projector, config) of a LlavaForConditionalGeneration (any 4.4x-4.5x)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None)
    if tower is None or projector is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no vision_tower / multi_modal_projector; "
            "pass a LlavaForConditionalGeneration checkpoint"
        )
    return tower, projector, model.config


class PrunedVision(nn.Module):
    """pixel_values (B,3,H,W) -> image_features (B,K,D_text), kept_indices (B,K) int64."""

    def __init__(self, model: nn.Module, prune: PruneConfig) -> None:
        super().__init__()
        tower, self.projector, cfg = llava_parts(model)
        vcfg = cfg.vision_config
        if vcfg.model_type not in VISION_TOWERS:
            raise UnsupportedModelError(
                f"vision tower {vcfg.model_type!r} is not supported; "
                f"supported: {', '.join(VISION_TOWERS)}"
            )
        self.vm = getattr(tower, "vision_model", tower)
        layers = self.vm.encoder.layers
        sel = cfg.vision_feature_layer
        self.layer_ids = [sel] if isinstance(sel, int) else list(sel)
        # hidden_states[i] is the input of layer i (i < L) or the last output (i = L).
        self.state_ids = [i % (len(layers) + 1) for i in self.layer_ids]
        self.layers = nn.ModuleList(list(layers)[: max(self.state_ids)])
        self.strategy = cfg.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise UnsupportedModelError(f"unknown vision_feature_select_strategy {self.strategy!r}")
        self.has_cls = VISION_TOWERS[vcfg.model_type].has_cls
        side = vcfg.image_size // vcfg.patch_size
        self.grid = (side, side)
        self.n_tokens = side * side + (1 if self.has_cls and self.strategy == "full" else 0)
        if prune.n != self.n_tokens:
            raise PruneError(f"config says N={prune.n} but the tower yields {self.n_tokens}")
        self.prune = prune
        self.out_dim = cfg.text_config.hidden_size  # the projector maps into the text model
        self.register_buffer("priority", spatial_priority(self.n_tokens, self.grid, prune.k))
        const = score_constant(prune)
        self.register_buffer("const", const if const is not None else torch.zeros(0))
        self._causal_arg = (
            "causal_attention_mask" in inspect.signature(layers[0].forward).parameters
        )

    def _run_layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        kw = {"causal_attention_mask": None} if self._causal_arg else {}
        out = layer(h, None, **kw)
        return out[0] if isinstance(out, tuple) else out

    def _cls_attention(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Attention the select layer pays to each patch, (B, T, d) -> (B, N), mean over heads.

        Rebuilt from the layer's own q/k projections so it works for every tower and exports as
        plain MatMul + Softmax. With a [CLS] token: the [CLS] query's row (FasterVLM); without
        one (SigLIP): the attention each token receives, averaged over all queries.
        """
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        B, T, _ = x.shape
        nh = attn.num_heads
        q = attn.q_proj(x).view(B, T, nh, -1).transpose(1, 2)  # (B, h, T, hd)
        k = attn.k_proj(x).view(B, T, nh, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (B, h, T, T)
        probs = probs.mean(dim=1)  # (B, T, T)
        received = probs[:, 0, :] if self.has_cls else probs.mean(dim=1)  # (B, T)
        if self.has_cls and self.strategy == "default":
            received = received[:, 1:]
        return received

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Select-layer features (B, N, d_v) as LLaVA takes them, and the cls_attn map or None."""
        h = self.vm.embeddings(pixel_values)
        if hasattr(self.vm, "pre_layrnorm"):  # CLIP normalises before the first layer
            h = self.vm.pre_layrnorm(h)
        states = [h]
        for layer in self.layers:
            h = self._run_layer(layer, h)
            states.append(h)
        picked = [states[i] for i in self.state_ids]
        if self.strategy == "default":
            picked = [s[:, 1:] for s in picked]
        feats = picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)
        cls_attn = None
        if self.prune.method == CLS_ATTN:
            # The select layer is the one that *produced* states[i]; its input is states[i - 1].
            i = max(self.state_ids[0], 1)
            cls_attn = self._cls_attention(self.vm.encoder.layers[i - 1], states[i - 1])
        return feats, cls_attn

    def select(self, scored: torch.Tensor, cls_attn: torch.Tensor | None) -> torch.Tensor:
        """Kept indices (B, K) int64 from the scored features (B, N, d)."""
        return select_topk(self._scores(scored, cls_attn), self.prune.k, self.priority)

    def _scores(self, scored: torch.Tensor, cls_attn: torch.Tensor | None) -> torch.Tensor:
        const = self.const if self.const.numel() else None
        return token_scores(scored, self.prune, cls_attn, const)  # (B, N)

    def _scored(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(features (B, N, d_v), what is scored (B, N, d), cls_attn or None)."""
        # NaN/Inf or absurd pixels never come from an image processor (normalised pixels lie
        # within a few units of 0) but would overflow LayerNorm differently in PyTorch and ORT:
        # pin them (non-finite -> 0, clip to +-PIXEL_LIMIT) so every output stays finite.
        pixel_values = torch.where(torch.isfinite(pixel_values), pixel_values, 0.0)
        pixel_values = pixel_values.clamp(-PIXEL_LIMIT, PIXEL_LIMIT)
        feats, cls_attn = self.features(pixel_values)  # (B, N, d_v)
        projected = self.prune.scored_features == "projected"
        return feats, self.projector(feats) if projected else feats, cls_attn

    @torch.no_grad()
    def scores(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The selection scores (B, N) that the graph ranks: the reference for agreement and
        leverage-mass figures (runtime.parity)."""
        _, scored, cls_attn = self._scored(pixel_values)
        return self._scores(scored, cls_attn)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, scored, cls_attn = self._scored(pixel_values)
        idx = self.select(scored, cls_attn)  # (B, K)
        if self.prune.scored_features == "projected":
            gather = idx.unsqueeze(-1).expand(-1, -1, scored.shape[-1])
            return scored.gather(1, gather), idx  # (B, K, D)
        kept = feats.gather(1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))  # (B, K, d_v)
        return self.projector(kept), idx  # (B, K, D)


def vision_token_count(model: nn.Module) -> int:
    """N: tokens per image LLaVA would feed the language model for this checkpoint."""
    _, _, cfg = llava_parts(model)
    vcfg = cfg.vision_config
    side = vcfg.image_size // vcfg.patch_size
    has_cls = VISION_TOWERS.get(vcfg.model_type, VISION_TOWERS["clip_vision_model"]).has_cls
    return side * side + (1 if has_cls and cfg.vision_feature_select_strategy == "full" else 0)
