"""Option combinations that used to end in a traceback or a needless refusal.

--method exact   the float64 SVD reference: one `error:` line, exit 2, before any loading
--k 4            the default rank (8) is clamped to K, so small budgets export as is
--k 4 --rank 8   an explicit rank above K stays an error (tests/test_bad_inputs_export.py)
"""

from __future__ import annotations

import json
import subprocess
import sys

from export.__main__ import cli, resolve_rank
from runtime import contract as C
from svdprune_onnx.select import PruneConfig

from .conftest import REPO


def test_method_exact_is_one_error_line(tmp_path) -> None:
    # As a user runs it: a fresh process, so a traceback anywhere on the way would show.
    out = tmp_path / "b"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--method", "exact", "-o", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "cannot be exported" in err and "--method gram" in err
    assert not out.exists()


def test_default_rank_is_clamped_to_k() -> None:
    assert resolve_rank(None, 4) == 4
    assert resolve_rank(None, 64) == PruneConfig.rank
    assert resolve_rank("k", 32) == 32
    assert resolve_rank("12", 4) == 12  # explicit: kept, refused later with the fix


def test_k4_exports_with_rank_4(tiny_clip, tmp_path) -> None:
    out = tmp_path / "k4"
    assert cli(["-m", str(tiny_clip), "--k", "4", "-o", str(out)]) == 0
    manifest = json.loads((out / C.MANIFEST_FILE).read_text())
    assert manifest[C.KEY_PRUNING][C.P_K] == 4
    assert manifest[C.KEY_PRUNING][C.P_RANK] == 4
