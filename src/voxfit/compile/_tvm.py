"""The TVM side of compile and measure. Runs only inside the worker process (see _worker).

torch.export program -> Relax (``from_exported_program``, without torch's decomposition
re-trace where the ops allow) -> the fusion passes MetaSchedule keys its database on ->
tasks -> tune the tasks the profile's database lacks (one MetaSchedule run for all of them)
-> the database's schedules applied to that fused module -> a shared library (cross-linked
for Arm) -> ``time_evaluator`` locally or on a device leased from a TVM RPC tracker. Every
public function returns plain dicts (they cross a process boundary).
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms

from voxfit.compile._database import locked, repair
from voxfit.compile._qops import OP_NAME  # importing it registers voxfit::qconv1d
from voxfit.errors import ModelError

log = logging.getLogger(__name__)

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
    if name in sys.modules or _is_gpu(target):
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


def make_target(profile: dict[str, Any]) -> tvm.target.Target:
    host = profile.get("host_target")
    if host:
        return tvm.target.Target(profile["target"], host=host)
    return tvm.target.Target(profile["target"])


def check_target(profile: dict[str, Any]) -> str:
    """TVM's canonical form of the profile's target (raises if TVM rejects it)."""
    return str(make_target(profile))


Import = Literal["auto", "direct", "decomposed"]


def load_program(
    path: str, how: Import = "auto", int8: bool = True
) -> tuple[tvm.IRModule, str, str | None, int]:
    """The Relax module of a saved torch.export program.

    ``"direct"`` imports the program as exported: TVM's importer would otherwise first
    re-trace it through torch's decompositions (``"decomposed"``), ~1.5 s per input here, a
    third of a warm re-measure. For convolution-only graphs (the TDNN without adapters,
    pruned or quantized) the fused tasks are the same either way
    (tests/compile/test_import.py compares the workloads, which the tuning database is
    keyed by). ``"auto"`` imports directly unless the graph has an op the
    direct import mis-handles (attention with a boolean mask, which TVM's converter only
    asserts against) or fuses into other tasks (linear layers, e.g. adapters), or the
    direct import fails, and then decomposes.

    Args:
        path: a ``torch.export.save`` file.
        how: ``"auto"``, or force one import.
        int8: lower ``voxfit::qconv1d`` ops to int8 compute (else float32 convs of the
            dequantized weights; see :func:`int8_support`).

    Returns:
        The module, the import used, why ``"auto"`` fell back (None if it did not), and how
        many ``voxfit::qconv1d`` ops it converted.

    Raises:
        Exception: whatever TVM's importer raises for a forced import.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.load(path)
    qconv = _QConv1dConverter(ep, int8)
    fixes = {"div.Tensor_mode": _div_mode, OP_NAME: qconv}
    why = None
    if how == "auto":
        why = _needs_decomposition(ep)
    if how == "direct" or (how == "auto" and why is None):
        try:
            mod = from_exported_program(ep, run_ep_decomposition=False, custom_convert_map=fixes)
            return mod, "direct", None, qconv.count
        except (AssertionError, ValueError, TypeError, KeyError, NotImplementedError) as e:
            if how == "direct":
                raise
            why = f"direct import failed: {type(e).__name__}: {e}"[:300]
            log.info("%s: %s; importing decomposed", path, why)
    qconv.count = 0
    return from_exported_program(ep, custom_convert_map=fixes), "decomposed", why, qconv.count


def _needs_decomposition(ep: Any) -> str | None:
    """Why the direct import would not do for ``ep`` (None: it will)."""
    import torch

    why = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "scaled_dot_product_attention" in name:
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            val = getattr(mask, "meta", {}).get("val")
            if val is not None and val.dtype == torch.bool:
                why.append("attention with a boolean mask")
        if name.startswith("aten.linear"):
            # imported directly, a linear layer on a transposed activation (the adapters)
            # fuses into other tasks than the decomposed import's, which the shipped
            # tuning databases hold: decomposing keeps them valid
            why.append("linear layers fuse differently from the tuning database's tasks")
    return "; ".join(dict.fromkeys(why)) or None


