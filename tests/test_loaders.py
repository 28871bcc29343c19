"""Loaders of user files stay light and fail in one line.

Loading a space, a hardware profile or a plan must not pull in torch, TVM or Optuna (STYLE:
"loading a YAML must be instant"); the subprocess sees a fresh interpreter, so modules other
tests imported do not hide a leak.
"""

from __future__ import annotations

import subprocess
import sys


def test_spaces_profiles_and_plans_import_without_torch_tvm_or_optuna() -> None:
    code = (
        "import sys, voxfit.spaces, voxfit.hw_profiles, voxfit.plan, voxfit.structure\n"
        "heavy = sorted(m for m in ('torch', 'tvm', 'optuna') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"importing the loaders imported {out}"
