"""Cold start of `python -m runtime.run`, this tree against an earlier commit, side by side.

git worktree of REV (build/coldstart/base) ┐  each tree exports its own bundle (its graphs)
this tree                                   ┘  and answers the same photo + prompt, CPU
R rounds, the two trees interleaved: wall time of the whole process (start, bundle open,
sessions, preprocess, vision, prefill, 8 tokens), its own timings (ttft, load when reported)
first call (checksums, self-test) reported apart from the repeat calls

python -m bench.coldstart [--base REV] [--preset tiny|medium] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO.parent / "shared" / "data" / "images" / "coco_cats.png"


def _tree(base: str, root: Path) -> Path:
    """A worktree of `base` under `root` (reused when it is already at that commit)."""
    path = root / "base"
    rev = subprocess.run(
        ["git", "rev-parse", base], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    head = path / ".git"
    if head.exists():
        at = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        if at == rev:
            return path
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=True)
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO, check=True)
    shared = root / "shared"  # the worktree finds ../shared/data as the repo does
    if not shared.exists():
        shared.symlink_to(REPO.parent / "shared")
    return path


def _rev(tree: Path) -> str:
    """The tree's commit, short, with "+" when it has uncommitted changes (never reused)."""
    git = ["git", "-C", str(tree)]
    rev = subprocess.run([*git, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    return rev + "+" * bool(dirty)


def _export(tree: Path, out: Path, preset: str) -> None:
    """Export once per commit: a bundle folder named after another commit is never reused."""
    if (out / "svdprune.json").is_file() and not out.name.split("-")[1].endswith("+"):
        return
    for stale in (out, out.with_name(out.name + ".selftest")):  # and its self-test cache
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "export", "--preset", preset, "--k", "16", "-o", str(out)]
    subprocess.run(cmd, cwd=tree, check=True, capture_output=True)


def _answer(tree: Path, bundle: Path) -> dict:
    cmd = [sys.executable, "-m", "runtime.run", "-m", str(bundle), "-i", str(PHOTO)]
    cmd += ["-p", "What is in the image?", "--provider", "cpu", "--json", "--max-new-tokens", "8"]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=True)
    wall = (time.perf_counter() - t) * 1e3
    timings = json.loads(p.stdout.strip().splitlines()[-1])["timings_ms"]
    return {"wall_ms": wall, **timings}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.coldstart", description=__doc__)
    ap.add_argument("--base", default="HEAD", help="the commit to compare with")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "medium"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    root = REPO / "build" / "coldstart"
    trees = {"base": _tree(args.base, root), "this": REPO}
    bundles = {n: root / f"{n}-{_rev(tree)}-{args.preset}-k16" for n, tree in trees.items()}
    for name, tree in trees.items():
        _export(tree, bundles[name], args.preset)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds + 1):  # the first round is each bundle's first call
        for name, tree in trees.items():
            runs[name].append(_answer(tree, bundles[name]))
    head = "first call ms | repeat calls: wall ms | ttft ms | load ms"
    print(f"| {args.preset}, K = 16, CPU | {head} |")
    print("|---|---|---|---|---|")
    for name in trees:
        first, rest = runs[name][0], runs[name][1:]

        def med(key: str, rest: list[dict] = rest) -> str:
            vals = [r[key] for r in rest if key in r]
            return f"{statistics.median(vals):.0f}" if vals else "-"

        label = f"{args.base} (before)" if name == "base" else "this tree"
        row = f"| {label} | {first['wall_ms']:.0f} | {med('wall_ms')} | {med('ttft')} | "
        print(row + f"{med('load')} |")
    (root / f"coldstart-{args.preset}.json").write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