def _div_mode(node: Any, importer: Any) -> relax.Var:
    """``aten.div.Tensor_mode`` of an integer tensor by a Python int: the divisor takes the
    tensor's dtype (TVM's converter makes it an int32 constant, which Relax refuses to
    divide an int64 tensor by -- our models' output lengths, ``lengths // 2``). Every other
    case is TVM's own converter."""
    args = importer.retrieve_args(node)
    x, y = args[0], args[1]
    mode = node.kwargs.get("rounding_mode")
    is_int = isinstance(x, relax.Expr) and str(x.ty.dtype).startswith(("int", "uint"))
    if not (is_int and isinstance(y, int) and mode in ("floor", "trunc")):
        return importer._div(node)  # type: ignore[no-any-return]
    bb = importer.block_builder
    d = relax.const(y, x.ty.dtype)
    if mode == "floor":
        return bb.emit(relax.op.floor_divide(x, d))  # type: ignore[no-any-return]
    return bb.emit(relax.op.trunc(bb.emit(relax.op.divide(x, d))))  # type: ignore[no-any-return]


def int8_support(target: tvm.target.Target) -> tuple[bool, str]:
    """Whether int8 ops compile to int8 compute on ``target``, and what to say about it.

    Only x86 targets without AVX-512BW/VNNI get it: there MetaSchedule's default rules have
    no int8 intrinsic, so the u8 x s8 -> s32 loops stay plain TIR that LLVM vectorizes
    (``vpmaddwd``), exact for full 8-bit inputs. On AVX-512/VNNI targets the default rules
    would tensorize to intrinsics that need pre-packed weights (TVM 0.27's VNNI one does not
    even compile with its LLVM 22), and the Arm and CUDA int8 rules are not verified here:
    those targets compute the dequantized weights in float32 and the result says so.
    """
    from tvm.target.codegen import target_has_features

    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "")).startswith("x86_64"):
        return False, f"int8 compute is built for x86 CPU targets only, not {target.kind.name}"
    for feat in ("avx512bw", "avx512vnni", "avxvnni"):
        if target_has_features(feat, target):
            return False, (
                f"{feat} target: MetaSchedule would tensorize int8 to intrinsics that need "
                "pre-packed weights (not built)"
            )
    return True, "not tensorized: MetaSchedule has no int8 dot-product intrinsic for this ISA"


def _tensor_of(ep: Any, node: Any) -> np.ndarray:
    """The value of a lifted buffer/constant placeholder of an exported program."""
    sig = ep.graph_signature
    if node.name in sig.inputs_to_buffers:
        return dict(ep.named_buffers())[sig.inputs_to_buffers[node.name]].numpy()  # type: ignore[no-any-return]
    if node.name in sig.inputs_to_lifted_tensor_constants:
        t = ep.constants[sig.inputs_to_lifted_tensor_constants[node.name]]
        return t.numpy()  # type: ignore[no-any-return]
    if node.name in sig.inputs_to_parameters:
        return ep.state_dict[sig.inputs_to_parameters[node.name]].detach().numpy()  # type: ignore[no-any-return]
    raise ModelError(f"qconv1d: {node.name} is not a constant of the program")


def _quantize_u8(x: Any, scale: float, zero: int) -> Any:
    """uint8 quantization rounding ties to even like torch.round (relax.quantize rounds them
    away from zero, a step off torch's fake quantization now and then)."""
    from tvm import te, tirx

    def f(*i: Any) -> Any:
        v = tirx.nearbyint(x(*i) / tirx.const(scale, "float32")) + tirx.const(zero, "float32")
        return tirx.max(tirx.min(v, 255.0), 0.0).astype("uint8")

    return te.compute(x.shape, f, name="quantize_u8")


