"""transformers.js vs the runtime on real photos: pixel_values and kept tokens, cause by cause.

    runtime.preprocess + vision graph (ORT, Python)  ─► reference pixels, kept_indices
    node examples/node/agreement.mjs (one process per bundle, all photos), two paths:
      processor  transformers.js 4.3.1's own image processor (sharp)   ─► |diff|, kept overlap
      bundle     examples/node/preprocess.mjs (PIL's resampling in JS) ─► |diff|, kept overlap
    --causes adds one cause at a time: JPEG/PNG decode (sharp vs Pillow bytes), resize size
    rounding, resize kernel (sharp at the runtime's size), float64 vs float32 normalisation.

    python -m bench.tjs_agreement [BUNDLE ...] [--photos all|3] [--causes]

Without BUNDLE it exports the tiny CLIP+Llama and SigLIP+Qwen2 bundles (K=16) under
build/tjs-agreement/. Needs node + npm (npm ci into build/node-cache/<hash>/ on first use).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime import contract as C
from runtime.preprocess import load_image, preprocess, resize_size

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "examples" / "node"
NODE_FILES = ("package.json", "package-lock.json")
NODE_SCRIPTS = (
    *("greedy_ids.mjs", "answer.mjs", "bundle.mjs", "preprocess.mjs", "agreement.mjs"),
    "qwen_answer.mjs",
)
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "build" / "tjs-agreement"


def photos(which: str = "all") -> list[Path]:
    """The 3 demo photos, plus (all) the 128 coco128 train photos."""
    pick = sorted((SHARED / "images").glob("*.[jp][pn]g"))
    if which == "all":
        pick += sorted((SHARED / "coco128" / "images" / "train").glob("*.jpg"))
    return pick


def node_cache() -> Path:
    """build/node-cache/<hash of package.json + lock>/ with node_modules and our scripts.

    Runs `npm ci --ignore-scripts` once: onnxruntime-node ships its CPU binaries in the tarball;
    its install script only downloads GPU ones. RuntimeError (with npm's stderr) on failure.
    """
    npm = shutil.which("npm")
    if not shutil.which("node") or not npm:
        raise RuntimeError(
            "node and npm are required (Node >= 18), e.g. apt-get install nodejs npm"
        )
    digest = hashlib.sha256(b"".join((NODE_DIR / f).read_bytes() for f in NODE_FILES))
    cache = REPO / "build" / "node-cache" / digest.hexdigest()[:16]
    if not (cache / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in NODE_FILES:
            shutil.copy2(NODE_DIR / f, tmp / f)
        proc = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=tmp, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"npm ci failed in {tmp}:\n{proc.stderr[-3000:]}")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    # beside node_modules, so `import '@huggingface/transformers'` resolves
    for script in NODE_SCRIPTS:
        shutil.copy2(NODE_DIR / script, cache / script)
    return cache


def run_node(node_dir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["node", *args], cwd=node_dir, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"node {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc


def reference(bundle: Path, paths: list[Path], raw: Path) -> tuple[np.ndarray, list[str]]:
    """Write the runtime's pixels (N,3,H,W float32) to `raw`; its kept_indices (N,K) and the
    sha256 of each decoded RGB image."""
    vision = json.loads((bundle / C.MANIFEST_FILE).read_text())[C.KEY_VISION]
    sess = ort.InferenceSession(str(bundle / C.VISION_ONNX), providers=["CPUExecutionProvider"])
    kept, decoded = [], []
    with raw.open("wb") as f:
        for path in paths:
            image = load_image(path)
            decoded.append(hashlib.sha256(image.tobytes()).hexdigest())
            pixels = preprocess(image, vision)[None]  # (1,3,H,W)
            f.write(pixels.tobytes())
            _, k = sess.run(None, {C.PIXEL_VALUES: pixels})
            kept.append(k[0])
    return np.stack(kept), decoded


def compare(
    bundle: Path, paths: list[Path], node_dir: Path, processor: bool = True, causes: bool = False
) -> dict:
    """Per path (bundle, processor, and with causes the one-cause paths): pixel max/mean |diff|
    and kept-index overlap vs the runtime, worst and mean over the photos."""
    with tempfile.TemporaryDirectory(prefix="tjs-agreement-") as tmp:
        raw = Path(tmp) / "reference.f32"
        kept, decoded = reference(bundle, paths, raw)
        req, out = Path(tmp) / "request.json", Path(tmp) / "out.json"
        req.write_text(json.dumps({"bundle": str(bundle.resolve()), "reference": str(raw),
                                   "images": [str(p.resolve()) for p in paths],
                                   "processor": processor, "causes": causes}))  # fmt: skip
        run_node(node_dir, "agreement.mjs", str(req), str(out))
        rows = json.loads(out.read_text())["results"]
    summary = {"photos": len(paths)}
    for name in [k for k, v in rows[0].items() if isinstance(v, dict)]:
        diff = np.array([r[name]["max_abs_diff"] for r in rows])
        mean = np.array([r[name]["mean_abs_diff"] for r in rows])
        ov = np.array(
            [
                len(set(r[name]["kept_indices"]) & set(k.tolist())) / len(k)
                for r, k in zip(rows, kept, strict=True)
            ]
        )
        summary[name] = {
            "pixel_max_abs_diff": float(diff.max()),
            "pixel_mean_abs_diff": float(mean.mean()),
            "photos_exact": int((diff == 0).sum()),
            "overlap_mean": float(ov.mean()),
            "overlap_min": float(ov.min()),
            "photos_same_tokens": int((ov == 1).sum()),
        }
    if causes:
        vision = json.loads((bundle / C.MANIFEST_FILE).read_text())[C.KEY_VISION]
        summary["decode_differs"] = [
            Path(r["image"]).name
            for r, d in zip(rows, decoded, strict=True)
            if r["decoded_sha256"] != d
        ]
        summary["resize_size_differs"] = [
            Path(r["image"]).name
            for r, p in zip(rows, paths, strict=True)
            if vision[C.V_RESIZE] and r["processor_resize"] != list(_size(p, vision[C.V_RESIZE]))
        ]
    return summary


def _size(path: Path, shortest: int) -> tuple[int, int]:
    image = load_image(path)
    return resize_size(image.height, image.width, shortest)


def export_defaults() -> list[Path]:
    """Tiny CLIP+Llama and SigLIP+Qwen2 bundles (K=16) under build/tjs-agreement/."""
    from export.__main__ import cli
    from svdprune_onnx.tiny import ensure_tiny_llava

    out = []
    for tower, text in (("clip", "llama"), ("siglip", "qwen2")):
        ckpt = ensure_tiny_llava(OUT / "ckpt", tower=tower, text=text)
        bundle = OUT / f"{tower}-k16"
        if not (bundle / C.MANIFEST_FILE).is_file():
            assert cli(["-m", str(ckpt), "--k", "16", "-o", str(bundle)]) == 0
        out.append(bundle)
    return out


PATHS = {
    "bundle": "preprocess.mjs (the fix)",
    "processor": "transformers.js's own processor",
    "sharp_kernel": "  only sharp's resize kernel",
    "processor_size": "  only its resize size rounding",
    "double_normalise": "  only its float64 normalisation",
}


def table(results: dict) -> str:
    """Markdown: per bundle and path, pixel |diff| and kept-index overlap over the photos."""
    from bench.report import md_table

    head = ["bundle", "path", "pixel max abs diff", "pixel mean abs diff", "photos exact",
            "kept overlap mean", "kept overlap worst", "photos, same K tokens"]  # fmt: skip
    body = []
    for bundle, s in results.items():
        for key, name in PATHS.items():
            if key in s:
                r, n = s[key], s["photos"]
                body.append([bundle, name, f"{r['pixel_max_abs_diff']:.3g}",
                             f"{r['pixel_mean_abs_diff']:.3g}", f"{r['photos_exact']}/{n}",
                             f"{r['overlap_mean']:.3f}", f"{r['overlap_min']:.3f}",
                             f"{r['photos_same_tokens']}/{n}"])  # fmt: skip
    return md_table(head, body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "bundles", nargs="*", type=Path, help="bundle folders (default: tiny CLIP, SigLIP)"
    )
    ap.add_argument("--photos", choices=("all", "3"), default="all")
    ap.add_argument("--causes", action="store_true", help="measure each cause on its own")
    args = ap.parse_args(argv)
    node_dir = node_cache()
    paths = photos(args.photos)
    results = {}
    for bundle in args.bundles or export_defaults():
        results[bundle.name] = compare(bundle, paths, node_dir, causes=args.causes)
        print(bundle.name, json.dumps(results[bundle.name], indent=1), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "agreement.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
