"""Latency of the base model and compressed variants: torch eager, onnxruntime, tuned TVM.

In one run on this machine, for the profile's primary input (1 s of audio, batch 1):
torch eager and onnxruntime with the profile's thread count (in this process), and TVM
through the profile's persistent tuning database (in the TVM worker process). It also
times MetaSchedule tuning of the base model with an empty database (``cold_tune_s``) and a
full re-measure of a candidate whose shapes are all tuned (``warm_remeasure_s``: export +
compile + measure). ``tvm_vs_ort_ratio`` comes from rounds alternating onnxruntime and
TVM on the base model (the host's speed drifts between the per-model rows);
``--base-trials N`` first tunes the base model's tasks N more trials each, as a deployment
would for its final model (the database keeps the best record). Writes
``benchmarks/results/latency.json`` and a plotly bar chart.

    python benchmarks/latency.py --work work     # profile: the first local one this CPU runs
    python benchmarks/latency.py --profile x86-avx2-2core --trials 32 --base-trials 256
"""

from __future__ import annotations

import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from _common import parser, provenance, resolve_profile, write_result
from voxfit.compile import compile_model
from voxfit.compress import apply, export_onnx, export_onnx_static_int8
from voxfit.hw_profiles import HardwareProfile
from voxfit.latency import LatencyResult, TvmLocalEstimator
from voxfit.metrics import packed_size_bytes
from voxfit.models import build_model, count_parameters, default_config
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan, plan_of

N_OUTPUTS = 55  # the default corpus's phone inventory + blank
ROUNDS = 7  # alternating onnxruntime / TVM rounds for the base model's ratio


def variants(
    base: nn.Module, multiple: int, calibration: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, nn.Module]:
    """The base model and compressed variants (pruning is what changes shapes; w8a8 is the
    int8-compute one)."""
    s = base.structure()  # type: ignore[operator]
    groups = [g.name for g in s.groups]
    hidden = [g for g in groups if g != "stream"]
    slots = [x.name for x in s.adapter_slots]

    def c(keep: dict[str, float], wbits: int = 32, dim: int = 0, abits: int = 32) -> Candidate:
        return Candidate(
            groups=tuple(GroupPlan(g, r) for g, r in keep.items()),
            layers=tuple(LayerPlan(q, wbits, abits) for q in s.quantizable) if wbits != 32 else (),
            adapters=tuple(AdapterPlan(x, dim) for x in slots) if dim else (),
        )

    plans = {
        "base-fp32": c({}),
        "w8": c({}, wbits=8),
        "w8a8": c({}, wbits=8, abits=8),
        "hidden50": c(dict.fromkeys(hidden, 0.5)),
        "hidden25": c(dict.fromkeys(hidden, 0.25)),
        "all50": c(dict.fromkeys(groups, 0.5)),
        "all50+adapters24": c(dict.fromkeys(groups, 0.5), dim=24),
        "all75+w4": c(dict.fromkeys(groups, 0.25), wbits=4),
    }
    return {
        k: apply(base, p, channel_multiple=multiple, calibration=calibration)
        for k, p in plans.items()
    }


def _stats(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=4)
    return {"median_ms": statistics.median(ms), "iqr_ms": q[2] - q[0]}


def time_torch(model: nn.Module, frames: int, repeats: int) -> dict[str, float]:
    model.eval()
    x, n = torch.randn(1, frames, 80), torch.tensor([frames])
    out = []
    with torch.inference_mode():
        for _ in range(5):
            model(x, n)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x, n)
            out.append((time.perf_counter() - t0) * 1e3)
    return _stats(out)


def time_ort(path: Path, frames: int, threads: int, repeats: int) -> dict[str, float]:
    from voxfit.latency import time_onnxruntime

    t = time_onnxruntime(path, frames, threads, repeats)
    return {"median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"]}


def _with_db(profile: HardwareProfile, db: Path, trials: int | None) -> HardwareProfile:
    t = replace(profile.tuning, database_dir=str(db.resolve()))
    if trials is not None:
        t = replace(t, trials_per_task=trials)
    return replace(profile, tuning=t, inputs=profile.inputs[:1])