class _QConv1dConverter:
    """``voxfit::qconv1d`` -> Relax: quantize the input to uint8, ``conv1d`` uint8 x int8 ->
    int32, dequantize with the zero-point correction folded into a per-channel zero point
    (``acc - z * sum(w)``, exact because the input is padded with ``z``), add the bias. With
    ``int8=False``: a float32 conv of the dequantized weights (the input is not rounded).
    Counts the layers it converted (``.count``)."""

    def __init__(self, ep: Any, int8: bool) -> None:
        self.ep = ep
        self.int8 = int8
        self.count = 0

    def __call__(self, node: Any, importer: Any) -> relax.Var:
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, w_scale, bias = (_tensor_of(self.ep, n) for n in node.args[1:4])
        x_scale, x_zero, stride, padding, dilation = node.args[4:9]
        self.count += 1
        b = relax.const(bias.astype("float32").reshape(1, -1, 1))
        if not self.int8:
            wf = w.astype("float32") * w_scale.astype("float32")[:, None, None]
            y = bb.emit(
                relax.op.nn.conv1d(
                    x, relax.const(wf), strides=stride, padding=padding, dilation=dilation
                )
            )
            return bb.emit(relax.op.add(y, b))  # type: ignore[no-any-return]
        if int(np.prod(w.shape[1:])) * 255 * 128 >= 2**31:
            raise ModelError(f"qconv1d: {w.shape[1]}x{w.shape[2]} taps could overflow int32")
        q = bb.emit_te(_quantize_u8, x, float(x_scale), int(x_zero), primfunc_name_hint="quantize")
        if x_zero and padding:
            pads = [0, 0, 0, 0, padding, padding]
            q = bb.emit(relax.op.nn.pad(q, pads, pad_value=float(x_zero)))
            padding = 0
        acc = bb.emit(
            relax.op.nn.conv1d(
                q,
                relax.const(w.astype("int8")),
                strides=stride,
                padding=padding,
                dilation=dilation,
                out_dtype="int32",
            )
        )
        corr = (int(x_zero) * w.astype("int64").sum(axis=(1, 2))).astype("int32")
        scale = (np.float32(x_scale) * w_scale.astype("float32")).astype("float32")
        y = bb.emit(
            relax.op.dequantize(
                acc, relax.const(scale), relax.const(corr), axis=1, out_dtype="float32"
            )
        )
        return bb.emit(relax.op.add(y, b))  # type: ignore[no-any-return]


