"""Build one exported program for a profile: the worker's ``build`` op (TVM side).

Import (``_import``) -> the fusion passes MetaSchedule keys its database on -> tasks ->
tune the tasks neither tuning database has (``_tune``, into the user's database over the
read-only shipped one, ``_layered``) -> those schedules applied to that same fused module ->
a shared library (cross-linked for Arm), or the executable kept in the worker for a local
measurement. Returns plain dicts (they cross a process boundary).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from voxfit.compile._database import check, locked
from voxfit.compile._executables import keep_executable
from voxfit.compile._import import int8_support, is_gpu, load_program, make_target
from voxfit.compile._int8 import SIGNED_LANES, load_cpu_tensor_intrins
from voxfit.compile._layered import SEED_MEASURE_K, open_layered
from voxfit.compile._tune import DeviceLost, measure_seeded, time_database, tune


def fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The passes compile_relax runs before applying the database (so task keys match)."""
    from tvm.relax import pipeline as rp

    try:
        dispatch = list(rp.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    seq = tvm.transform.Sequential(
        [
            *dispatch,
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )
    with target, tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def _compile_fused(db: Any, fused: tvm.IRModule, target: tvm.target.Target) -> Any:
    """``compile_relax`` for a module :func:`fuse` already fused: apply the database's
    schedules (DLight for GPU functions it lacks), lower and build. ``compile_relax`` would
    run the fusion passes again (~1 s of a warm re-measure here)."""
    from tvm.relax import pipeline as rp
    from tvm.relax.transform import MetaScheduleApplyDatabase
    from tvm.s_tir import dlight as dl

    try:
        rest = [*rp.dataflow_lower_passes(target), *rp.finalize_passes(target)]
    except (ValueError, AttributeError):  # 0.27's CPU/CUDA packages do not export them
        from tvm.relax.backend.cpu_generic import pipeline as cpu

        rest = [*cpu.dataflow_lower_passes(target), *cpu.finalize_passes(target)]
    gpu = is_gpu(target)

    @tvm.transform.module_pass(opt_level=3)
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = MetaScheduleApplyDatabase()(mod)
        if gpu:
            rules = (
                dl.gpu.Matmul(),
                dl.gpu.GEMV(),
                dl.gpu.Reduction(),
                dl.gpu.GeneralReduction(),
                dl.gpu.Fallback(),
            )
            mod = dl.ApplyDefaultSchedule(*rules)(mod)
        return tvm.transform.Sequential(rest)(mod)

    with target, db, tvm.transform.PassContext(opt_level=3):
        return relax.build(fused, target=target, relax_pipeline=pipeline)


def _static_memory_bytes(mod: tvm.IRModule, target: tvm.target.Target) -> int | None:
    """Bytes of the storage TVM's static memory planner allocates for ``main``."""
    try:
        with target, tvm.transform.PassContext(opt_level=3):
            planned = tvm.transform.Sequential(
                [
                    relax.transform.RewriteDataflowReshape(),
                    relax.transform.ToNonDataflow(),
                    relax.transform.RemovePurityChecking(),
                    relax.transform.CallTIRRewrite(),
                    relax.transform.StaticPlanBlockMemory(),
                ]
            )(mod)
    except Exception:  # noqa: BLE001 - memory is an estimate; a failed plan is reported as None
        return None
    total = 0
    alloc = tvm.ir.Op.get("relax.memory.alloc_storage")

    def visit(e: object) -> None:
        nonlocal total
        if isinstance(e, relax.Call) and e.op.same_as(alloc):
            shape = e.args[0]
            if isinstance(shape, relax.ShapeExpr):
                n = 1
                for v in shape.values:
                    n *= int(v)
                total += n

    relax.analysis.post_order_visit(planned["main"], visit)
    return total


def constant_bytes(mod: tvm.IRModule) -> dict[str, int]:
    """Bytes of the constants the library carries (the model's weights as compiled), by
    dtype: what a device stores, the figure the size objective promises."""
    out: dict[str, int] = {}
    seen: list[Any] = []

    def visit(e: object) -> None:
        arr: Any = getattr(e, "value", None)  # a tensor constant (not a TIR scalar's int)
        if isinstance(e, tvm.ir.expr.Constant) and hasattr(arr, "shape"):
            if any(e.same_as(c) for c in seen):
                return
            seen.append(e)
            n = 1
            for d in arr.shape:
                n *= int(d)
            dtype = str(arr.dtype)
            out[dtype] = out.get(dtype, 0) + n * tvm.runtime.DataType(dtype).bits // 8

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return out


def task_keys(tasks: list[Any]) -> list[list[Any]]:
    """[name, workload key, weight, FLOPs] of each task: the key is the tuning database's
    (the workload's structural hash), so a task's record there can be looked up from a
    measured model's row (a latency model summing the device's own kernel times)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    out = []
    for t in tasks:
        mod = t.dispatched[0]
        try:
            flops = float(estimate_tir_flops(mod))
        except Exception:  # noqa: BLE001 - no estimate for this function: unknown
            flops = None
        out.append(
            [t.task_name, str(ms.database.Workload(mod).as_json()[0]), int(t.weight), flops]
        )
    return out


class _Imported(NamedTuple):
    """An exported program imported and fused for a profile's target, and its tasks."""

    target: tvm.target.Target
    fused: tvm.IRModule
    tasks: list[Any]
    how: str
    why: str | None
    n_int8: int
    int8_ok: bool
    int8_note: str
    lanes: int


def _import(profile: dict[str, Any], program: str) -> _Imported:
    target = make_target(profile)
    int8_ok, int8_note, lanes = int8_support(target)
    if not is_gpu(target):  # the tuner and the databases' traces (a seed's too) tensorize
        load_cpu_tensor_intrins(str(target.attrs.get("mtriple", "")))
    mod, how, why, n_int8 = load_program(program, int8=int8_ok, lanes=lanes)
    fused = fuse(mod, target)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    return _Imported(target, fused, tasks, how, why, n_int8, int8_ok, int8_note, lanes)


def tasks_of(req: dict[str, Any]) -> dict[str, Any]:
    """The worker's ``task_keys`` op: the :func:`task_keys` of an exported program as
    :func:`build` would compile it for the profile (nothing tuned, nothing built)."""
    return {"task_keys": task_keys(_import(req["profile"], req["program"]).tasks)}


# the last databases listed (kept, so no other object takes their ids) and their workloads
_WORKLOADS: list[tuple[tuple[Any, ...], dict[str, Any]]] = []


def _workloads(dbs: tuple[Any, ...]) -> dict[str, Any]:
    """The workloads of loaded databases by key (cached for the same database objects,
    which ``_layered`` replaces when their files change: listing every record of a
    multi-MB database takes seconds)."""
    kept = _WORKLOADS[0][0] if _WORKLOADS else ()
    if len(kept) == len(dbs) and all(a is b for a, b in zip(kept, dbs, strict=True)):
        return _WORKLOADS[0][1]
    by_key: dict[str, Any] = {}
    for db in dbs:
        for r in db.get_all_tuning_records():
            by_key.setdefault(str(r.workload.as_json()[0]), r.workload)
    _WORKLOADS[:] = [(dbs, by_key)]
    return by_key


def time_here(req: dict[str, Any]) -> dict[str, Any]:
    """The worker's ``time_here`` op: time on this device (``runner``) the schedules the
    profile's databases (the user's ``db_dir`` over the shipped ``shipped_db_dir``) would
    compile each of their workloads with, into the database ``out_dir``
    (:func:`~voxfit.compile._tune.time_database`). Workloads in a fixed order (by key),
    ``count`` of them from ``start``; those ``out_dir`` has already are skipped (a killed
    run resumes). Returns total (workloads), timed, skipped and errors."""
    profile = req["profile"]
    tuning = profile["tuning"]
    target = make_target(profile)
    if is_gpu(target):
        raise ValueError(f"{profile['name']}: timing schedules is for CPU devices")
    load_cpu_tensor_intrins(str(target.attrs.get("mtriple", "")))
    db_dir, out_dir = Path(req["db_dir"]), Path(req["out_dir"])
    shipped = req.get("shipped_db_dir")
    with locked(db_dir):
        dbs, _ = open_layered(db_dir, Path(shipped) if shipped else None)
        union = dbs.union()
        by_key = _workloads(dbs.layers)
    keys = sorted(by_key)
    start, count = int(req.get("start", 0)), int(req.get("count", len(keys)))
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        out, _ = open_layered(out_dir, None)
        todo = [by_key[k] for k in keys[start : start + count]]
        fresh = [w for w in todo if not out.user.has_workload(w.mod)]
        runner = req.get("runner") or {"kind": "local", "timeout_s": tuning["runner_timeout_s"]}
        try:
            timed, errors = time_database(
                union, fresh, out.user, target, cores=int(profile["cores"]),
                builder_timeout_s=float(tuning["builder_timeout_s"]), runner=runner,
            )  # fmt: skip
        finally:
            out.committed()
    return {
        "total": len(keys),
        "timed": timed,
        "skipped": len(todo) - len(fresh),
        "errors": errors[:20],
    }


def _kept(e: DeviceLost, db_dir: Path) -> DeviceLost:
    kept = check(db_dir).records
    return DeviceLost(
        f"{e}; the {kept} records measured so far are kept in {db_dir}: run again once the "
        "device is back to tune only what is missing"
    )


def build(req: dict[str, Any]) -> dict[str, Any]:
    """Compile one exported program for the profile; tune tasks neither database has.

    Request keys: program, profile (dict), db_dir (the user's tuning database: locked,
    repaired, takes new records and MetaSchedule's logs), shipped_db_dir (the shipped
    database, read-only; absent, None or missing files: none), runner (a ``RunnerSpec``
    dict; default: this machine), tune (bool), export (bool), lib_out, seed, and
    retune_trials: tune every task (not only new ones) that many more trials, starting from
    the best record of either database (for a model to be deployed: more trials than the
    search spends).

    Returns n_tasks, new_tasks, task_names, tuned_trials, tune_s, build_s, lib, memory and
    timings. Raises for a broken input or a torn shipped database (the worker turns that
    into an error result).
    """
    profile = req["profile"]
    tuning = profile["tuning"]
    t0 = time.monotonic()
    target, fused, tasks, how, why, n_int8, int8_ok, int8_note, lanes = _import(
        profile, req["program"]
    )
    db_dir = Path(req["db_dir"])
    shipped = req.get("shipped_db_dir")
    out: dict[str, Any] = {
        "n_tasks": len(tasks),
        "task_names": [t.task_name for t in tasks],
        "task_keys": task_keys(tasks),
        "convert_s": time.monotonic() - t0,
        "import": how,
    }
    if why:
        out["import_fallback"] = why
    if n_int8:
        out["int8"] = {"layers": n_int8, "compute": "int8" if int8_ok else "float32"}
        out["int8"]["note"] = int8_note
        out["int8"]["product"] = "s8 x s8" if lanes == SIGNED_LANES else "u8 x s8"
    runner = req.get("runner") or {"kind": "local", "timeout_s": tuning["runner_timeout_s"]}
    with locked(db_dir):
        t_db = time.monotonic()
        seed_dir = req.get("seed_db_dir")
        dbs, out["db_repair"] = open_layered(
            db_dir,
            Path(shipped) if shipped else None,
            Path(seed_dir) if seed_dir else None,
            keys=[k[1] for k in out["task_keys"]],
        )
        out["db_load_s"] = time.monotonic() - t_db
        seeded = dbs.seeded(tasks, target)
        missing = dbs.missing(tasks, target)
        if req.get("tune", True) and seeded:
            # the seed's best schedules timed on this device become the device's records;
            # a task none of whose seed schedules runs here is tuned here
            t_seed = time.monotonic()
            try:
                out["seed_measured_records"], unserved, errors = measure_seeded(
                    seeded,
                    dbs.seed,
                    dbs.user,
                    target,
                    top_k=SEED_MEASURE_K,
                    cores=int(profile["cores"]),
                    builder_timeout_s=float(tuning["builder_timeout_s"]),
                    runner=runner,
                )
            except DeviceLost as e:
                raise _kept(e, db_dir) from None
            finally:
                dbs.committed()
            gone = {id(t) for t in unserved}
            seeded = [t for t in seeded if id(t) not in gone]
            out["seed_measured_tasks"] = [t.task_name for t in seeded]
            out["seed_measure_s"] = time.monotonic() - t_seed
            if errors:
                out["seed_measure_errors"] = errors[:10]
            missing += unserved
        # tune_seeded: tune on this device what the seed profile's schedules served, starting
        # from them where they were measured here
        missing += seeded if req.get("tune_seeded") else []
        out["new_tasks"] = len(missing)
        out["new_task_names"] = [t.task_name for t in missing]
        retune = int(req.get("retune_trials") or 0)
        todo = tasks if retune else missing
        t1 = time.monotonic()
        tuned = 0
        if req.get("tune", True) and todo:
            try:
                if retune:
                    out["seeded_records"] = dbs.seed_from_shipped(todo)
                tuned = tune(
                    todo,
                    dbs.user,
                    target,
                    trials_per_task=retune or int(tuning["trials_per_task"]),
                    trials_per_iter=int(tuning["trials_per_iter"]),
                    cores=int(profile["cores"]),
                    builder_timeout_s=float(tuning["builder_timeout_s"]),
                    runner=runner,
                    log_dir=db_dir / "logs",
                    seed=req.get("seed", 0),
                )
            except DeviceLost as e:
                raise _kept(e, db_dir) from None
            finally:
                dbs.committed()
        out["tuned_trials"] = tuned
        # which schedules the library runs: tuned on this device, or the seed profile's
        out["seeded_tasks"] = (
            [t.task_name for t in dbs.seeded(tasks, target)] if dbs.seed is not None else []
        )
        out["tuner"] = runner["kind"]
        out["tune_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        ex = _compile_fused(dbs.union(), fused, target)
    out["compile_relax_s"] = time.monotonic() - t2
    t3 = time.monotonic()
    out["memory_bytes"] = _static_memory_bytes(fused, target)
    out["constant_bytes"] = constant_bytes(fused)
    out["memory_plan_s"] = time.monotonic() - t3
    lib = Path(req["lib_out"])
    lib.parent.mkdir(parents=True, exist_ok=True)
    cross = profile.get("cross_compiler")
    out["exported"] = bool(req.get("export", True))
    if not out["exported"]:
        # Local measurement only: keep the executable here instead of linking a library.
        keep_executable(str(lib), ex)
    elif cross:
        from tvm.support import cc

        ex.export_library(str(lib), fcompile=cc.cross_compiler(cross))
    else:
        ex.export_library(str(lib))
    out["build_s"] = time.monotonic() - t2
    out["export_library_s"] = time.monotonic() - t3 - out["memory_plan_s"]
    out["lib"] = str(lib)
    return out
