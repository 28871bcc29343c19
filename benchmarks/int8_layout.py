"""Int8 chains time-major against NCW: the same int8 models, tuned alike, timed in paired rounds.

The TVM importer runs each tensorized int8 conv time-major and cancels the transposes
between a chain of them (``voxfit.compile._layout``); ``load_program(time_major=False)``
keeps the NCW kernels, which transpose their input and output themselves. This script
builds both for two models (the w8a8 base, and a front plan: by default the one
``benchmarks/results/int8.json`` reports as its best front point, on a base of random
weights: latency depends on the shapes, not the values), tunes every task of both into one
database (``--trials`` per task), then times the four libraries and onnxruntime's static
int8 of both models in alternating rounds, in this process (``TVM_NUM_THREADS`` = the
profile's cores).

    python benchmarks/int8_layout.py [--profile x86-avx2-2core] [--trials 64] [--rounds 7]

Writes ``benchmarks/results/int8_layout.json``: per round and as medians of the per-round
ratios, ``tm_vs_ncw_base`` / ``tm_vs_ncw_front`` (NCW time / time-major time),
``front_tm_vs_ort_int8_base`` (onnxruntime int8 base / the time-major front plan) and
``tvm_tm_vs_ort_int8_base`` (TVM time-major base / onnxruntime int8 base).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from _common import parser, provenance, resolve_profile, restrict_peer, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8 import _calibration, _w8a8  # noqa: E402
from latency import N_OUTPUTS, time_ort  # noqa: E402


def _front_plan(path: Path) -> dict[str, Any]:
    src = json.loads(path.read_text()).get("front_vs_ort_int8_base_source") or {}
    if not src.get("plan"):
        raise SystemExit(f"{path}: no front_vs_ort_int8_base_source.plan to time")
    return {"plan": src["plan"], "trial": src.get("trial"), "file": src.get("file")}


def main(argv: list[str] | None = None) -> int:
    ap = parser("int8_layout", __doc__, profile=True, peer_isa=True)
    ap.add_argument("--trials", type=int, default=64, help="tuning trials per task")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=50, help="onnxruntime timing runs")
    ap.add_argument(
        "--front-from",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "int8.json",
        help="a result whose front_vs_ort_int8_base_source names the front plan to time",
    )
    args = ap.parse_args(argv)
    profile = resolve_profile(args.profile or "x86-avx2-2core")
    peer_isa = restrict_peer(profile, args.peer_isa)
    os.environ["TVM_NUM_THREADS"] = str(profile.cores)  # before TVM starts its pool

    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from voxfit.compile._build import _compile_fused, fuse
    from voxfit.compile._compile import export_program
    from voxfit.compile._import import int8_support, load_program, make_target
    from voxfit.compile._int8 import load_cpu_tensor_intrins
    from voxfit.compile._tune import tune
    from voxfit.compress import apply, export_onnx_static_int8
    from voxfit.hw_profiles import host_cpu_flags
    from voxfit.models import build_model, default_config
    from voxfit.plan import Candidate

    console = Console()
    t_start = time.monotonic()
    frames, threads = profile.primary_input.frames, profile.cores
    torch.set_num_threads(threads)
    target = make_target(profile.to_dict())
    ok, note, lanes = int8_support(target)
    if not ok or not lanes:
        raise SystemExit(f"{profile.name}: no tensorized int8 kernels ({note})")
    load_cpu_tensor_intrins(str(target.attrs.get("mtriple", "")))

    torch.manual_seed(0)
    base = build_model(default_config("tdnn", N_OUTPUTS, "default")).eval()
    front = _front_plan(args.front_from)
    # its shapes, untrained: no recovery distillation (latency does not see the weights)
    cand = Candidate.from_dict({**front["plan"], "recovery_steps": 0})
    models = {
        "base": _w8a8(base, profile.channel_multiple, seed=0),
        "front": apply(
            base,
            cand,
            channel_multiple=profile.channel_multiple,
            calibration=_calibration(0),
        ),
    }
    work = args.work / "int8-layout" / profile.name
    db_dir = work / f"tuning-t{args.trials}"
    db_dir.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(
        str(db_dir / "database_workload.json"), str(db_dir / "database_tuning_record.json")
    )
    dev = tvm.cpu()
    fns: dict[str, Any] = {}
    onnx: dict[str, Path] = {}
    tasks_of: dict[str, int] = {}
    tuned: dict[str, int] = {}
    for name, model in models.items():
        program = export_program(model, frames, work / "programs" / f"{name}.pt2")
        onnx[name] = work / "onnx" / f"{name}-int8.onnx"
        export_onnx_static_int8(model, onnx[name], _calibration(0))
        for layout, tm in (("ncw", False), ("tm", True)):
            mod, *_ = load_program(str(program), int8=True, lanes=lanes, time_major=tm)
            fused = fuse(mod, target)
            tasks = ms.relax_integration.extract_tasks(fused, target)
            new = [t for t in tasks if not db.has_workload(t.dispatched[0])]
            console.print(f"{name} {layout}: {len(tasks)} tasks, {len(new)} to tune")
            t0 = time.monotonic()
            tune(
                new,
                db,
                target,
                trials_per_task=args.trials,
                trials_per_iter=16,
                cores=profile.cores,
                builder_timeout_s=60,
                runner={"kind": "local", "timeout_s": 60},
                log_dir=work / "logs",
            )
            tasks_of[f"{name}_{layout}"] = len(tasks)
            tuned[f"{name}_{layout}"] = len(new)
            console.print(f"  tuned in {time.monotonic() - t0:.0f} s")
            ex = _compile_fused(db, fused, target)
            vm = relax.VirtualMachine(ex, dev)
            x = tvm.runtime.tensor(
                np.random.default_rng(0).standard_normal((1, frames, 80)).astype("float32"), dev
            )
            fns[f"{name}_{layout}"] = (vm, x)
    # both layouts compute the same: the libraries' outputs agree
    agree = {}
    for name in models:
        a = fns[f"{name}_ncw"][0]["main"](fns[f"{name}_ncw"][1])
        b = fns[f"{name}_tm"][0]["main"](fns[f"{name}_tm"][1])
        a0, b0 = (v[0].numpy() if hasattr(v, "__len__") else v.numpy() for v in (a, b))
        agree[name] = float(np.abs(a0 - b0).max())

    def tvm_ms(key: str) -> float:
        vm, x = fns[key]
        f = vm.time_evaluator(
            "main",
            dev,
            number=1,
            repeat=profile.measurement.repeats,
            min_repeat_ms=int(profile.measurement.min_repeat_ms),
        )
        return float(np.median(f(x).results)) * 1e3

    rounds: list[dict[str, float]] = []
    with Progress(console=console) as bar:
        job = bar.add_task("paired rounds", total=args.rounds)
        for _ in range(args.rounds):
            row = {k: tvm_ms(k) for k in fns}
            row.update(
                {
                    f"ort_int8_{n}": time_ort(p, frames, threads, args.repeats)["median_ms"]
                    for n, p in onnx.items()
                }
            )
            rounds.append(row)
            bar.advance(job)
            console.print(", ".join(f"{k} {v:.3f}" for k, v in row.items()))

    def med(f: Any) -> float:
        return statistics.median(f(r) for r in rounds)

    result = {
        "profile": profile.name,
        "frames": frames,
        "threads": threads,
        "trials_per_task": args.trials,
        "front": front,
        # the host's VNNI flags: onnxruntime's MLAS picks VNNI u8 x s8 kernels where CPUID
        # reports them, so only where peer_isa (below) did not hide them
        "host_vnni": sorted(f for f in host_cpu_flags() if "vnni" in f),
        "tm_vs_ncw_base": med(lambda r: r["base_ncw"] / r["base_tm"]),
        "tm_vs_ncw_front": med(lambda r: r["front_ncw"] / r["front_tm"]),
        "front_tm_vs_ort_int8_base": med(lambda r: r["ort_int8_base"] / r["front_tm"]),
        "front_ncw_vs_ort_int8_base": med(lambda r: r["ort_int8_base"] / r["front_ncw"]),
        "tvm_tm_vs_ort_int8_base": med(lambda r: r["base_tm"] / r["ort_int8_base"]),
        "tvm_tm_front_vs_ort_int8_front": med(lambda r: r["front_tm"] / r["ort_int8_front"]),
        "max_abs_tm_vs_ncw": agree,
        "tasks": tasks_of,
        # tasks the database did not hold yet (a re-run finds them all there)
        "tasks_tuned_this_run": tuned,
        "rounds_ms": rounds,
        # the ISA onnxruntime ran at (--peer-isa): the CPU features hidden from it
        "peer_isa": peer_isa,
        "provenance": provenance(wall_s=time.monotonic() - t_start),
    }
    write_result(args.out, result)
    for k, v in result.items():
        if k.startswith(("tm_", "front_", "tvm_")):
            console.print(f"{k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