def _fuse(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
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
    """``compile_relax`` for a module :func:`_fuse` already fused: apply the database's
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
    gpu = _is_gpu(target)

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


def _is_gpu(target: tvm.target.Target) -> bool:
    return str(target.kind.name) in ("cuda", "rocm", "vulkan", "opencl", "metal")


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


# Worker-process caches. The tuning database is re-read only when its files changed (a
# multi-MB JSON database takes seconds to parse); executables built without exporting a
# library are kept for the next local measurement (the last few only).
_DB_CACHE: dict[str, tuple[tuple[int, ...], Any]] = {}
_EXECUTABLES: dict[str, Any] = {}
_KEEP_EXECUTABLES = 4


def _db_signature(db_dir: Path) -> tuple[int, ...]:
    sig: list[int] = []
    for name in ("database_workload.json", "database_tuning_record.json"):
        st = (db_dir / name).stat()
        sig += [st.st_size, st.st_mtime_ns]
    return tuple(sig)


def _open_db(db_dir: Path) -> tuple[Any, str]:
    """The database of ``db_dir`` (caller holds the lock), repaired and loaded if changed."""
    key = str(db_dir.resolve())
    cached = _DB_CACHE.get(key)
    if (
        cached is not None
        and (db_dir / "database_workload.json").exists()
        and cached[0] == _db_signature(db_dir)
    ):
        return cached[1], "cached"
    report = repair(db_dir)
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    _DB_CACHE[key] = (_db_signature(db_dir), db)
    return db, repr(report)


def build(req: dict[str, Any]) -> dict[str, Any]:
    """Compile one exported program for the profile; tune tasks the database lacks.

    Request keys: program, profile (dict), db_dir, tune (bool), lib_out, seed, and
    retune_trials: tune every task (not only new ones) that many more trials, starting from
    the database's best (for a model to be deployed: more trials than the search spends).
    Returns n_tasks, new_tasks, task_names, tuned_trials, tune_s, build_s, lib, memory.
    """
    profile = req["profile"]
    tuning = profile["tuning"]
    target = make_target(profile)
    t0 = time.monotonic()
    int8_ok, int8_note = int8_support(target)
    mod, how, why, n_int8 = load_program(req["program"], int8=int8_ok)
    fused = _fuse(mod, target)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    db_dir = Path(req["db_dir"])
    out: dict[str, Any] = {
        "n_tasks": len(tasks),
        "task_names": [t.task_name for t in tasks],
        "convert_s": time.monotonic() - t0,
        "import": how,
    }
    if why:
        out["import_fallback"] = why
    if n_int8:
        out["int8"] = {"layers": n_int8, "compute": "int8" if int8_ok else "float32"}
        out["int8"]["note"] = int8_note
    gpu = _is_gpu(target)
    with locked(db_dir):
        t_db = time.monotonic()
        db, out["db_repair"] = _open_db(db_dir)
        out["db_load_s"] = time.monotonic() - t_db
        missing = [
            t
            for t in tasks
            if db.query_tuning_record(t.dispatched[0], target, t.task_name) is None
        ]
        out["new_tasks"] = len(missing)
        out["new_task_names"] = [t.task_name for t in missing]
        retune = int(req.get("retune_trials") or 0)
        trials = retune or int(tuning["trials_per_task"])
        todo = tasks if retune else missing
        t1 = time.monotonic()
        tuned = 0
        if req.get("tune", True) and todo and trials > 0 and not gpu:
            _light_tensor_intrin(target)
            builder = _make_pool_builder(int(profile["cores"]), float(tuning["builder_timeout_s"]))
            logs = db_dir / "logs"
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                todo,
                str(logs),
                # A smaller population than the default 512: budgets here are tens of
                # trials per task, and evolving 512 candidates per round costs more than
                # measuring them.
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=128, init_min_unmeasured=16, genetic_num_iters=2
                ),
                num_threads=int(profile["cores"]),
                seed=req.get("seed", 0),
            )
            try:
                ms.tune.tune_tasks(
                    tasks=ctxs,
                    task_weights=weights,
                    work_dir=str(logs / "run"),
                    max_trials_global=trials * len(ctxs),
                    max_trials_per_task=trials,
                    num_trials_per_iter=min(trials, int(tuning["trials_per_iter"])),
                    builder=builder,
                    runner=ms.runner.LocalRunner(timeout_sec=float(tuning["runner_timeout_s"])),
                    database=db,
                )
            finally:
                builder.shutdown()
                # the records went to disk through this very object: it is current
                _DB_CACHE[str(db_dir.resolve())] = (_db_signature(db_dir), db)
            tuned = trials * len(ctxs)
        out["tuned_trials"] = tuned
        out["tune_s"] = time.monotonic() - t1
        t2 = time.monotonic()
        ex = _compile_fused(db, fused, target)
    out["compile_relax_s"] = time.monotonic() - t2
    t3 = time.monotonic()
    out["memory_bytes"] = _static_memory_bytes(fused, target)
    out["memory_plan_s"] = time.monotonic() - t3
    lib = Path(req["lib_out"])
    lib.parent.mkdir(parents=True, exist_ok=True)
    cross = profile.get("cross_compiler")
    out["exported"] = bool(req.get("export", True))
    if not out["exported"]:
        # Local measurement only: keep the executable here instead of linking a library.
        _EXECUTABLES[str(lib)] = ex
        while len(_EXECUTABLES) > _KEEP_EXECUTABLES:
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    elif cross:
        from tvm.support import cc

        ex.export_library(str(lib), fcompile=cc.cross_compiler(cross))
    else:
        ex.export_library(str(lib))
    out["build_s"] = time.monotonic() - t2
    out["export_library_s"] = time.monotonic() - t3 - out["memory_plan_s"]
    out["lib"] = str(lib)
    return out


def _stats(secs: list[float]) -> dict[str, Any]:
    ms_ = sorted(s * 1e3 for s in secs)
    q = statistics.quantiles(ms_, n=4) if len(ms_) >= 2 else [ms_[0]] * 3
    return {
        "median_ms": statistics.median(ms_),
        "mean_ms": statistics.fmean(ms_),
        "min_ms": ms_[0],
        "max_ms": ms_[-1],
        "iqr_ms": q[2] - q[0],
        "samples_ms": ms_,
    }


def _input(frames: int, dev: tvm.runtime.Device) -> tvm.runtime.Tensor:
    """The timing input: one utterance of ``frames`` log-mel frames (fixed values)."""
    return tvm.runtime.tensor(
        np.random.default_rng(0).standard_normal((1, frames, 80)).astype("float32"), dev
    )


def _time_vm(
    vm: relax.VirtualMachine, dev: tvm.runtime.Device, frames: int, m: dict[str, Any]
) -> dict[str, Any]:
    x = _input(frames, dev)
    for _ in range(int(m["warmup"])):
        vm["main"](x)
    f = vm.time_evaluator(
        "main", dev, number=1, repeat=int(m["repeats"]), min_repeat_ms=int(m["min_repeat_ms"])
    )
    return _stats(list(f(x).results))


def _time_calls(vm: relax.VirtualMachine, dev: tvm.runtime.Device, frames: int, runs: int) -> list:
    """Per-call wall time of the compiled kernels, in call order: [name, median ms] each.

    The VM's instrument hook brackets every call instruction; VM builtins (allocation,
    shape checks) are left out, so the kernels' sum is a little below a whole-model time.
    """
    x = tvm.runtime.tensor(np.zeros((1, frames, 80), dtype="float32"), dev)
    per_run: list[list[tuple[str, float]]] = []
    calls: list[tuple[str, float]] = []
    started = [0.0]

    def instrument(_func: object, symbol: str, before: bool, _ret: object, *_args: object) -> int:
        if before:
            started[0] = time.perf_counter()
        elif not symbol.startswith("vm.builtin."):
            calls.append((symbol, time.perf_counter() - started[0]))
        return 0

    vm.set_instrument(instrument)
    try:
        for _ in range(runs + 1):  # the first run warms caches and is dropped
            calls.clear()
            vm["main"](x)
            per_run.append(list(calls))
    finally:
        vm.set_instrument(None)
    per_run = per_run[1:]
    return [
        [name, statistics.median(r[i][1] for r in per_run) * 1e3]
        for i, (name, _) in enumerate(per_run[0])
    ]


# Reference executables stay loaded for the worker's life (measure_local's ``reference``).
_REFERENCES: dict[str, Any] = {}


def _vm_of(lib: str, dev: tvm.runtime.Device) -> relax.VirtualMachine:
    ex = _EXECUTABLES.get(lib)
    return relax.VirtualMachine(ex if ex is not None else tvm.runtime.load_module(lib), dev)


def _time_paired(
    vm: relax.VirtualMachine,
    ref: relax.VirtualMachine,
    dev: tvm.runtime.Device,
    frames: int,
    m: dict[str, Any],
) -> dict[str, Any]:
    """Time ``vm`` and a reference model in alternating rounds (one sample each per round).

    The machine's speed drifts (shared host: 1.5-2x over hours, bursts of load within
    seconds); the median of the per-round ratios cancels what both runs of a round share.
    """
    x = _input(frames, dev)
    for _ in range(int(m["warmup"])):
        vm["main"](x)
        ref["main"](x)
    kw = {"number": 1, "repeat": 1, "min_repeat_ms": int(m["min_repeat_ms"])}
    f, g = vm.time_evaluator("main", dev, **kw), ref.time_evaluator("main", dev, **kw)
    mine, theirs = [], []
    for _ in range(int(m["repeats"])):
        mine.append(f(x).results[0])
        theirs.append(g(x).results[0])
    out = _stats(mine)
    out["reference_ms"] = statistics.median(theirs) * 1e3
    ratios = sorted(a / b for a, b in zip(mine, theirs, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    out["relative"] = statistics.median(ratios)
    out["relative_iqr"] = q[2] - q[0]
    return out


def measure_local(req: dict[str, Any]) -> dict[str, Any]:
    """Time ``lib`` on this machine (request keys: lib, frames, measurement, device,
    ``calls``: how many instrumented runs give per-kernel times, 0 for none, and
    ``reference``: a library timed in rounds alternating with ``lib``, 0/None for none)."""
    dev = tvm.cuda(0) if req.get("device") == "cuda" else tvm.cpu(0)
    vm = _vm_of(req["lib"], dev)
    if req.get("reference"):
        if req["reference"] not in _REFERENCES:
            _REFERENCES[req["reference"]] = _vm_of(req["reference"], dev)
        ref = _REFERENCES[req["reference"]]
        out = _time_paired(vm, ref, dev, int(req["frames"]), req["measurement"])
    else:
        out = _time_vm(vm, dev, int(req["frames"]), req["measurement"])
    out["threads"] = int(os.environ.get("TVM_NUM_THREADS", "0"))
    if int(req.get("calls", 0)) > 0:
        out["calls"] = _time_calls(vm, dev, int(req["frames"]), int(req["calls"]))
    return out


def run_local(req: dict[str, Any]) -> dict[str, Any]:
    """Run ``lib`` once on ``input`` (a numpy array) here; returns the output array."""
    dev = tvm.cuda(0) if req.get("device") == "cuda" else tvm.cpu(0)
    vm = _vm_of(req["lib"], dev)
    out = vm["main"](tvm.runtime.tensor(np.asarray(req["input"], dtype="float32"), dev))
    first = out[0] if not hasattr(out, "numpy") else out
    return {"output": first.numpy()}


def _check_tracker(host: str, port: int, key: str, timeout_s: float) -> None:
    """Fail in bounded time, in one line, when the tracker or the device key is missing."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConnectionError(
            f"RPC tracker {host}:{port} unreachable ({reason}) for device key {key!r} "
            f"after {timeout_s:g} s"
        ) from None


