"""Tune fused tasks with MetaSchedule (TVM side, in the worker process).

One tuning run per build covers all the tasks it tunes: a pool of builder processes that
lives for the run (:func:`_make_pool_builder`), the runner the profile implies
(:func:`make_runner`: this machine, or a device leased from the profile's RPC tracker), and
the records committed to the user's tuning database only (see ``_layered``). Builders
export MetaSchedule's tar artifacts, which the runner's side links, so an RPC device needs
no cross-linked library here.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from voxfit.compile._import import is_gpu
from voxfit.compile._int8 import (
    intrin_of,
    is_int8_task,
    load_cpu_tensor_intrins,
    plain_space,
    space_for,
)
from voxfit.compile._lease import lease_bounded
from voxfit.compile._runner import RunnerKind

BUILD_FUNC = "voxfit.compile.build_without_intrinsics"


def _build(mod: tvm.IRModule, target: tvm.target.Target, _params: object) -> object:
    # MetaSchedule's default builder imports tvm.s_tir.tensor_intrin (CUDA/ROCm intrinsics,
    # ~100 s here) in every worker; CPU schedules need none of it.
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def register_builder() -> None:
    """Runs in this process and in each builder worker so ``f_build`` can name the function
    and builds lower ``exp`` as the final build does (:mod:`._fastmath`)."""
    from voxfit.compile import _fastmath

    _fastmath.register()
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


def _probe_tracker(host: str, port: int, timeout_s: float) -> None:
    """One connection attempt to the tracker, bounded: a dead tracker fails at once.

    TVM's own tracker client retries a refused connection for 60 s before it gives up.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(
            f"RPC tracker {host}:{port} unreachable ({e.strerror or type(e).__name__})"
        ) from None


def create_session(config: Any) -> Any:
    """``RPCRunner``'s ``f_create_session``: lease a device, every wait bounded.

    Runs in the runner's worker process. MetaSchedule's default retries a refused tracker
    for 60 s per trial and waits for a free device forever (a tracker whose device is gone
    keeps the request queued); here a dead tracker fails at once and the lease gives up
    after ``session_timeout_sec``.
    """
    from tvm import rpc

    host, port, key = config.tracker_host, int(config.tracker_port), config.tracker_key
    timeout_s = float(config.session_timeout_sec)
    _probe_tracker(host, port, timeout_s)
    return lease_bounded(
        lambda: rpc.connect_tracker(host, port),
        host,
        port,
        key,
        priority=config.session_priority,
        session_timeout_s=timeout_s,
        wait_s=timeout_s,
    )