def _breakdown(r: LatencyResult) -> dict[str, Any]:
    """Where a re-measure's seconds went: torch.export, Relax import + fusion + task
    extraction, database, compile with the database, memory plan, library link, timing."""
    c = r.compile
    if c is None:
        return {}
    d = c.details
    return {
        "torch_export": c.export_s,
        "import_fuse_extract": d.get("convert_s"),
        "database": d.get("db_load_s"),
        "compile": d.get("compile_relax_s"),
        "memory_plan": d.get("memory_plan_s"),
        "link": d.get("export_library_s"),
        "measure": r.measure_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser("latency", __doc__, profile=True, cost_models=True)
    ap.add_argument("--trials", type=int, default=None, help="override trials_per_task")
    ap.add_argument("--size", default="default", choices=["tiny", "default"])
    ap.add_argument("--repeats", type=int, default=50, help="torch/onnxruntime timing runs")
    ap.add_argument(
        "--base-trials",
        type=int,
        default=0,
        help="first tune the base model's tasks this many more trials each in the persistent "
        "database (what a deployment does for its final model); 0: none",
    )
    args = ap.parse_args(argv)
    console = Console()
    t_start = time.monotonic()

    profile = resolve_profile(args.profile)
    frames = profile.primary_input.frames
    threads = profile.cores
    torch.set_num_threads(threads)
    work = args.work / "latency" / profile.name
    shutil.rmtree(work / "builds", ignore_errors=True)
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", N_OUTPUTS, args.size)).eval()
    calib = [(torch.randn(2, 200, 80), torch.tensor([200, 150])) for _ in range(2)]
    models = variants(base, profile.channel_multiple, calib)

    rows: list[dict[str, Any]] = []
    console.print(f"profile {profile.name}: {threads} threads, {frames} frames")
    for name, m in models.items():
        info = {
            "model": name,
            "params": count_parameters(m),
            "packed_mb": packed_size_bytes(m) / 1e6,
        }
        rows.append({**info, "runtime": "torch", **time_torch(m, frames, args.repeats)})
        onnx_path = work / "onnx" / f"{name}.onnx"
        # onnxruntime as a team would first run it: its own static int8 of the 8-bit layers
        if any(x.weight_bits == 8 for x in plan_of(m).layers):
            export_onnx_static_int8(m, onnx_path, calib)
        else:
            export_onnx(m, onnx_path)
        rows.append(
            {
                **info,
                "runtime": "onnxruntime",
                **time_ort(onnx_path, frames, threads, args.repeats),
            }
        )
        console.print(
            f"{name}: torch {rows[-2]['median_ms']:.3f} ms, ort {rows[-1]['median_ms']:.3f} ms"
        )

    # Cold: the base model's tasks tuned into an empty database.
    cold_db = work / f"cold-{datetime.now(UTC):%Y%m%d%H%M%S}" / "tuning" / profile.name
    with TvmLocalEstimator(_with_db(profile, cold_db, args.trials), cold_db.parents[1]) as est:
        (cold,) = est.estimate(models["base-fp32"])
    if not cold.ok or cold.compile is None:
        console.print(f"[red]cold tuning failed: {cold.error}")
        return 1
    console.print(
        f"cold: {cold.compile.new_tasks} tasks tuned in {cold.compile.tune_s:.0f} s, "
        f"{cold.median_ms:.3f} ms"
    )
    # The persistent database: seeded with the cold run's records when it is empty.
    db = profile.database_dir(args.cost_models)
    if (
        not (db / "database_tuning_record.json").exists()
        or not (db / "database_tuning_record.json").stat().st_size
    ):
        db.mkdir(parents=True, exist_ok=True)
        for f in ("database_workload.json", "database_tuning_record.json"):
            shutil.copy(cold_db / f, db / f)

    tvm: dict[str, LatencyResult] = {}
    retune_s = 0.0
    with TvmLocalEstimator(_with_db(profile, db, args.trials), work / "builds") as est:
        if args.base_trials:
            (rt,) = compile_model(
                models["base-fp32"],
                est.profile,
                est.worker,
                work / "builds" / "retune",  # the estimator's user database: builds/tuning
                cost_models_dir=args.cost_models,
                export=False,
                retune_trials=args.base_trials,
            )
            retune_s = rt.tune_s
            console.print(
                f"base: {rt.n_tasks} tasks tuned {args.base_trials} more trials each "
                f"in {retune_s:.0f} s" + (f" [red]{rt.error}" if rt.error else "")
            )
        for name, m in models.items():
            (r,) = est.estimate(m)
            tvm[name] = r
            c = r.compile
            console.print(
                f"{name}: tvm {r.median_ms if r.ok else r.error} ms "
                f"({c.new_tasks if c else '?'} new tasks, tuned {c.tune_s if c else 0:.0f} s)"
            )
        t0 = time.monotonic()
        (warm,) = est.estimate(models["base-fp32"])
        warm_s = time.monotonic() - t0
        # TVM vs onnxruntime on the base, in alternating rounds: the host's speed drifts
        # over the minutes between the rows above, not within one round
        base_onnx = work / "onnx" / "base-fp32.onnx"
        pairs = []
        for _ in range(ROUNDS):
            o = time_ort(base_onnx, frames, threads, args.repeats)["median_ms"]
            (t,) = est.estimate(models["base-fp32"])
            pairs.append((t.median_ms or float("nan"), o))
    ratio = statistics.median(t / o for t, o in pairs)
    for name, m in models.items():
        r = tvm[name]
        c = r.compile
        rows.append(
            {
                "model": name,
                "params": count_parameters(m),
                "packed_mb": packed_size_bytes(m) / 1e6,
                "runtime": "tvm",
                "median_ms": r.median_ms,
                "iqr_ms": r.iqr_ms,
                "n_tasks": c.n_tasks if c else None,
                "new_tasks": c.new_tasks if c else None,
                "tune_s": c.tune_s if c else None,
                "compile_s": c.total_s if c else None,
                "peak_memory_mb": r.peak_memory_mb,
                "lowering": c.lowering if c else None,
                "error": r.error,
            }
        )

    def med(model: str, runtime: str) -> float:
        return float(
            next(x["median_ms"] for x in rows if (x["model"], x["runtime"]) == (model, runtime))
        )

    result = {
        "profile": profile.name,
        "profile_hash": profile.stable_hash(),
        "frames": frames,
        "threads": threads,
        "warm_remeasure_s": warm_s,
        "warm_new_tasks": warm.compile.new_tasks if warm.compile else None,
        "warm_breakdown_s": _breakdown(warm),
        "warm_import": warm.compile.details.get("import") if warm.compile else None,
        "pruned50_speedup": med("base-fp32", "tvm") / med("all50", "tvm"),
        "tvm_vs_ort_ratio": ratio,
        "tvm_vs_ort_rounds_ms": [{"tvm": t, "onnxruntime": o} for t, o in pairs],
        "tvm_vs_ort_ratio_rows": med("base-fp32", "tvm") / med("base-fp32", "onnxruntime"),
        "base_retune_trials": args.base_trials,
        "base_retune_s": retune_s,
        "tvm_vs_torch_ratio": med("base-fp32", "tvm") / med("base-fp32", "torch"),
        # int8 compute (u8 x s8 -> s32) vs the fp32 base, both tuned; and what TVM made of it
        "int8_speedup_vs_fp32": med("base-fp32", "tvm") / med("w8a8", "tvm"),
        "int8_lowering": tvm["w8a8"].compile.lowering if tvm["w8a8"].compile else None,
        "cold_tune_s": cold.compile.tune_s,
        "cold_tasks": cold.compile.new_tasks,
        "trials_per_task": args.trials or profile.tuning.trials_per_task,
        "rows": rows,
        "provenance": provenance(
            {"torch": str(torch.__version__)},
            cpu=platform.processor() or platform.machine(),
            target=profile.target,
            script_minutes=round((time.monotonic() - t_start) / 60, 1),
        ),
    }
    write_result(args.out, result)
    _plot(rows, args.out.with_suffix(".html"), profile.name)

    t = Table(title=f"latency on {profile.name} ({frames} frames, {threads} threads), ms")
    for col in ("model", "params", "MB", "torch", "onnxruntime", "tvm", "new tasks"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name in models:
        tv = next(x for x in rows if (x["model"], x["runtime"]) == (name, "tvm"))
        t.add_row(
            name,
            f"{tv['params']:,}",
            f"{tv['packed_mb']:.2f}",
            f"{med(name, 'torch'):.3f}",
            f"{med(name, 'onnxruntime'):.3f}",
            f"{tv['median_ms']:.3f}" if tv["median_ms"] is not None else "error",
            str(tv["new_tasks"]),
        )
    console.print(t)
    for k in (
        "warm_remeasure_s",
        "pruned50_speedup",
        "tvm_vs_ort_ratio",
        "cold_tune_s",
        "int8_speedup_vs_fp32",
    ):
        console.print(f"{k}: {result[k]:.3f}")
    console.print(f"wrote {args.out}")
    return 0


def _plot(rows: list[dict[str, Any]], path: Path, profile: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for runtime in ("torch", "onnxruntime", "tvm"):
        sel = [r for r in rows if r["runtime"] == runtime and r["median_ms"] is not None]
        fig.add_bar(
            name=runtime,
            x=[r["model"] for r in sel],
            y=[r["median_ms"] for r in sel],
            error_y={"type": "data", "array": [r["iqr_ms"] or 0 for r in sel]},
        )
    fig.update_layout(
        title=f"Latency per model and runtime on {profile} (median, IQR bars)",
        yaxis_title="ms",
        barmode="group",
    )
    fig.write_html(path, include_plotlyjs=True, full_html=True)


if __name__ == "__main__":
    sys.exit(main())