def tracker_summary(req: dict[str, Any]) -> dict[str, Any]:
    """Free servers per device key at a tracker (request keys: host, port)."""
    from tvm import rpc

    _check_tracker(req["host"], int(req["port"]), "*", 5.0)
    summary = rpc.connect_tracker(req["host"], int(req["port"])).summary()
    queue = summary.get("queue_info", {})
    return {"keys": {k: int(v.get("free", 0)) for k, v in queue.items()}}


def measure_rpc(req: dict[str, Any]) -> dict[str, Any]:
    """Upload ``lib`` to a device leased from the tracker and time it there."""
    from tvm import rpc

    r = req["rpc"]
    host, port, key = r["tracker_host"], int(r["tracker_port"]), r["device_key"]
    timeout_s = float(r["connect_timeout_s"])
    _check_tracker(host, port, key, timeout_s)
    tracker = rpc.connect_tracker(host, port)
    summary = tracker.summary()
    keys = set(summary.get("queue_info", {}))
    if key not in keys:
        raise ConnectionError(
            f"RPC tracker {host}:{port} has no device with key {key!r} "
            f"(registered: {', '.join(sorted(keys)) or 'none'})"
        )
    box: dict[str, Any] = {}

    def lease() -> None:
        try:
            box["remote"] = tracker.request(
                key, priority=1, session_timeout=float(r["session_timeout_s"])
            )
        except Exception as e:  # noqa: BLE001 - re-raised below in this thread
            box["error"] = e

    th = threading.Thread(target=lease, daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(
            f"RPC tracker {host}:{port}: no free device with key {key!r} within {timeout_s:g} s"
        )
    if "error" in box:
        raise box["error"]
    remote = box["remote"]
    lib = Path(req["lib"])
    remote.upload(str(lib))
    rlib = remote.load_module(lib.name)
    dev = remote.cuda(0) if req.get("device") == "cuda" else remote.cpu(0)
    vm = relax.VirtualMachine(rlib, dev)
    out = _time_vm(vm, dev, int(req["frames"]), req["measurement"])
    out["device_key"] = key
    del vm, rlib, remote  # frees the one-slot server for the next lease
    return out