def device_gone(host: str, port: int, key: str, timeout_s: float) -> str | None:
    """Why the tracker cannot lease ``key`` any more (unreachable, or no such device
    registered), or None while it can."""
    from tvm import rpc

    try:
        _probe_tracker(host, port, timeout_s)
    except ConnectionError as e:
        return str(e)
    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            box["summary"] = rpc.connect_tracker(host, port).summary()
        except Exception as e:  # noqa: BLE001 - reported as the reason below
            box["error"] = e

    th = threading.Thread(target=ask, daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive() or "error" in box:
        why = box.get("error", f"no answer within {timeout_s:g} s")
        return f"RPC tracker {host}:{port} does not answer ({why})"
    servers = box["summary"].get("server_info", [])
    if not any(str(x.get("key", "")).split(":")[-1] == key for x in servers):
        return f"RPC tracker {host}:{port} has no device with key {key!r} any more"
    return None


class DeviceLost(ConnectionError):
    """The RPC device (or its tracker) went away while tuning: the run stops; the records
    measured so far stay in the database and the next run tunes what is missing."""


def _device_watch(host: str, port: int, key: str, timeout_s: float, lost: list[str]) -> Any:
    """A measure callback (after the one that commits the batch) that stops tuning when a
    whole batch failed and the device is gone, instead of spending the rest of the budget
    building candidates that cannot be measured. The reason goes to ``lost`` too: the
    exception reaches :func:`tune` through TVM's C++ task scheduler, as a RuntimeError."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class DeviceWatch(PyMeasureCallback):
        def apply(
            self,
            task_scheduler: Any,
            task_id: int,
            measure_candidates: list[Any],
            builder_results: list[Any],
            runner_results: list[Any],
        ) -> None:
            if not runner_results or any(r.error_msg is None for r in runner_results):
                return
            why = device_gone(host, port, key, timeout_s)
            if why is not None:
                lost.append(why)
                raise DeviceLost(f"{why} during tuning")

    return DeviceWatch()


def make_runner(spec: dict[str, Any]) -> ms.runner.Runner:
    """The MetaSchedule runner a :class:`~voxfit.compile.RunnerSpec` (as a dict) describes.

    ``"local"``: :class:`LocalRunner` on this machine; ``"rpc"``: :class:`RPCRunner` with
    the tracker and device key (``tracker_key``), each measurement bounded by ``timeout_s``
    (MetaSchedule's ``session_timeout_sec``; the lease too, see :func:`create_session`).
    ``repeat`` (optional): timed repeats per measurement (default 1, MetaSchedule's).
    Constructing either connects to nothing.
    """
    kind: RunnerKind = spec["kind"]
    timeout_s = float(spec["timeout_s"])
    # MetaSchedule's evaluator: its defaults, with ``repeat`` timed repeats where asked
    evaluator = ms.runner.EvaluatorConfig(repeat=int(spec.get("repeat") or 1))
    match kind:
        case "local":
            return ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=evaluator)
        case "rpc":
            config = ms.runner.RPCConfig(
                tracker_host=spec["tracker_host"],
                tracker_port=int(spec["tracker_port"]),
                tracker_key=spec["device_key"],
                session_timeout_sec=timeout_s,
            )
            return ms.runner.RPCRunner(
                rpc_config=config, evaluator_config=evaluator, f_create_session=create_session
            )


def _measure_callbacks(spec: dict[str, Any], lost: list[str]) -> list[Any]:
    """MetaSchedule's default callbacks (commit, clean up, update the cost model), plus the
    device watch for an RPC runner (which says in ``lost`` why it stopped the run)."""
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    if spec["kind"] == "rpc":
        callbacks.append(
            _device_watch(
                spec["tracker_host"],
                int(spec["tracker_port"]),
                spec["device_key"],
                float(spec["timeout_s"]),
                lost,
            )
        )
    return callbacks


def _population(trials_per_task: int) -> int:
    """The evolutionary search's population: 128, or 8 per trial below 16 trials (16 at
    least: the unmeasured candidates it starts from)."""
    return min(128, max(16, 8 * trials_per_task))


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

    Raises:
        DeviceLost: an RPC runner's tracker or device went away; every batch measured
            before stays committed to ``database``.
    """
    if not tasks or trials_per_task <= 0 or is_gpu(target):
        return 0
    load_cpu_tensor_intrins(str(target.attrs.get("mtriple", "")))
    builder = _make_pool_builder(cores, builder_timeout_s)
    ctxs, weights = [], []
    intrin = intrin_of(target)
    int8 = [t for t in tasks if intrin and is_int8_task(t.task_name)]
    x86 = str(target.attrs.get("mtriple", "")).startswith("x86_64")
    for group, space in (
        (int8, space_for(intrin) if int8 else None),
        (
            [t for t in tasks if not any(t is i for i in int8)],
            plain_space() if x86 else "post-order-apply",
        ),
    ):
        if not group:
            continue
        c, w = ms.relax_integration.extracted_tasks_to_tune_contexts(
            group,
            str(log_dir),
            space=space,
            # A smaller population than the default 512: budgets here are tens of trials
            # per task, and evolving 512 candidates per round costs more than measuring;
            # a budget of a few trials (a test device) evolves fewer still.
            strategy=ms.search_strategy.EvolutionarySearch(
                population_size=_population(trials_per_task),
                init_min_unmeasured=16,
                genetic_num_iters=2,
            ),
            num_threads=cores,
            seed=seed,
        )
        ctxs += list(c)
        weights += list(w)
    lost: list[str] = []
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
            measure_callbacks=_measure_callbacks(runner, lost),
        )
    except Exception:
        if lost:
            raise DeviceLost(f"{lost[0]} during tuning") from None
        raise
    finally:
        builder.shutdown()
    return trials_per_task * len(ctxs)


def measure_seeded(
    tasks: list[Any],
    seed: ms.database.Database,
    database: ms.database.Database,
    target: tvm.target.Target,
    *,
    top_k: int,
    cores: int,
    builder_timeout_s: float,
    runner: dict[str, Any],
) -> tuple[int, list[Any], list[str]]:
    """Measure the seed profile's ``top_k`` best schedules of each task on this device and
    commit them to ``database`` with this device's run times.

    A seed's run times were measured on another device, so its best there need not be the
    best here, and a library that mixes the seed's schedules with the device's own is timed
    by two devices' rankings. Measured here, every record the device's database holds was
    timed on the device, and tuning (``tune_seeded``) starts from them (MetaSchedule's
    evolutionary search seeds its population with the database's best records).

    Returns the records committed, the tasks none of whose seed schedules built and ran
    here (a seed for another ISA variant: those need tuning on the device), and why each
    schedule that did not was rejected.

    Raises:
        DeviceLost: an RPC runner's tracker or device went away (nothing is committed for
            the tasks not measured yet).
    """

    if not tasks or is_gpu(target):
        return 0, [], []
    jobs: list[tuple[Any, Any, Any]] = []  # (task, schedule, args_info) per schedule
    errors: list[str] = []
    for t in tasks:
        mod = t.dispatched[0]
        if not seed.has_workload(mod):
            continue
        for r in seed.get_top_k(seed.commit_workload(mod), top_k):
            sch, why = _replay(mod, r.trace)
            if sch is None:
                errors.append(f"{t.task_name}: {why}")
                continue
            jobs.append((t, sch, r.args_info))
    timed, build_errors = time_schedules(
        jobs, target, cores=cores, builder_timeout_s=builder_timeout_s, runner=runner,
        what="the seed profile's schedules",
    )  # fmt: skip
    errors += [f"{t.task_name}: {e}" for t, e in build_errors]
    committed = 0
    ok: set[int] = set()
    for (t, sch, args_info), res in timed:
        failed = _commit_timed(database, t.dispatched[0], sch, args_info, res, target)
        if failed is not None:
            errors.append(f"{t.task_name}: {failed}"[-400:])
            continue
        committed += 1
        ok.add(id(t))
    return committed, [t for t in tasks if id(t) not in ok], errors


def _commit_timed(
    database: ms.database.Database,
    mod: tvm.IRModule,
    sch: Any,
    args_info: Any,
    res: Any,
    target: tvm.target.Target,
) -> str | None:
    """Commit a schedule of ``mod`` with the run times this device measured (``res``, a
    MetaSchedule run result) to ``database``; or say why not (it did not run)."""
    if res.error_msg is not None or not res.run_secs:
        return str(res.error_msg)
    workload = database.commit_workload(mod)
    database.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, workload, list(res.run_secs), target, args_info)
    )
    return None


