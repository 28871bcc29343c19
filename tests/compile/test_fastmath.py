"""exp lowered to vector arithmetic (voxfit.compile._fastmath): accurate, and no libm call
left in the machine code of a vectorized SiLU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("tvm")

# A vectorized x * sigmoid(x) (the Conformer's FFN epilogue) built for a generic x86-64 CPU,
# before and after the rule is registered. The rule is process-global, so the comparison
# runs in a fresh interpreter.
_SCRIPT = r"""
import json, sys
import numpy as np, tvm
from tvm import te, tirx
from voxfit.compile import _fastmath

def build():
    n = 4096
    a = te.placeholder((n,), name="A")
    b = te.compute((n,), lambda i: tirx.sigmoid(a[i]) * a[i], name="B")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
    (i,) = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(sch.split(i, [None, 8])[1])
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    lib = tvm.compile(sch.mod, target=target)
    x = np.concatenate([np.linspace(-120, 120, n - 4), [0.0, -88.0, 88.0, 1e-3]]).astype("float32")
    out = tvm.runtime.tensor(np.zeros(n, "float32"))
    lib(tvm.runtime.tensor(x), out)
    ref = x.astype("float64") / (1 + np.exp(-x.astype("float64")))
    err = np.abs(out.numpy() - ref) / np.maximum(np.abs(ref), 1e-30)
    ll = lib.mod.inspect_source("ll")
    return {
        "libm": "llvm.exp" in ll or "expf" in ll,
        "max_rel": float(err[np.abs(ref) > 1e-30].max()),
        "finite": bool(np.isfinite(out.numpy()).all()),
    }

before = build()
_fastmath.register()
_fastmath.register()  # idempotent
print(json.dumps({"before": before, "after": build()}))
"""


def test_registered_exp_is_vector_arithmetic_within_float_precision() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["before"]["libm"], "TVM's own lowering calls libm's exp"
    assert not got["after"]["libm"], "with the rule no exp call is left"
    assert got["after"]["finite"]
    # float32 epsilon is 1.2e-7: the error of a few roundings, as libm's
    assert got["after"]["max_rel"] < 3e-7, got
