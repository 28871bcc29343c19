"""The pinned TVM works in this venv: import, a MetaSchedule tune, a build that computes right.

(apache-tvm-ffi 0.1.15 segfaults in MetaSchedule; this is the check that the pin holds.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.tvm


def test_metaschedule_tunes_and_builds_a_matmul(tmp_path: Path) -> None:
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import tvm
    import tvm_ffi
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    assert tvm.__version__ == "0.27.0.post1"
    assert tvm_ffi.__version__.startswith("0.1.14")
    a = te.placeholder((32, 64), "float32", name="A")
    b = te.placeholder((64, 48), "float32", name="B")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((32, 48), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    db = ms.tune_tir(
        mod,
        target,
        str(tmp_path),
        max_trials_global=4,
        num_trials_per_iter=4,
        builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=180),
        runner=ms.runner.LocalRunner(timeout_sec=60),
        num_tuning_cores=1,
        seed=0,
        # Random traces and a random cost model: this checks the pipeline (search space,
        # build, run, database JSON), not search quality, so skip the evolutionary search.
        strategy="replay-trace",
        cost_model="random",
    )
    records = db.get_all_tuning_records()
    assert records, "MetaSchedule produced no tuning records"
    assert any(r.run_secs for r in records)  # at least one candidate really ran
    sch = ms.tir_integration.compile_tir(db, mod, target)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=target)
    dev = tvm.cpu()
    an = np.random.default_rng(0).standard_normal((32, 64)).astype("float32")
    bn = np.random.default_rng(1).standard_normal((64, 48)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((32, 48), "float32"), dev)
    lib["main"](tvm.runtime.tensor(an, dev), tvm.runtime.tensor(bn, dev), out)
    np.testing.assert_allclose(out.numpy(), an @ bn, rtol=1e-4, atol=1e-4)