def _replay(mod: tvm.IRModule, trace: Any) -> tuple[Any, str]:
    """A record's trace applied to ``mod``: (the schedule, "") or (None, why it does not
    replay here)."""
    from tvm.s_tir import Schedule

    sch = Schedule(mod, debug_mask=0, error_render_level="detail")
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as e:  # noqa: BLE001 - a trace that does not replay here is skipped
        return None, f"the trace does not replay: {e}"[:300]
    return sch, ""


def time_schedules(
    jobs: list[tuple[Any, Any, Any]],
    target: tvm.target.Target,
    *,
    cores: int,
    builder_timeout_s: float,
    runner: dict[str, Any],
    what: str = "schedules",
) -> tuple[list[tuple[tuple[Any, Any, Any], Any]], list[tuple[Any, str]]]:
    """Build each job's schedule (``(tag, Schedule, args_info)``) for ``target`` and run
    the ones that built with ``runner`` (a CPU device). Returns (job, MetaSchedule run
    result) per built schedule (a result's ``error_msg`` says why it did not run) and
    (tag, why) per schedule that did not build.

    Raises:
        DeviceLost: an RPC runner's device answered none of the runs and its tracker says
            it is gone (``what`` names what was being measured).
    """
    import shutil

    builder = _make_pool_builder(cores, builder_timeout_s)
    try:
        built = builder.build([ms.builder.BuilderInput(s.mod, target) for _, s, _ in jobs])
    finally:
        builder.shutdown()
    runnable = [(j, b) for j, b in zip(jobs, built, strict=True) if b.error_msg is None]
    errors = [
        (j[0], str(b.error_msg)[-400:]) for j, b in zip(jobs, built, strict=True) if b.error_msg
    ]
    if not runnable:
        return [], errors
    run = make_runner(runner)
    try:
        futures = run.run(
            [ms.runner.RunnerInput(b.artifact_path, "cpu", j[2]) for j, b in runnable]
        )
        results = [f.result() for f in futures]
    finally:
        # here, not when garbage collection reaches the runner from one of its own threads
        # (its pool cannot join the thread it runs on: "Exception ignored" noise)
        run.pool.shutdown()
    for _, b in runnable:
        shutil.rmtree(Path(b.artifact_path).parent, ignore_errors=True)
    if runner["kind"] == "rpc" and all(r.error_msg is not None for r in results):
        why = device_gone(
            runner["tracker_host"],
            int(runner["tracker_port"]),
            runner["device_key"],
            float(runner["timeout_s"]),
        )
        if why is not None:
            raise DeviceLost(f"{why} while measuring {what}")
    return [(j, r) for (j, _), r in zip(runnable, results, strict=True)], errors


