"""Run every (method, K) and the unpruned reference over the questions, resumably.

questions ─► group by image
for job in [none@N, m@K[@positions] for K in KS for m in METHODS (for positions in --positions)]:
    bundle graphs (exact: features from PyTorch, gram's text graphs at K)
    per image:  pixels ─► vision once ─► (features, kept), the image's token count
                torch (LLaVA): scored features X ─► IPR(X), IPR(X[kept]), exact leverage mass of
                kept; Qwen2.5-VL: none (eval/torch_side.py is LLaVA's PrunedVision), the
                statistics are recorded as absent (null), never estimated
    per question not in the cache:
                prompt ids (with the image's count) ─► Pipeline.generate(vision_out=...)
                ─► first logits, text ─► answer ─► (reference: save logits)
                ─► KL / top-1 vs reference ─► cache line

Both families run through runtime.generate.Pipeline: LLaVA pixels are (1, 3, H, W); Qwen2.5-VL
pixels are [(pixel_values, grid)] at the image's own size (with the bundle's K floor), and an
unpruned Qwen bundle's prompt holds every merged token of the image (a count per image).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval import answers as A
from eval.bundles import EXACT, NONE
from eval.cache import Cache, fingerprint
from eval.metrics import kl_divergence, leverage_mass, top1_agree
from eval.pope import Question
from eval.torch_side import TorchSide
from export.manifest import prune_config
from runtime import contract as C
from runtime.bundle import load_manifest
from runtime.generate import Pipeline, Sampling
from runtime.preprocess import load_image, preprocess_batch
from runtime.session import SessionConfig

# LLaVA-1.5's instruction for POPE and other short-answer benchmarks.
DEFAULT_SUFFIX = " Answer the question using a single word or phrase."
# Per-image statistics of the PyTorch side where there is none (Qwen2.5-VL): absent, not faked.
NO_STATS = {"ipr": None, "ipr_kept": None, "leverage_mass": None}


@dataclass(frozen=True)
class Job:
    """One evaluated configuration: a method at K, run on `bundle`'s graphs."""

    method: str
    k: int
    bundle: Path
    config: str  # fingerprint of everything that decides its answers
    positions: str | None = None  # the bundle's pruning.position_ids (compact / original)
    tagged: bool = False  # this run compares positions modes: they name its configurations

    @property
    def is_reference(self) -> bool:
        return self.method == NONE

    @property
    def label(self) -> str:
        mode = f" {self.positions}" if self.tagged and not self.is_reference else ""
        return f"{self.method} K={self.k}{mode}"


@dataclass(frozen=True)
class Options:
    """How answers are produced; part of every job's fingerprint."""

    answer: str = A.LOGITS
    max_new_tokens: int = 8
    suffix: str = DEFAULT_SUFFIX
    session: SessionConfig = field(default_factory=SessionConfig)

    def sampling(self) -> Sampling:
        # Logits scoring needs only the first token; text needs a short greedy answer.
        return Sampling(max_new_tokens=1 if self.answer == A.LOGITS else self.max_new_tokens)


def make_job(method: str, bundle: Path, src: Path, opts: Options, tagged: bool = False) -> Job:
    """The job for `method` on `bundle` (for exact: the host bundle with method exact).

    The fingerprint covers the whole pruning section, so the positions mode (and a Qwen
    bundle's score site, token floor) tell configurations apart in the cache."""
    pruning = dict(load_manifest(bundle, verify=False)[C.KEY_PRUNING])  # Pipeline verifies
    pruning[C.P_METHOD] = method
    spec = {"model": str(src), "pruning": pruning, "answer": opts.answer, "suffix": opts.suffix,
            "max_new_tokens": opts.sampling().max_new_tokens}  # fmt: skip
    config = f"{method}-k{pruning[C.P_K]}-{fingerprint(spec)}"
    positions = pruning.get(C.P_POSITIONS, C.POSITIONS_COMPACT)
    return Job(method, pruning[C.P_K], bundle, config, positions, tagged)


def by_image(questions: list[Question]) -> dict[Path, list[Question]]:
    """Distinct (image, question) pairs grouped by image, in first-seen order."""
    groups: dict[Path, dict[str, Question]] = defaultdict(dict)
    for q in questions:
        groups[q.image].setdefault(q.key, q)
    return {img: list(qs.values()) for img, qs in groups.items()}


def pending(job: Job, groups: dict[Path, list[Question]], cache: Cache) -> int:
    return sum(cache.get(job.config, q.key) is None for qs in groups.values() for q in qs)


