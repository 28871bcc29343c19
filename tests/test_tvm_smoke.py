"""The pinned TVM works in this venv: import, a MetaSchedule tune, a build that computes right.

(apache-tvm-ffi 0.1.15 segfaults in MetaSchedule; this is the check that the pin holds.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tvm


def test_metaschedule_tunes_and_builds_a_matmul(tmp_path: Path) -> None:
    child = Path(__file__).with_name("tvm_smoke_child.py")
    res = subprocess.run(
        [sys.executable, str(child), str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]  # a segfault shows here as -11
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["tvm"] == "0.27.0.post1"
    assert out["tvm_ffi"].startswith("0.1.14")
    assert out["records"] > 0, "MetaSchedule produced no tuning records"
    assert out["measured"] > 0  # at least one candidate really ran
    assert out["max_abs_err"] < 1e-3
