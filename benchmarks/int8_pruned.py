"""Is int8 enough? TVM's tensorized int8 of pruned plans against onnxruntime's int8 base.

The question behind ``front_vs_ort_int8_base`` (issue 19): how fast are the int8 kernels at
the widths a search prunes to, when tuned as long as ``benchmarks/int8.py`` tunes the base
(``--trials``, default 128 per task, into that benchmark's own database, so its records are
reused)? Plans: every block's hidden width from an elastic checkpoint (``--checkpoint``;
inherited, BatchNorm recalibrated), all convs at 8-bit weights and activations, no adapters.
With ``--distill N`` (for a plain, non-elastic ``--checkpoint``) each pruned plan is built
as a search of that base builds one with ``recovery_steps`` N: pruned by magnitude,
distilled N steps from the base, then quantized (the distilled weights are cached as a
search's are, under ``<work>/models/builds``, so a rerun does not distil again).
Each is timed in ``--rounds`` rounds alternating onnxruntime's static int8 of the unpruned
model with the TVM libraries, so the host's drift cancels in each round's ratio; the keys
are medians of the per-round ratios. Accuracy: dev PER of the torch model the search would
score (computing the kernels' int16 pair saturation where the profile saturates), and its
delta against the checkpoint's fp32 full width (the search's accuracy bound: <= 1.0).
With ``--adapters N`` every plan (and that fp32 reference) carries N-unit adapters at every
slot, as a search's candidates do (``--adapter-kind``: residual, lora or merged_lora, of
rank N, folded into the int8 conv it adapts; the fp32 reference keeps residual adapters, as
a search's fp32 baseline does): the libraries time them, and the accuracy adds the search's
post-adaptation PER (its proxy; bound: <= 2.0 over the reference).

    python benchmarks/int8_pruned.py --checkpoint work/models/<base>-elastic-<hash>/checkpoint.pt
    python benchmarks/int8_pruned.py --checkpoint work/models/<base>/checkpoint.pt --distill 1000 \
        --out benchmarks/results/int8_pruned_distilled.json

Resumable: the tuning database keeps what was tuned; a rerun measures warm.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from _common import parser, provenance, resolve_profile, write_result
from voxfit.compile import saturates_int8_pairs
from voxfit.compress import apply, export_onnx_static_int8
from voxfit.latency import TvmLocalEstimator
from voxfit.plan import ADAPTER_KINDS, AdapterPlan, Candidate, LayerPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from elastic import hidden_widths  # noqa: E402
from int8 import _calibration, _profile, tuning_dir  # noqa: E402
from latency import time_ort  # noqa: E402

#: hidden width of each block, repeated over the blocks
PLANS: dict[str, list[float]] = {
    "full": [1.0],
    "mixed_100_50": [1.0, 0.5],
    "mixed_75_25": [0.75, 0.25],
    "hidden50": [0.5],
    "mixed_50_25": [0.5, 0.25],
    "hidden25": [0.25],
}


def main(argv: list[str] | None = None) -> int:
    ap = parser("int8_pruned", __doc__, profile=True)
    ap.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="an elastic checkpoint (plans inherit), or a plain one with --distill",
    )
    ap.add_argument(
        "--distill", type=int, default=0, help="recovery steps of each pruned plan (0: inherit)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the distillation")
    ap.add_argument(
        "--plans",
        default=",".join(PLANS),
        help=f"which plans, comma-separated (full is always one): {', '.join(PLANS)}",
    )
    ap.add_argument(
        "--adapters", type=int, default=0, help="adapter units (rank) at every slot (0: none)"
    )
    ap.add_argument(
        "--adapter-kind",
        default="residual",
        choices=ADAPTER_KINDS,
        help="the plans' adapters (the fp32 reference keeps residual ones, as a search's "
        "fp32 baseline does); merged_lora: folded into the int8 layer's weight",
    )
    ap.add_argument(
        "--w4",
        default="",
        help="plans (of --plans) also timed with 4-bit weights in every layer but the head "
        "(8-bit activations; the head at 8 bits, as the spaces allow), as rows '<plan>_w4' "
        "built from the same pruned float model",
    )
    ap.add_argument("--trials", type=int, default=128, help="trials per new int8 task")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=50, help="onnxruntime timing runs")
    args = ap.parse_args(argv)
    names = ["full", *(n for n in args.plans.split(",") if n and n != "full")]
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        ap.error(f"--plans: unknown plan(s) {', '.join(unknown)} (choose from {', '.join(PLANS)})")
    plans = {n: PLANS[n] for n in names}
    w4 = [n for n in args.w4.split(",") if n]
    if missing := [n for n in w4 if n not in plans]:
        ap.error(f"--w4: {', '.join(missing)} not among the measured plans ({', '.join(plans)})")
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
    head = s.quantizable[-1]
    w4a8 = tuple(LayerPlan(q, 8 if q == head else 4, 8) for q in s.quantizable)

    def adapters_of(kind: str) -> tuple[AdapterPlan, ...]:
        n = args.adapters
        return tuple(AdapterPlan(a.name, n, kind) for a in s.adapter_slots if n)  # type: ignore[arg-type]

    adapters = adapters_of(args.adapter_kind)
    multiple = profile.channel_multiple

    def float_model(name: str, ratios: list[float]) -> torch.nn.Module:
        """The plan's pruned float model: inherited, or distilled ``--distill`` steps from
        the base as a search's build does before it quantizes (``SearchContext.build``,
        whose cache keeps distilled candidates)."""
        cand = Candidate(groups=hidden_widths(blocks, ratios))
        steps = args.distill if cand.groups else 0
        if steps:
            console.print(f"{name}: {steps} distillation steps (unless cached)")
        return ctx.build(replace(cand, recovery_steps=steps), multiple, args.seed)

    floats = {name: float_model(name, r) for name, r in plans.items()}
    for name in w4:  # the same pruned (distilled) float model, quantized to 4-bit weights
        floats[f"{name}_w4"] = floats[name]
        plans[f"{name}_w4"] = plans[name]

    def build(name: str, saturation: bool = False) -> torch.nn.Module:
        torch.manual_seed(args.seed)  # the adapters' initialization, the same every run
        return apply(
            floats[name],
            Candidate(layers=w4a8 if name.endswith("_w4") else w8a8, adapters=adapters),
            channel_multiple=multiple,
            calibration=ctx.calibration,
            int8_pair_saturation=saturation,
        )

    from voxfit.metrics import phone_error_rate

    def scores(model: torch.nn.Module) -> dict[str, float]:
        """dev PER, and with adapters the search's post-adaptation PER (its proxy)."""
        if not adapters:
            dev = phone_error_rate(model, ctx.manifest.split("dev"), ctx.store, ctx.inventory)
            return {"dev_per": dev}
        acc = ctx.accuracy(model)
        return {"dev_per": acc["dev_per"], "post_adapt_per": acc["post_adapt_per"]}

    fp32 = floats["full"]
    if adapters:
        torch.manual_seed(args.seed)
        fp32 = apply(fp32, Candidate(adapters=adapters_of("residual")), channel_multiple=multiple)
    reference = scores(fp32)
    fp32_dev = reference["dev_per"]
    sat = saturates_int8_pairs(profile)
    models = {name: build(name) for name in plans}
    accuracy = {name: scores(build(name, sat)) for name in plans}
    db = tuning_dir(args.work, profile.name, args.trials)
    work = db.parent
    onnx = work / "onnx" / "int8-full-of-checkpoint.onnx"
    # the peer: onnxruntime's static int8 of the unpruned base as it is (no adapters)
    peer = apply(floats["full"], Candidate(layers=w8a8), channel_multiple=multiple,
                 calibration=ctx.calibration)  # fmt: skip
    export_onnx_static_int8(peer, onnx, _calibration(0))
    rows: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, float]] = []
    # new tasks are tuned into ``db`` too (as int8.py does), never the builds' own folder:
    # a run at another --trials must not leave its records where this one reads them
    prof = _profile(profile, db, args.trials)
    with TvmLocalEstimator(prof, work / "builds-pruned", tuning_dir=db) as est:
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
    post_ref = reference.get("post_adapt_per")
    for name in plans:
        rows[name] |= {
            "hidden": plans[name],
            "weight_bits": 4 if name.endswith("_w4") else 8,
            **accuracy[name],
            "dev_per_delta": accuracy[name]["dev_per"] - fp32_dev,
            **(
                {"post_adapt_per_delta": accuracy[name]["post_adapt_per"] - post_ref}
                if post_ref is not None
                else {}
            ),
            "vs_ort_int8_full": statistics.median(r["ort_int8_full"] / r[name] for r in rounds),
            "vs_tvm_int8_full": statistics.median(r["full"] / r[name] for r in rounds),
            "tvm_ms_median": statistics.median(r[name] for r in rounds),
        }
    within = [
        n
        for n in plans
        if rows[n]["dev_per_delta"] <= 1.0 and rows[n].get("post_adapt_per_delta", 0.0) <= 2.0
    ]
    best = max(within, key=lambda n: rows[n]["vs_ort_int8_full"]) if within else None
    result = {
        "profile": profile.name,
        "checkpoint": str(args.checkpoint),
        "int8_trials_per_task": args.trials,
        "distill_steps": args.distill,
        "frames": frames,
        "threads": threads,
        "fp32_full_dev_per": fp32_dev,
        "fp32_full_post_adapt_per": post_ref,
        "adapters": args.adapters,
        "adapter_kind": args.adapter_kind if args.adapters else None,
        "ort_int8_full_ms_median": statistics.median(r["ort_int8_full"] for r in rounds),
        "best_within_bounds": best,
        "best_within_bounds_vs_ort_int8_full": rows[best]["vs_ort_int8_full"] if best else None,
        "rows": rows,
        "rounds_ms": rounds,
        "provenance": provenance({"torch": torch.__version__}, wall_s=time.monotonic() - t_start),
    }
    write_result(args.out, result)
    for name in plans:
        r = rows[name]
        console.print(
            f"{name}: x{r['vs_ort_int8_full']:.2f} onnxruntime int8 full, dev PER "
            f"{r['dev_per']:.2f} ({r['dev_per_delta']:+.2f})"
        )
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