class Runner:
    """Runs jobs against one cache; the reference job must run before the others.

    `torch_side` None (Qwen2.5-VL): no exact pruning, the per-image statistics are absent."""

    def __init__(
        self, src: Path, cache: Cache, torch_side: TorchSide | None, opts: Options
    ) -> None:
        self.src, self.cache, self.torch, self.opts = src, cache, torch_side, opts
        self.reference: Job | None = None
        self._pixels: dict[tuple[Path, str], np.ndarray] = {}
        self._images: dict[Path, object] = {}  # decoded PIL images (Qwen2.5-VL)

    def pixels(self, image: Path, pipe: Pipeline):
        """The vision inputs of one image: LLaVA (1, 3, H, W) pixel values, decoded and resized
        once per image (PIL is the slow part), keyed by the manifest's vision section too,
        though all bundles of one model share it. Qwen2.5-VL: [(pixel_values, grid)] at the
        image's own size (and the bundle's K floor); only the decoded image is kept (the
        patches of every image at every floor would take gigabytes), resized per job."""
        if pipe.qwen:
            if image not in self._images:
                self._images[image] = load_image(image)
            return pipe.preprocess([self._images[image]])
        vision = pipe.m[C.KEY_VISION]
        key = (image, json.dumps(vision, sort_keys=True))
        if key not in self._pixels:
            self._pixels[key] = preprocess_batch([image], vision)
        return self._pixels[key]

    def run(self, job: Job, groups: dict[Path, list[Question]], progress) -> None:
        """Answer every question of `job` not yet in the cache, appending each as it finishes."""
        if not job.is_reference and self.reference is None:
            raise RuntimeError("run the reference (none) job first: pruned rows need its logits")
        if job.is_reference:
            self.reference = job
        if pending(job, groups, self.cache) == 0:
            return
        progress.set_postfix_str(job.label)
        pipe = Pipeline(job.bundle, self.opts.session)
        manifest = pipe.m
        cfg = prune_config({**manifest[C.KEY_PRUNING], C.P_METHOD: job.method})
        if job.method == EXACT and self.torch is None:
            raise RuntimeError(f"{job.label}: exact pruning needs the PyTorch side (LLaVA only)")
        yes_no = A.yes_no_ids(pipe.tokenizer) if self.opts.answer == A.LOGITS else None
        sampling = self.opts.sampling()
        for image, qs in groups.items():
            todo = [q for q in qs if self.cache.get(job.config, q.key) is None]
            if not todo:
                continue
            pixels = self.pixels(image, pipe)
            count = pipe.image_tokens(pixels)[0]  # K, or the image's N (unpruned Qwen)
            if job.method == EXACT:
                vision_out = self.torch.exact(pixels, cfg)
            else:
                vision_out = pipe.run_vision(pixels)
            if self.torch is None:
                stats = dict(NO_STATS)
            else:
                stats = self.image_stats(str(image), pixels, cfg, vision_out[1][0])
            stats["image_tokens"] = count
            for q in todo:
                ids = pipe.prompt_ids(q.question + self.opts.suffix, count)
                (res,) = pipe.generate(pixels, [ids], sampling, vision_out=vision_out)
                self.cache.put(self.row(job, q, res, yes_no, stats))
                progress.update(1)

    def image_stats(self, image: str, pixels: np.ndarray, cfg, kept: np.ndarray) -> dict:
        """IPR of all / kept scored features and the exact leverage mass of the kept tokens."""
        X = self.torch.scored_features(image, pixels, cfg)  # (N, d)
        lev = self.torch.leverage(image, X, cfg)  # (N,)
        return {
            "ipr": self.torch.image_ipr(image, X, cfg),
            "ipr_kept": self.torch.ipr(X[kept], cfg.center),
            "leverage_mass": leverage_mass(lev, kept),
        }

    def row(self, job: Job, q: Question, res, yes_no, stats: dict) -> dict:
        logits = np.asarray(res.first_logits, dtype=np.float32)  # (V,)
        row = {"config": job.config, "key": q.key, "method": job.method, "k": job.k,
               "positions": job.positions, "image": q.image.as_posix(),
               "question": q.question, "text": res.text, "top1": int(np.argmax(logits)),
               **stats}  # fmt: skip
        if yes_no is not None:
            row["answer"], row["margin"] = A.logit_answer(logits, *yes_no)
        else:
            row["answer"] = A.text_answer(res.text)
        if job.is_reference:
            self.cache.save_logits(job.config, q.key, logits)
            row["kl"], row["top1_agree"] = 0.0, True
        else:
            assert self.reference is not None
            ref = self.cache.load_logits(self.reference.config, q.key)
            row["kl"] = float(kl_divergence(ref, logits))
            row["top1_agree"] = bool(top1_agree(ref, logits))
        return row


def progress_bar(total: int, enabled: bool):
    """A tqdm bar on stderr (tqdm ships with transformers)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="q", file=sys.stderr, disable=not enabled, dynamic_ncols=True)
