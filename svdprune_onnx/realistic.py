"""Give a random-weight tiny LLaVA the activation statistics of real checkpoints.

Random weights give smooth, well-conditioned activations, which hide the numerics that break
exports of real models. Two edits, in place and deterministic, reproduce the two that matter:

  vision tower (CLIP-L, SigLIP):   a few "high-norm" tokens per image, 10-100x the median token
                                   norm (their size varying with the content), at the layer
                                   LLaVA reads its features from
  language model (Llama, Qwen2):   "massive activations": a few hidden units of the residual
                                   stream 100-1000x the rest, at the first token (BOS)

    position embeddings:      OUTLIER_TOKENS positions get a push along a fresh direction w
    tower layer L_sel-1 MLP:  fc1[j] = a·w, bias[j] = -a·t   (fires where w·LN(h) > t, t
                              mid-way between pushed and other tokens on calibration images)
                              fc2[:, j] = m·u               (adds a huge vector along u)

    decoder layer 0 MLP:      gate[j] = up[j] = a·v, down[MASSIVE_UNITS, j] = ±M
        v = a direction only the BOS embedding has (other rows are made orthogonal to it)

The calibration images are made here from a seed (no data files), so a build stays offline and
bitwise reproducible.
"""

from __future__ import annotations

import torch
from torch import nn

# Targets measured on real checkpoints (CLIP ViT-L/14-336 select layer; Llama-2/Vicuna-7B).
OUTLIER_TOKENS = 6  # high-norm tokens per image (CLIP-L shows a handful at its select layer)
OUTLIER_PUSH = 2.0  # their position-embedding push along w, in median embedded-token norms
OUTLIER_RATIO = 40.0  # typical outlier norm / median token norm
MASSIVE_RATIO = 500.0  # massive unit at BOS / median |residual entry|
MASSIVE_UNITS = (3, 17)  # residual-stream dims that carry the massive activation (< hidden size)


def _calibration_pixels(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) normalised-looking images: smooth colour fields, textures, flat areas."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=gen) * 2 - 1
    img = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic")
    texture = torch.randn(n, 3, size, size, generator=gen) * 0.6
    # the top third of each image is flat (a sky), the rest textured
    mask = (torch.arange(size) >= size // 3).float().view(1, 1, size, 1)
    return (img + texture * mask).clamp(-2, 2)


def _mlp_input(mlp: nn.Module, run) -> torch.Tensor:
    """What `mlp` receives while `run()` executes (its first positional input)."""
    seen: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[-1]


@torch.no_grad()
def add_outlier_tokens(vision, seed: int = 0) -> None:
    """Make a few tokens of the select layer 10-100x the median token norm, on every image.

    `vision` is an svdprune_onnx.vision.PrunedVision over the model. A few patch positions get
    a component along a fresh direction w in their position embedding (carried by the residual
    stream), and the MLP of the last layer it runs (the one producing LLaVA's features) fires on
    w above a threshold with a margin on both sides, adding a huge vector along u. The outlier
    norms still vary with the content (as in real towers, where they sit in flat regions).
    """
    emb = vision.vm.embeddings
    table = emb.position_embedding.weight  # (T, d)
    gen = torch.Generator().manual_seed(seed + 1)
    extra = table.shape[0] - vision.grid[0] * vision.grid[1]  # a leading [CLS] position or none
    picks = extra + torch.randperm(table.shape[0] - extra, generator=gen)[:OUTLIER_TOKENS]
    w = torch.randn(table.shape[1], generator=gen)
    w = w / w.norm()
    pixels = _calibration_pixels(4, emb.config.image_size, seed)
    table[picks] += OUTLIER_PUSH * emb(pixels).norm(dim=-1).median() * w
    mlp = vision.layers[-1].mlp
    fc1, fc2 = mlp.fc1, mlp.fc2
    feats, _ = vision.features(pixels)  # (B, N, d) before the MLP edit
    x = _mlp_input(mlp, lambda: vision.features(pixels))  # (B, T, d): LN2 of the residual
    z = x @ w  # (B, T)
    chosen = torch.zeros(z.shape[1], dtype=torch.bool)
    chosen[picks] = True
    t = (z[:, ~chosen].max() + z[:, chosen].min()) / 2  # mid-way: a margin on both sides
    a = 1.0 / (z[:, chosen].median() - t).clamp_min(1e-6)
    j = int(torch.randint(fc1.out_features, (1,), generator=gen))
    fc1.weight[j] = a * w
    fc1.bias[j] = -a * t
    act = mlp.activation_fn(fc1(x))[:, chosen, j]  # (B, OUTLIER_TOKENS), ~1 for the median
    u = torch.randn(fc2.out_features, generator=gen)
    # Scale so the typical chosen token lands at OUTLIER_RATIO x the median feature norm.
    gain = OUTLIER_RATIO * feats.norm(dim=-1).median() / act.median().clamp_min(1e-6)
    fc2.weight[:, j] = u / u.norm() * gain


@torch.no_grad()
def add_massive_activations(lm: nn.Module, bos_id: int, seed: int = 0) -> None:
    """Give the BOS token's residual stream a few units ~MASSIVE_RATIO x the median entry."""
    emb = lm.get_input_embeddings().weight  # (V, H)
    gen = torch.Generator().manual_seed(seed + 2)
    v = torch.randn(emb.shape[1], generator=gen)
    v = v / v.norm()
    others = torch.arange(emb.shape[0]) != bos_id
    emb[others] -= (emb[others] @ v)[:, None] * v  # no other token has a component along v
    emb[bos_id] = emb[bos_id] - (emb[bos_id] @ v) * v + v * emb[bos_id].norm()
    mlp = lm.model.layers[0].mlp
    j = int(torch.randint(mlp.gate_proj.out_features, (1,), generator=gen))
    mlp.gate_proj.weight[j] = 4.0 * v
    mlp.up_proj.weight[j] = 4.0 * v
    mlp.down_proj.weight[:, j] = 0.0
    ids = torch.tensor([[bos_id, *range(5, 37)]])  # BOS + ordinary tokens
    x = _mlp_input(mlp, lambda: lm.model(input_ids=ids))[0]  # (S, H)
    act = mlp.act_fn(mlp.gate_proj(x))[:, j] * mlp.up_proj(x)[:, j]  # (S,)
    median = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, 1:].abs()
    gain = MASSIVE_RATIO * median.median() / act[0].abs().clamp_min(1e-6)
    for sign, d in zip((1.0, -1.0), MASSIVE_UNITS, strict=True):
        mlp.down_proj.weight[d % emb.shape[1], j] = sign * gain


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Both edits on a LlavaForConditionalGeneration, in place (deterministic for a seed)."""
    from svdprune_onnx.select import PruneConfig
    from svdprune_onnx.text import causal_lm
    from svdprune_onnx.vision import PrunedVision, vision_token_count

    n = vision_token_count(model)
    add_outlier_tokens(PrunedVision(model, PruneConfig(k=n, n=n, method="none")).eval(), seed)
    add_massive_activations(causal_lm(model), model.config.text_config.bos_token_id, seed)
