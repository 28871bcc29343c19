"""Does early stopping across objectives pay? The same search with and without it, equal time.

For each seed, two studies of one space on one (elastic) checkpoint run for ``--minutes``
each, back to back (the order alternates with the seed, so drift favours neither; each arm
tunes into its own folder, so neither inherits the other's tuning): one runs
every trial to the end, the other stops a trial before its adaptation when its optimistic
bound is dominated by the front (``voxfit search --early-stop``; voxfit.search._early).
Reported per arm: trials finished (complete + stopped), trials stopped and the seconds a
stopped trial took against a complete one, and the hypervolume of the feasible front at
the end and over time (one reference point for both arms: 1.1x the worst feasible value
of each objective over both; the objectives as the searches recorded them).

What early stopping could buy at best (``oracle``, per arm): the sampled trials that, with
their own final values, were already dominated by the front of the trials before them --
with four objectives most trials join the front, so few are.

Then the stops are audited: every stopped trial is run to the end afterwards (the same
build, the adaptation proxy, the cost model's latency) and ``false_stops`` counts those
that would have joined their study's final front; ``bound_misses`` counts those whose
post-adaptation PER came out below the bound that stopped them.

Writes ``benchmarks/results/early_stop.json`` and ``early_stop.html`` (hypervolume over
time). Resumable: finished studies in ``--storage`` are reused.

    python benchmarks/early_stop.py --checkpoint <elastic checkpoint> --minutes 15
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from _common import parser, provenance, resolve_profile, write_result
from search import common_reference, feasible, hv_curve, hypervolume, plot_hv_curves, points
from voxfit._config import OPEN_ENDED_TRIALS
from voxfit.search import (
    EarlyStop,
    SearchContext,
    SearchSettings,
    complete,
    open_storage,
    record_of,
    run_search,
)
from voxfit.spaces import find_space

ARMS = ("run_to_end", "early_stop")


def _study(args: Any, profile: Any, bound: Any, ctx: Any, arm: str, seed: int) -> optuna.Study:
    tag = Path(args.checkpoint).parent.name
    name = f"early-{profile.name}-{bound.space.name}-{arm}-s{seed}-{tag}"
    try:  # a finished arm is reused (its time is spent)
        st = optuna.load_study(study_name=name, storage=open_storage(args.storage))
        if st.user_attrs.get("arm_done"):
            return st
    except KeyError:
        pass
    st = run_search(
        SearchSettings(
            profile=profile,
            space=bound,
            storage=args.storage,
            study_name=name,
            n_trials=OPEN_ENDED_TRIALS,  # until the timeout
            timeout_s=args.minutes * 60,
            sampler=args.sampler,
            seed=seed,
            # each arm its own builds and tuning records (from the shipped database): an arm
            # run second must not find the tasks the first one tuned
            work=args.work / "early-stop" / f"{arm}-s{seed}",
            cost_models_dir=args.cost_models,
            measure_peer=False,
            early_stop=EarlyStop() if arm == "early_stop" else None,
        ),
        ctx,
    )
    st.set_user_attr("arm_done", True)
    return st


def _oracle(study: optuna.Study) -> dict[str, Any]:
    """The most any early-stopping rule could stop in ``study``: its sampled trials that,
    with their own final values (perfect foresight), were already dominated by the front of
    the trials complete before them; and how much of the study its final front holds."""
    from voxfit.latency import dominates
    from voxfit.search import front

    recs = sorted(complete(study), key=lambda r: r.number)  # one process: number = order
    stoppable = [
        r.number
        for i, r in enumerate(recs)
        if not r.baseline and any(dominates(f.values, r.values) for f in front(recs[:i]))
    ]
    return {
        "sampled": sum(not r.baseline for r in recs),
        "oracle_stoppable": len(stoppable),
        "oracle_trials": stoppable,
        "final_front": len(front(recs)),
        "complete": len(recs),
        "median_adapt_s": statistics.median(r.timings.get("adapt_s", 0.0) for r in recs),
    }


def _audit(study: optuna.Study, ctx: SearchContext, profile: Any, args: Any) -> dict[str, Any]:
    """Run every stopped trial of ``study`` to the end; would it have joined the front?"""
    from voxfit.compile import saturates_int8_pairs
    from voxfit.latency import dominates
    from voxfit.metrics import packed_size_bytes
    from voxfit.search._study import make_latency

    stopped = [record_of(t) for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))]
    stopped = [r for r in stopped if r.stopped and r.plan is not None]
    final = [r.values for r in complete(study) if r.feasible]
    settings = SearchSettings(profile, None, args.storage, "audit", 1,  # type: ignore[arg-type]
                              work=args.work, cost_models_dir=args.cost_models)  # fmt: skip
    latency = make_latency(settings, ctx.base)
    rows = []
    try:
        for r in stopped:
            model = ctx.build(
                r.plan, profile.channel_multiple, r.seed or 0,  # type: ignore[arg-type]
                int8_pair_saturation=saturates_int8_pairs(profile),
            )  # fmt: skip
            acc = ctx.accuracy(model)
            (p,) = latency.predict(model, (profile.primary_input,)) or [None]
            ms = p.value_ms if p is not None and p.ok else None
            size = packed_size_bytes(model) / 1e6
            point = (ms or float("inf"), acc["post_adapt_per"], acc["dev_per"], size)
            bound_post = r.stop_bound[1] if r.stop_bound else float("-inf")
            rows.append(
                {
                    "trial": r.number,
                    "point": point,
                    "on_front": not any(dominates(f, point) for f in final),
                    "bound_post_adapt_per": bound_post,
                    "bound_missed": acc["post_adapt_per"] < bound_post,
                }
            )
    finally:
        latency.close()
    return {
        "stopped": len(stopped),
        "false_stops": sum(r["on_front"] for r in rows),
        "bound_misses": sum(r["bound_missed"] for r in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser("early_stop", __doc__, profile=True, space=True, preset=True, cost_models=True)
    ap.add_argument("--checkpoint", required=True, help="the searched model (elastic)")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock per arm")
    ap.add_argument("--seeds", default="0", help="comma-separated; one pair of arms each")
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--storage", default="sqlite:///work/search/early_stop.db")
    ap.add_argument("--no-audit", dest="audit", action="store_false")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    profile = resolve_profile(args.profile)
    space = find_space(args.space)
    ctx = SearchContext.prepare(
        preset=args.preset, model=space.model, work=args.work, checkpoint=args.checkpoint
    )
    bound = space.bind(ctx.base.structure())  # type: ignore[operator]
    studies: dict[tuple[str, int], optuna.Study] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm in ARMS if seed % 2 == 0 else ARMS[::-1]:
            studies[arm, seed] = _study(args, profile, bound, ctx, arm, seed)
    pts = {k: points(feasible(s)) for k, s in studies.items()}
    ref = common_reference(pts.values())
    result: dict[str, Any] = {
        "profile": profile.name,
        "space": bound.space.name,
        "checkpoint": str(args.checkpoint),
        "minutes_per_arm": args.minutes,
        "sampler": args.sampler,
        "reference_point": ref.tolist(),
        "early_stop": dataclasses.asdict(EarlyStop()),
        "runs": [],
    }
    curves = {}
    for (arm, seed), st in studies.items():
        all_t = st.get_trials(deepcopy=False)
        by_state = {s.name: sum(t.state == s for t in all_t) for s in TrialState}
        dur = {
            s: [t.duration.total_seconds() for t in all_t if t.state == s and t.duration]
            for s in (TrialState.COMPLETE, TrialState.PRUNED)
        }
        run = {
            "arm": arm,
            "seed": seed,
            "study": st.study_name,
            "finished": by_state["COMPLETE"] + by_state["PRUNED"] + by_state["FAIL"],
            "complete": by_state["COMPLETE"],
            "stopped": by_state["PRUNED"],
            "failed": by_state["FAIL"],
            "median_complete_s": statistics.median(dur[TrialState.COMPLETE])
            if dur[TrialState.COMPLETE]
            else None,
            "median_stopped_s": statistics.median(dur[TrialState.PRUNED])
            if dur[TrialState.PRUNED]
            else None,
            "hypervolume": hypervolume(pts[arm, seed], ref),
            "feasible": len(pts[arm, seed]),
        }
        if arm == "early_stop" and args.audit:
            run["audit"] = _audit(st, ctx, profile, args)
        run["oracle"] = _oracle(st)
        result["runs"].append(run)
        curves[f"{arm} s{seed}"] = hv_curve(st, ref)
    ratios = []
    for seed in {s for _, s in studies}:
        a = next(r for r in result["runs"] if r["arm"] == "run_to_end" and r["seed"] == seed)
        b = next(r for r in result["runs"] if r["arm"] == "early_stop" and r["seed"] == seed)
        ratios.append(b["hypervolume"] / a["hypervolume"] if a["hypervolume"] else None)
    result["hv_ratio_early_vs_not"] = ratios
    result["hv_curves"] = curves
    result["provenance"] = provenance(wall_s=time.monotonic() - t0)
    write_result(args.out, result)
    plot_hv_curves(curves, args.out.with_suffix(".html"))
    print({k: v for k, v in result.items() if k not in ("runs", "hv_curves")})
    for r in result["runs"]:
        print({k: v for k, v in r.items() if k not in ("audit", "oracle")})
        print(" oracle:", {k: v for k, v in r["oracle"].items() if k != "oracle_trials"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
