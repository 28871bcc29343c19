"""Run by test_tvm_smoke.py in a fresh interpreter: tune, build and run a matmul with TVM.

A separate process, because TVM's thread pool may change the process's CPU affinity and
its script parser walks ``inspect.stack()``, which is far slower in a process that has torch
and the rest of the suite imported. The builder skips MetaSchedule's default build
function, which imports ``tvm.s_tir.tensor_intrin`` (CUDA/ROCm intrinsics: ~100 s on this
machine) in every worker; a CPU matmul needs none of it. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import te  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

BUILD_FUNC = "voxfit.tests.build_without_intrinsics"


def _build(mod: tvm.IRModule, target: tvm.target.Target, _params: object) -> object:
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _register() -> None:
    """Runs in each builder worker (and here) so ``f_build`` can name the function."""
    tvm.register_global_func(BUILD_FUNC, override=True)(_build)


def main(work_dir: str) -> None:
    _register()
    a = te.placeholder((32, 64), "float32", name="A")
    b = te.placeholder((64, 48), "float32", name="B")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((32, 48), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    db = ms.tune_tir(
        mod,
        target,
        work_dir,
        max_trials_global=4,
        num_trials_per_iter=4,
        builder=ms.builder.LocalBuilder(
            max_workers=1, timeout_sec=180, f_build=BUILD_FUNC, initializer=_register
        ),
        runner=ms.runner.LocalRunner(timeout_sec=60),
        num_tuning_cores=1,
        seed=0,
        # Random traces and a random cost model: this checks the pipeline (search space,
        # build, run, database JSON), not search quality.
        strategy="replay-trace",
        cost_model="random",
    )
    records = db.get_all_tuning_records()
    sch = ms.tir_integration.compile_tir(db, mod, target)
    lib = tvm.compile(sch.mod, target=target)
    dev = tvm.cpu()
    an = np.random.default_rng(0).standard_normal((32, 64)).astype("float32")
    bn = np.random.default_rng(1).standard_normal((64, 48)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((32, 48), "float32"), dev)
    lib["main"](tvm.runtime.tensor(an, dev), tvm.runtime.tensor(bn, dev), out)
    print(
        json.dumps(
            {
                "tvm": tvm.__version__,
                "tvm_ffi": tvm_ffi.__version__,
                "records": len(records),
                "measured": sum(1 for r in records if r.run_secs),
                "max_abs_err": float(np.abs(out.numpy() - an @ bn).max()),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
