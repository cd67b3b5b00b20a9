"""Prune a Qwen2.5-VL video per slice or across the clip? Measured, not assumed.

    python -m bench.video_pruning [QWEN2.5-VL CHECKPOINT DIR] [--frames 8] [--k 16]

Clips: a camera pan over each shared photo (F crops of 448x336 sliding across it; slices of 2
frames, 192 merged tokens each). Per clip, with transformers' tower and language model:
  per slice   exact leverage (r = 8) of each slice's tokens, top K per slice   (what the bundle's
              image graph does, one call per slice: the tower attends within a slice anyway)
  across clip exact leverage (rank r * T) of all T*N tokens at once, top T*K
  uniform     every (N / K)-th token of each slice (a baseline)
Figures: KL(unpruned || pruned) of the first answer token's distribution (the whole prompt,
kept tokens at their original (t, h, w), as the runtime feeds them), the fewest tokens any slice
keeps (a slice with 0 is a moment the model cannot see), and the clip-wide leverage mass kept.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from bench.video_profile import pan_clip
from runtime import contract as C
from runtime.media import Video, load_video
from runtime.preprocess_qwen import preprocess_qwen_video, vision_from_processor
from svdprune_onnx.leverage import exact_leverage
from svdprune_onnx.tiny_qwen import ensure_tiny_qwen25vl

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
RANK = 8


def pan(photo: Path, frames: int, folder: Path) -> Video:
    """bench.video_profile's pan over `photo`, all `frames` frames (at 2 fps)."""
    return load_video(pan_clip(folder / photo.stem, frames, (448, 336), photo), frames)


def choices(feats: torch.Tensor, t: int, k: int) -> dict[str, np.ndarray]:
    """Kept indices into the clip's T*N tokens per strategy (ascending)."""
    n = feats.shape[0] // t
    per = [exact_leverage(feats[s * n : (s + 1) * n], RANK).topk(k).indices + s * n
           for s in range(t)]  # fmt: skip
    across = exact_leverage(feats, RANK * t).topk(t * k).indices  # r per slice, over the clip
    uniform = [torch.linspace(0, n - 1, k).round().long() + s * n for s in range(t)]
    out = {"per slice": torch.cat(per), "across clip": across, "uniform": torch.cat(uniform)}
    return {name: np.sort(idx.numpy()) for name, idx in out.items()}


def first_logits(model, ids, embeds, pos) -> torch.Tensor:
    lm = model.model.language_model
    h = lm(
        inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones(ids.shape)
    ).last_hidden_state
    return torch.log_softmax(model.lm_head(h[0, -1]).double(), -1)


def measure(model, tok, vision: dict, video: Video, k: int) -> dict[str, dict]:
    slices = preprocess_qwen_video(video.frames, vision)
    pixels = torch.from_numpy(np.concatenate([s[0] for s in slices]))
    t, h, w = len(slices), *(int(v) for v in slices[0][1][0, 1:])
    grid = torch.tensor([[t, h, w]])
    n_all = t * h * w // 4
    text = ("<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * n_all
            + "<|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        (feats,) = model.model.get_video_features(pixels, grid)
        pos, _ = model.model.get_rope_index(ids, None, grid, torch.tensor([2 / video.fps]),
                                            torch.ones_like(ids))  # fmt: skip
        emb = model.get_input_embeddings()(ids)
        is_vid = ids[0] == model.config.video_token_id
        emb[0, is_vid] = feats
        ref = first_logits(model, ids, emb, pos)
        lev = exact_leverage(feats.double(), RANK * t)  # the clip-wide leverage (rank r per slice)
        out = {}
        start = int(torch.nonzero(is_vid)[0])
        for name, kept in choices(feats, t, k).items():
            keep = ~is_vid.clone()
            keep[start + torch.as_tensor(kept)] = True
            p = first_logits(model, ids[:, keep], emb[:, keep], pos[:, :, keep])
            per_slice = np.bincount(kept // (n_all // t), minlength=t)
            out[name] = {
                "kl": float((ref.exp() * (ref - p)).sum()),
                "min_per_slice": int(per_slice.min()),
                "mass": float(lev[kept].sum() / lev.topk(len(kept)).values.sum()),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", type=Path)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args(argv)
    ckpt = args.checkpoint or ensure_tiny_qwen25vl()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    from transformers import Qwen2VLImageProcessor

    from export.qwen_export import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS

    vision = vision_from_processor(Qwen2VLImageProcessor.from_pretrained(ckpt).to_dict())
    vision |= {C.V_VIDEO_MIN_PIXELS: VIDEO_MIN_PIXELS, C.V_VIDEO_MAX_PIXELS: VIDEO_MAX_PIXELS}
    print("| clip | strategy | KL to unpruned | fewest tokens in a slice | leverage mass |")
    print("|---|---|---|---|---|")
    tmp = Path(tempfile.mkdtemp(prefix="video-pruning-"))
    for photo in sorted(p for p in IMAGES.iterdir() if p.suffix in {".jpg", ".png"}):
        res = measure(model, tok, vision, pan(photo, args.frames, tmp), args.k)
        for name, r in res.items():
            print(f"| {photo.name} | {name} | {r['kl']:.2e} | {r['min_per_slice']} | "
                  f"{r['mass']:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
