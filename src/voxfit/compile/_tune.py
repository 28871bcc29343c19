"""Tune fused tasks with MetaSchedule (TVM side, in the worker process).

One tuning run per build covers all the tasks it tunes: a pool of builder processes that
lives for the run (:func:`_make_pool_builder`), the runner the profile implies
(:func:`make_runner`: this machine, or a device leased from the profile's RPC tracker), and
the records committed to the user's tuning database only (see ``_layered``). Builders
export MetaSchedule's tar artifacts, which the runner's side links, so an RPC device needs
no cross-linked library here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from voxfit.compile._import import is_gpu
from voxfit.compile._runner import RunnerKind

BUILD_FUNC = "voxfit.compile.build_without_intrinsics"


def _build(mod: tvm.IRModule, target: tvm.target.Target, _params: object) -> object:
    # MetaSchedule's default builder imports tvm.s_tir.tensor_intrin (CUDA/ROCm intrinsics,
    # ~100 s here) in every worker; CPU schedules need none of it.
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def register_builder() -> None:
    """Runs in this process and in each builder worker so ``f_build`` can name the function."""
    tvm.register_global_func(BUILD_FUNC, override=True)(_build)


def _make_pool_builder(max_workers: int, timeout_s: float) -> ms.builder.Builder:
    """A MetaSchedule builder whose worker processes live for the whole tuning run.

    The stock LocalBuilder starts a fresh process pool for every batch (each worker
    re-imports TVM: seconds per batch, most of a small tuning budget). Building in this
    process instead has no timeout, and a pathological schedule can spend many minutes in
    LLVM (seen here: one batch hung a run for 12 minutes). So: one pool per run, a per-build
    timeout that kills only the stuck worker, workers recycled every 64 builds.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import (
        _serialize_params,
        _worker_func,
    )
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    pool = PopenPoolExecutor(
        max_workers=max_workers,
        timeout=timeout_s,
        initializer=register_builder,
        maximum_process_uses=64,
    )

    @derived_object
    class PoolBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            args = [
                (BUILD_FUNC, None, b.mod, b.target, _serialize_params(b.params))
                for b in build_inputs
            ]
            results = []
            for r in pool.map_with_error_catching(lambda x: _worker_func(*x), args):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_s:g} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {r.value}"[:2000]))
            return results

        def shutdown(self) -> None:
            pool.shutdown()

    return PoolBuilder()  # type: ignore[no-any-return]


def _light_tensor_intrin(target: tvm.target.Target) -> None:
    """Register only the tensor intrinsics a CPU target can use before MetaSchedule runs.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` whole, which builds the CUDA, ROCm,
    Hexagon and RISC-V intrinsic tables too: ~100 s on this machine for nothing a CPU
    schedule uses. Installing the package without running its ``__init__`` and importing
    just the x86 (VNNI/AVX-512) or Arm (dot-product) tables keeps tensorization working.
    """
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules or is_gpu(target):
        return
    import tvm.s_tir

    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    sys.modules[name] = pkg
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm")):
        import tvm.s_tir.tensor_intrin.arm_cpu  # noqa: F401
    else:
        import tvm.s_tir.tensor_intrin.x86  # noqa: F401


def make_runner(spec: dict[str, Any]) -> ms.runner.Runner:
    """The MetaSchedule runner a :class:`~voxfit.compile.RunnerSpec` (as a dict) describes.

    ``"local"``: :class:`LocalRunner` on this machine; ``"rpc"``: :class:`RPCRunner` with
    the tracker and device key (``tracker_key``), each measurement bounded by ``timeout_s``
    (MetaSchedule's ``session_timeout_sec``). Constructing either connects to nothing.
    """
    kind: RunnerKind = spec["kind"]
    timeout_s = float(spec["timeout_s"])
    match kind:
        case "local":
            return ms.runner.LocalRunner(timeout_sec=timeout_s)
        case "rpc":
            config = ms.runner.RPCConfig(
                tracker_host=spec["tracker_host"],
                tracker_port=int(spec["tracker_port"]),
                tracker_key=spec["device_key"],
                session_timeout_sec=timeout_s,
            )
            return ms.runner.RPCRunner(rpc_config=config)


def tune(
    tasks: list[Any],
    database: ms.database.Database,
    target: tvm.target.Target,
    *,
    trials_per_task: int,
    trials_per_iter: int,
    cores: int,
    builder_timeout_s: float,
    runner: dict[str, Any],
    log_dir: Path,
    seed: int = 0,
) -> int:
    """Tune ``tasks`` ``trials_per_task`` trials each into ``database`` (one run for all).

    Starts from the database's best records of each task (MetaSchedule's evolutionary
    search seeds its population with them). Returns the trials spent (0 for a GPU target,
    whose kernels come from DLight's default schedules, or for nothing to tune).
    """
    if not tasks or trials_per_task <= 0 or is_gpu(target):
        return 0
    _light_tensor_intrin(target)
    builder = _make_pool_builder(cores, builder_timeout_s)
    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks,
        str(log_dir),
        # A smaller population than the default 512: budgets here are tens of trials per
        # task, and evolving 512 candidates per round costs more than measuring them.
        strategy=ms.search_strategy.EvolutionarySearch(
            population_size=128, init_min_unmeasured=16, genetic_num_iters=2
        ),
        num_threads=cores,
        seed=seed,
    )
    try:
        ms.tune.tune_tasks(
            tasks=ctxs,
            task_weights=weights,
            work_dir=str(log_dir / "run"),
            max_trials_global=trials_per_task * len(ctxs),
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=min(trials_per_task, trials_per_iter),
            builder=builder,
            runner=make_runner(runner),
            database=database,
        )
    finally:
        builder.shutdown()
    return trials_per_task * len(ctxs)