def time_database(
    source: ms.database.Database,
    workloads: list[Any],
    out: ms.database.Database,
    target: tvm.target.Target,
    *,
    cores: int,
    builder_timeout_s: float,
    runner: dict[str, Any],
) -> tuple[int, list[str]]:
    """Time on this device the schedule ``source`` would compile each of ``workloads``
    (MetaSchedule ``Workload``\\ s) with (its best record) and commit it to ``out`` with
    this device's run times: a kernel table of this device for the schedules a library
    built from ``source`` runs (:mod:`voxfit.cost_models._kernels`). A workload ``source``
    has no record of, whose trace does not replay or that does not build or run is left
    out, with why. Returns (records committed, errors).

    Raises:
        DeviceLost: an RPC runner's device went away.
    """

    jobs: list[tuple[Any, Any, Any]] = []
    errors: list[str] = []
    for w in workloads:
        rec = source.query_tuning_record(w.mod, target, "main")
        if rec is None:
            errors.append(f"{w.as_json()[0]}: no record")
            continue
        sch, why = _replay(w.mod, rec.trace)
        if sch is None:
            errors.append(f"{w.as_json()[0]}: {why}")
            continue
        jobs.append((w, sch, rec.args_info))
    timed, build_errors = time_schedules(
        jobs, target, cores=cores, builder_timeout_s=builder_timeout_s, runner=runner,
        what="the database's schedules",
    )  # fmt: skip
    errors += [f"{w.as_json()[0]}: {e}" for w, e in build_errors]
    committed = 0
    for (w, sch, args_info), res in timed:
        failed = _commit_timed(out, w.mod, sch, args_info, res, target)
        if failed is not None:
            errors.append(f"{w.as_json()[0]}: {failed}"[-400:])
            continue
        committed += 1
    return committed, errors
