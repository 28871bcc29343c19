"""Is int8 enough? TVM's tensorized int8 of pruned plans against onnxruntime's int8 base.

The question behind ``front_vs_ort_int8_base`` (issue 19): how fast are the int8 kernels at
the widths a search prunes to, when tuned as long as ``benchmarks/int8.py`` tunes the base
(``--trials``, default 128 per task, into that benchmark's own database, so its records are
reused)? Plans: every block's hidden width from an elastic checkpoint (``--checkpoint``;
inherited, BatchNorm recalibrated), all convs at 8-bit weights and activations, no adapters.
Each is timed in ``--rounds`` rounds alternating onnxruntime's static int8 of the unpruned
model with the TVM libraries, so the host's drift cancels in each round's ratio; the keys
are medians of the per-round ratios. Accuracy: dev PER of the torch model the search would
score (computing the kernels' int16 pair saturation where the profile saturates), and its
delta against the checkpoint's fp32 full width (the search's accuracy bound: <= 1.0).

    python benchmarks/int8_pruned.py --checkpoint work/models/<base>-elastic-<hash>/checkpoint.pt

Resumable: the tuning database keeps what was tuned; a rerun measures warm.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from _common import parser, provenance, resolve_profile, write_result
from voxfit.compile import saturates_int8_pairs
from voxfit.compress import apply, export_onnx_static_int8
from voxfit.latency import TvmLocalEstimator
from voxfit.plan import Candidate, LayerPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elastic import hidden_widths  # noqa: E402
from int8 import _calibration, _profile  # noqa: E402
from latency import time_ort  # noqa: E402

#: hidden width of each block, repeated over the blocks
PLANS: dict[str, list[float]] = {
    "full": [1.0],
    "mixed_100_50": [1.0, 0.5],
    "mixed_75_25": [0.75, 0.25],
    "hidden50": [0.5],
    "hidden25": [0.25],
}


def main(argv: list[str] | None = None) -> int:
    ap = parser("int8_pruned", __doc__, profile=True)
    ap.add_argument("--checkpoint", type=Path, required=True, help="an elastic checkpoint")
    ap.add_argument("--trials", type=int, default=128, help="trials per new int8 task")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=50, help="onnxruntime timing runs")
    args = ap.parse_args(argv)
    console = Console()
    t_start = time.monotonic()
    from voxfit.search import SearchContext

    profile = resolve_profile(args.profile or "x86-avx2-2core")
    frames, threads = profile.primary_input.frames, profile.cores
    torch.set_num_threads(threads)
    ctx = SearchContext.prepare(work=args.work, checkpoint=args.checkpoint)
    base = ctx.base
    s = base.structure()  # type: ignore[operator]
    blocks = sum(1 for g in s.groups if g.name.endswith(".hidden"))
    w8a8 = tuple(LayerPlan(q, 8, 8) for q in s.quantizable)
    multiple = profile.channel_multiple

    def plan(ratios: list[float]) -> Candidate:
        return Candidate(groups=hidden_widths(blocks, ratios), layers=w8a8)

    def build(cand: Candidate, saturation: bool = False) -> torch.nn.Module:
        return apply(
            base,
            cand,
            channel_multiple=multiple,
            calibration=ctx.calibration,
            int8_pair_saturation=saturation,
        )

    from voxfit.metrics import phone_error_rate

    def dev_per(model: torch.nn.Module) -> float:
        return phone_error_rate(model, ctx.manifest.split("dev"), ctx.store, ctx.inventory)

    fp32_dev = dev_per(build(Candidate()))
    sat = saturates_int8_pairs(profile)
    models = {name: build(plan(r)) for name, r in PLANS.items()}
    accuracy = {name: dev_per(build(plan(r), sat)) for name, r in PLANS.items()}
    work = args.work / "int8" / profile.name
    db = work / f"tuning-t{args.trials}"
    onnx = work / "onnx" / "int8-full-of-checkpoint.onnx"
    export_onnx_static_int8(models["full"], onnx, _calibration(0))
    rows: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, float]] = []
    with TvmLocalEstimator(_profile(profile, db, args.trials), work / "builds-pruned") as est:
        for name, m in models.items():
            (r,) = est.estimate(m)
            if not r.ok or r.compile is None:
                console.print(f"[red]{name}: {r.error}")
                return 1
            rows[name] = {"new_tasks": r.compile.new_tasks, "tune_s": r.compile.tune_s}
            console.print(f"{name}: compiled ({r.compile.new_tasks} new tasks)")
        for i in range(args.rounds):
            row = {"ort_int8_full": time_ort(onnx, frames, threads, args.repeats)["median_ms"]}
            for name, m in models.items():
                (r,) = est.estimate(m)
                row[name] = r.median_ms or float("nan")
            rounds.append(row)
            ms = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
            console.print(f"round {i + 1}/{args.rounds}: {ms}")
    for name in PLANS:
        rows[name] |= {
            "hidden": PLANS[name],
            "dev_per": accuracy[name],
            "dev_per_delta": accuracy[name] - fp32_dev,
            "vs_ort_int8_full": statistics.median(r["ort_int8_full"] / r[name] for r in rounds),
            "vs_tvm_int8_full": statistics.median(r["full"] / r[name] for r in rounds),
            "tvm_ms_median": statistics.median(r[name] for r in rounds),
        }
    within = [n for n in PLANS if rows[n]["dev_per_delta"] <= 1.0]
    best = max(within, key=lambda n: rows[n]["vs_ort_int8_full"]) if within else None
    result = {
        "profile": profile.name,
        "checkpoint": str(args.checkpoint),
        "int8_trials_per_task": args.trials,
        "frames": frames,
        "threads": threads,
        "fp32_full_dev_per": fp32_dev,
        "ort_int8_full_ms_median": statistics.median(r["ort_int8_full"] for r in rounds),
        "best_within_bounds": best,
        "best_within_bounds_vs_ort_int8_full": rows[best]["vs_ort_int8_full"] if best else None,
        "rows": rows,
        "rounds_ms": rounds,
        "provenance": provenance({"torch": torch.__version__}, wall_s=time.monotonic() - t_start),
    }
    write_result(args.out, result)
    for name in PLANS:
        r = rows[name]
        console.print(
            f"{name}: x{r['vs_ort_int8_full']:.2f} onnxruntime int8 full, dev PER "
            f"{r['dev_per']:.2f} ({r['dev_per_delta']:+.2f})"
        )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
