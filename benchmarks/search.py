"""Does the search find better fronts than random search, and what does its best point buy?

Runs the same search (space, profile, trial budget, baselines enqueued first) with each
sampler -- voxfit's default and random search, optionally NSGA-II -- into one SQLite storage
(resumable: a finished study is reused), then reports:

- the hypervolume of each sampler's feasible front, all with one reference point (1.1x the
  worst feasible value of each objective over every study), and the ratio default / random;
- the best candidate of the default sampler that meets the profile's latency budget (the
  lowest post-adaptation PER among the re-measured ones at least 2x faster and 4x smaller
  than fp32, those within the accuracy bounds below first; else among all within budget)
  against the three baselines: speedup and size reduction vs fp32,
  dev PER and post-adaptation PER change in absolute points. Size is exact, latency in the
  search may be a prediction: the baselines and every within-budget trial >= 4x smaller
  (up to ``--measure-max``, lowest post-adaptation PER first) are compiled and measured with
  TVM back to back at the end, each in rounds alternating with the fp32 baseline's library
  within one measurement, and "2x faster" is judged on the median of those paired ratios
  (``remeasured_speedup_paired``; this host's speed swings 1.5x between seconds, so two
  medians timed apart are not a ratio). With ``--predicted`` every trial's latency in the
  search comes from the cost model, so both samplers are judged on the same footing, and
  only these end-of-run measurements use TVM.
- the peer: onnxruntime's static int8 of the base model (int8 weights per channel, uint8
  activations), timed in ``--peer-rounds`` rounds alternating with the TVM library of the
  fastest measured point within the accuracy bounds (dev PER <= +1.0, post-adaptation PER
  <= +2.0 points over fp32; the ``--peer-candidates`` fastest such trials are measured too):
  ``front_vs_ort_int8_base`` is the median of peer / that point per round. The fp32
  baseline's library is timed in each round too (``peer.fp32_speedup``, a coarser pairing
  than the one above, reported beside it). onnxruntime runs at the profile's ISA
  (``--peer-isa profile``, the default: CPUID restricted to the profile's mcpu in this
  process, so an AVX2 profile's peer does not run VNNI kernels on a VNNI host; ``peer_isa``
  records what was hidden). Every measured
  plan is also exported to onnxruntime's static int8 and timed right after its TVM library
  (``ort_int8_same_plan_ms``): our pruning taken to onnxruntime, the other peer. With
  ``--final-trials N`` the peer rounds time that point with its tasks tuned N trials each
  (the int8 benchmarks' database at N), as a deployment tunes the model it ships; it is
  still chosen by the end-of-run measurements at the search's own tuning.

Writes ``benchmarks/results/search.json`` (``--out``; for the Conformer, say
``--space conformer-default --out benchmarks/results/search_conformer.json``).

    python benchmarks/search.py --trials 24
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from _common import parser, provenance, resolve_profile, restrict_peer, write_result
from int8 import _profile as _int8_profile
from int8 import tuning_dir as _int8_tuning_dir
from voxfit.hw_profiles import HardwareProfile
from voxfit.search import (
    DEFAULT_SAMPLER,
    SearchContext,
    SearchSettings,
    TrialRecord,
    complete,
    front,
    record_of,
    run_search,
)
from voxfit.spaces import find_space

# the accuracy bounds a best point must keep (absolute PER points over the fp32 baseline)
DEV_PER_BOUND = 1.0
POST_ADAPT_PER_BOUND = 2.0


def within_bounds(r: dict[str, Any]) -> bool:
    return bool(
        r["dev_per_delta"] <= DEV_PER_BOUND and r["post_adapt_per_delta"] <= POST_ADAPT_PER_BOUND
    )


def _ort_int8_of(ctx: SearchContext, t: TrialRecord, multiple: int, path: Any) -> Any:
    """onnxruntime's static int8 of trial ``t``'s pruned model (its channels, adapters and
    stream as planned, every quantizable layer at 8-bit weights and activations): what a
    deployment team gets by taking our pruning to onnxruntime instead of our TVM library."""
    from voxfit.compress import export_onnx_static_int8
    from voxfit.plan import LayerPlan

    assert t.plan is not None
    assert t.seed is not None
    names = ctx.base.structure().quantizable  # type: ignore[operator]
    layers = tuple(LayerPlan(q, 8, 8) for q in names)
    model = ctx.build(replace(t.plan, layers=layers, recovery_steps=0), multiple, t.seed)
    export_onnx_static_int8(model, path, ctx.calibration)
    return path


def final_tuning(args: Any, profile: HardwareProfile) -> tuple[HardwareProfile, Path, str]:
    """(profile, tuning database, builds folder name) of the peer rounds: the searches' own
    records (``<work>/tuning/<profile>``, the profile's trials per task), or with
    ``--final-trials N`` the int8 benchmarks' database at N trials per task
    (``<work>/int8/<profile>/tuning-t<N>``, shared with ``benchmarks/int8.py`` and
    ``int8_pruned.py``), into which the chosen point's new tasks are tuned N trials each, as
    a deployment tunes the model it ships (the fp32 baseline's come from the shipped
    database, tuned longer still)."""
    from voxfit.compile import default_tuning_dir

    if not args.final_trials:
        return profile, default_tuning_dir(args.work, profile), "bench"
    db = _int8_tuning_dir(args.work, profile.name, args.final_trials).resolve()
    # int8.py's own: that database at N trials (the peer rounds time the primary input only)
    return _int8_profile(profile, db, args.final_trials), db, f"bench-t{args.final_trials}"


def _peer_vs_best(
    args: Any,
    ctx: SearchContext,
    tuning: tuple[HardwareProfile, Path, str],
    best: TrialRecord,
    fp32_model: Any,
    multiple: int,
    console: Console,
) -> dict[str, Any] | None:
    """onnxruntime's static int8 of the base (and of ``best``'s own plan) vs ``best``'s TVM
    library, in alternating rounds, with the fp32 baseline's model (built once, by the
    caller) timed in each round too (``fp32_speedup``: the median of fp32 / best per
    round, robust to the host's swings that a single re-measure of each is not)."""
    import statistics

    from voxfit.latency import TvmLocalEstimator, time_onnxruntime
    from voxfit.models import n_mels_of
    from voxfit.search import export_peer

    if args.peer_rounds <= 0 or best.plan is None or best.seed is None:
        return None
    profile, tuning_dir, folder = tuning  # final_tuning's
    builds = args.work / "search-builds" / folder
    onnx_path = export_peer(ctx.base, builds / "ort-int8-base.onnx", ctx.calibration)
    # the measuring loop exported every measured plan (the peer point is one) just before
    own_path = builds / f"ort-int8-{best.number}.onnx"
    if not own_path.exists():
        _ort_int8_of(ctx, best, multiple, own_path)
    model = ctx.build(replace(best.plan, recovery_steps=0), multiple, best.seed)
    rounds = []
    spec = profile.primary_input
    with TvmLocalEstimator(
        profile,
        args.work / "search-builds" / f"{folder}-peer",
        cost_models_dir=args.cost_models,
        tuning_dir=tuning_dir,
    ) as est:
        for i in range(args.peer_rounds):
            (r,) = est.estimate(model, (spec,))
            (f,) = est.estimate(fp32_model, (spec,))
            o = time_onnxruntime(onnx_path, spec.frames, profile.cores, n_mels=n_mels_of(model))
            own = time_onnxruntime(own_path, spec.frames, profile.cores, n_mels=n_mels_of(model))
            if not r.ok or not r.median_ms:
                console.print(f"[red]peer round {i + 1}: the best point failed: {r.error}")
                return None
            rounds.append(
                {
                    "best_ms": r.median_ms,
                    "fp32_ms": f.median_ms if f.ok else None,
                    "ort_int8_base_ms": o["median_ms"],
                    "ort_int8_best_plan_ms": own["median_ms"],
                }
            )
            console.print(
                f"peer round {i + 1}: best {r.median_ms:.3f} ms, fp32 {f.median_ms or 0:.3f} "
                f"ms, onnxruntime int8 base "
                f"{o['median_ms']:.3f} ms, onnxruntime int8 of the best's plan "
                f"{own['median_ms']:.3f} ms"
            )
    fp32_ratios = [x["fp32_ms"] / x["best_ms"] for x in rounds if x["fp32_ms"]]
    return {
        "ratio": statistics.median(x["ort_int8_base_ms"] / x["best_ms"] for x in rounds),
        # the same pruned plan in onnxruntime int8 / in our TVM library
        "vs_ort_int8_same_plan": statistics.median(
            x["ort_int8_best_plan_ms"] / x["best_ms"] for x in rounds
        ),
        # None where the fp32 library failed in every round (statistics.median of nothing
        # raises, and the peer figures above stand without it)
        "fp32_speedup": statistics.median(fp32_ratios) if fp32_ratios else None,
        "rounds": rounds,
        "best_trial": best.number,
        "threads": profile.cores,
    }


def feasible(study: optuna.Study) -> list[TrialRecord]:
    return [r for r in complete(study) if r.feasible]


def search_minutes(study: optuna.Study) -> float:
    """Minutes the trials of ``study`` ran (sum of start-to-end times): the search's cost,
    also when it was interrupted and resumed, or is reported later with ``--no-search``."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return (
        sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.datetime_start and t.datetime_complete
        )
        / 60
    )


def median_trial_s(study: optuna.Study) -> dict[str, float] | None:
    """The median start-to-end seconds of the study's sampled (not baseline) trials
    (``trial_s``) and of each part the trials record (build, dev PER, adaptation, total)."""
    import statistics

    recs = [r for r in complete(study) if not r.baseline and r.duration_s is not None]
    if not recs:
        return None
    out = {"trial_s": statistics.median(float(r.duration_s or 0.0) for r in recs)}
    for key in ("build_s", "dev_s", "adapt_s", "total_s"):
        got = [float(r.timings[key]) for r in recs if r.timings and key in r.timings]
        if got:
            out[key] = statistics.median(got)
    return out


def latency_in_search(studies: dict[str, optuna.Study]) -> str:
    """How the completed trials' latency objectives were obtained, read from their records
    (the ``--cost-models`` folder may hold no model for the profile: then all are measured)."""
    from collections import Counter

    recs = [r for s in studies.values() for r in complete(s)]
    got = Counter((r.latency.source, r.latency.basis) for r in recs)
    return ", ".join(f"{n} of {len(recs)} {src} ({basis})" for (src, basis), n in got.items())


def first_start(trials: list[FrozenTrial]) -> datetime | None:
    """When the first of ``trials`` started (None: none has)."""
    return min((t.datetime_start for t in trials if t.datetime_start), default=None)


def finished_within(trials: list[FrozenTrial], seconds: float) -> list[FrozenTrial]:
    """Those of ``trials`` that finished within ``seconds`` of the first one's start."""
    t0 = first_start(trials)
    if t0 is None:
        return []
    return [
        t
        for t in trials
        if t.datetime_complete and (t.datetime_complete - t0).total_seconds() <= seconds
    ]


def trials_within(study: optuna.Study, seconds: float) -> int:
    """Trials (baselines included) finished within ``seconds`` of the study's first start:
    what a search with that timeout would have finished (``make run`` gives 900 s)."""
    return len(
        finished_within(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), seconds)
    )


def hypervolume(pts: np.ndarray, ref: np.ndarray) -> float:
    from optuna._hypervolume import compute_hypervolume

    inside = pts[np.all(pts < ref, axis=1)]
    return float(compute_hypervolume(inside, ref)) if len(inside) else 0.0


def common_reference(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """One reference point for several studies' points: 1.1x the worst value of each
    objective over all of them."""
    return np.concatenate([p for p in arrays if len(p)]).max(axis=0) * 1.1


def predicted(profile: HardwareProfile) -> HardwareProfile:
    """``profile`` with every latency from its cost model (no timing)."""
    return replace(profile, measurement=replace(profile.measurement, method="predicted"))


def points(recs: list[Any]) -> np.ndarray:
    """The objective values of ``recs``, one row each (latency, post-adaptation PER, dev PER,
    size: ``voxfit.search.OBJECTIVES``)."""
    return np.array([r.values for r in recs], dtype=float).reshape(-1, 4)


def hv_curve(study: optuna.Study, ref: np.ndarray) -> list[tuple[float, float]]:
    """(seconds since the study's first start, hypervolume of the feasible front then)."""
    trials = study.get_trials(deepcopy=False)
    t0 = first_start(trials)
    if t0 is None:
        return []
    done = sorted(
        ((t.datetime_complete, record_of(t)) for t in trials if t.datetime_complete),
        key=lambda p: p[0],
    )
    out, seen = [], []
    for when, r in done:
        if r.complete and r.feasible:
            seen.append(r)
            out.append(((when - t0).total_seconds(), hypervolume(points(seen), ref)))
    return out


def plot_hv_curves(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, pts in curves.items():
        if pts:
            x, y = [p[0] / 60 for p in pts], [p[1] for p in pts]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", line_shape="hv", name=name))
    fig.update_layout(
        title="Hypervolume of the feasible front over the search's time",
        xaxis_title="minutes",
        yaxis_title="hypervolume (common reference point)",
    )
    fig.write_html(path)


def row(t: TrialRecord, fp32: TrialRecord, name: str) -> dict[str, Any]:
    m, b = t.accuracy, fp32.accuracy
    return {
        "name": name,
        "trial": t.number,
        "latency_ms": t.values[0],
        "latency_source": t.latency.source,
        "size_mb": t.size_mb,
        "dev_per": m.dev_per,
        "post_adapt_per": m.post_adapt_per,
        "speedup_vs_fp32": fp32.values[0] / t.values[0],
        "size_reduction_vs_fp32": fp32.size_mb / t.size_mb,
        "dev_per_delta": m.dev_per - b.dev_per,
        "post_adapt_per_delta": m.post_adapt_per - b.post_adapt_per,
        "plan": t.plan.to_dict(),
    }


def _cost_model_figures(path: Path | None, space: str) -> dict[str, Any]:
    """``cost_model_spearman`` / ``cost_model_within_10pct`` (and their file) from a
    ``benchmarks/cost_model.py`` result; None each without one.

    Raises:
        SystemExit: the file is unreadable or is not a cost-model result.
    """
    keys = {"cost_model_spearman": "spearman", "cost_model_within_10pct": "within_10pct"}
    if path is None:
        return {**dict.fromkeys(keys), "cost_model_figures": None}
    try:
        figures = json.loads(path.read_text())
        out = {k: float(figures[v]) for k, v in keys.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a cost_model.py result ({type(e).__name__}: {e})") from e
    return {
        **out,
        "cost_model_figures": {
            "file": str(path),
            "held_out_model": figures.get("held_out_model"),
            "n_test": figures.get("n_test"),
            "space": space,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser(
        "search", __doc__, profile=True, space=True, preset=True, cost_models=True, peer_isa=True
    )
    ap.add_argument("--trials", type=int, default=24, help="trials per sampler (equal budget)")
    ap.add_argument("--samplers", default=f"{DEFAULT_SAMPLER},random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--search-minutes",
        type=float,
        default=None,
        help="start no new trial after this many minutes of each sampler's search (the "
        "running one finishes; a later run with the same --storage resumes the study)",
    )
    ap.add_argument("--storage", default="sqlite:///work/search/bench.db")
    ap.add_argument(
        "--predicted",
        action="store_true",
        help="every trial's latency from the cost model (no TVM during the search); the "
        "baselines and the best point are measured at the end either way",
    )
    ap.add_argument(
        "--no-search",
        dest="search",
        action="store_false",
        help="report on the studies already in the storage (no new trials)",
    )
    ap.add_argument(
        "--measure-max", type=int, default=8, help="most candidates measured with TVM at the end"
    )
    ap.add_argument(
        "--peer-rounds",
        type=int,
        default=5,
        help="rounds of onnxruntime's int8 base alternating with the fastest measured point "
        "within the accuracy bounds (0: none)",
    )
    ap.add_argument(
        "--peer-candidates",
        type=int,
        default=3,
        help="the fastest trials (by the search's latency) within the accuracy bounds, also "
        "measured at the end: the peer is judged against the fastest of all measured",
    )
    ap.add_argument(
        "--final-trials",
        type=int,
        default=0,
        help="the peer rounds time the chosen point (picked by the end-of-run measurements "
        "at the search's tuning) with its tasks tuned N trials each, into the int8 benchmarks' "
        "database at N, as a deployment tunes the model it ships (0: the search's records)",
    )
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="search this trained model (e.g. an elastic one from `voxfit train --elastic`) "
        "instead of the preset's cached base; its folder name joins the study names",
    )
    ap.add_argument(
        "--cost-model-figures",
        type=Path,
        default=None,
        help="the cost-model benchmark's result for this space's model (e.g. "
        "benchmarks/results/cost_model_conformer.json): its held-out figures join the result",
    )
    args = ap.parse_args(argv)
    console = Console()
    t0 = time.monotonic()
    cost_figures = _cost_model_figures(args.cost_model_figures, args.space)
    profile = resolve_profile(args.profile)
    peer_isa = restrict_peer(profile, args.peer_isa)
    measured_profile = profile
    if args.predicted:
        profile = predicted(profile)
    space = find_space(args.space)
    ctx = SearchContext.prepare(
        preset=args.preset, model=space.model, work=args.work, checkpoint=args.checkpoint
    )
    tag = f"-{Path(args.checkpoint).parent.name}" if args.checkpoint else ""
    bound = space.bind(ctx.base.structure())  # type: ignore[operator]
    samplers = args.samplers.split(",")
    studies: dict[str, optuna.Study] = {}
    minutes: dict[str, float] = {}
    searching = 0.0  # seconds this process spent in searches
    for name in samplers:
        ts = time.monotonic()
        study_name = f"bench-{profile.name}-{space.name}-{args.preset}-{name}-s{args.seed}{tag}"
        if not args.search:  # analysis only: the study as it is in the storage
            studies[name] = optuna.load_study(study_name=study_name, storage=args.storage)
            minutes[name] = search_minutes(studies[name])
            continue
        studies[name] = run_search(
            SearchSettings(
                profile=profile,
                space=bound,
                storage=args.storage,
                study_name=study_name,
                n_trials=args.trials,
                timeout_s=None if args.search_minutes is None else 60.0 * args.search_minutes,
                sampler=name,
                seed=args.seed,
                work=args.work,
                cost_models_dir=args.cost_models,
            ),
            ctx,
        )
        minutes[name] = search_minutes(studies[name])
        searching += time.monotonic() - ts

    n_obj = len(studies[samplers[0]].directions)
    pts = {
        n: np.array([t.values for t in feasible(s)]).reshape(-1, n_obj) for n, s in studies.items()
    }
    everything = np.concatenate([p for p in pts.values() if len(p)])
    ref = everything.max(axis=0) * 1.1
    hv = {n: hypervolume(p, ref) for n, p in pts.items()}

    default = studies[samplers[0]]
    base = {r.baseline: r for r in complete(default) if r.baseline}
    fp32 = base["fp32"]
    within = [t for t in feasible(default) if t.values[0] <= profile.latency_budget_ms]
    if not within:
        console.print("[red]no trial meets the latency budget")
        return 1

    def smaller(t: TrialRecord) -> float:
        return float((fp32.size_mb or 0.0) / (t.size_mb or float("inf")))

    by_quality = sorted(within, key=lambda t: (t.values[1], t.values[2]))
    small = [t for t in by_quality if smaller(t) >= 4.0][: args.measure_max]
    fallback = by_quality[0]

    # the baselines and the candidates measured back to back with TVM (same machine load)
    from voxfit.compile import default_tuning_dir
    from voxfit.latency import TvmLocalEstimator, time_onnxruntime
    from voxfit.models import n_mels_of

    remeasured: dict[str, float | None] = {}
    # fp32 / each plan, from rounds alternating the two within one measurement (the
    # estimator's reference timing): drift-free, unlike two medians timed seconds apart
    paired_speedup: dict[str, float] = {}
    ort_same_plan: dict[str, float] = {}
    # the peer's candidates: the (predicted) fastest trials within the accuracy bounds
    fast = sorted(
        (t for t in within if not t.baseline and within_bounds(row(t, fp32, ""))),
        key=lambda t: t.values[0],
    )[: args.peer_candidates]
    todo = [*sorted(base.items())]
    for t in [*small, fallback, *fast]:
        if all(label != f"#{t.number}" for label, _ in todo):
            todo.append((f"#{t.number}", t))
    assert fp32.plan is not None
    fp32_model = ctx.build(
        replace(fp32.plan, recovery_steps=0), profile.channel_multiple, fp32.seed
    )
    with TvmLocalEstimator(
        measured_profile,
        args.work / "search-builds" / "bench",
        cost_models_dir=args.cost_models,
        tuning_dir=default_tuning_dir(args.work, measured_profile),  # the searches' records
        reference=fp32_model,
    ) as est:
        for label, t in todo:
            # distillation changes weights, not the compiled graph: skip it for timing
            cand = replace(t.plan, recovery_steps=0)
            model = ctx.build(cand, profile.channel_multiple, t.seed)
            (r,) = est.estimate(model, (profile.primary_input,))
            remeasured[label] = r.median_ms
            msg = f"TVM {label}: {r.median_ms if r.ok else r.error} ms"
            if r.ok and r.relative:
                paired_speedup[label] = 1.0 / r.relative
                msg += f" ({paired_speedup[label]:.2f}x fp32, paired)"
            if args.peer_rounds > 0:  # the same plan in onnxruntime int8, right after
                spec = profile.primary_input
                path = args.work / "search-builds" / "bench" / f"ort-int8-{t.number}.onnx"
                _ort_int8_of(ctx, t, profile.channel_multiple, path)
                o = time_onnxruntime(path, spec.frames, profile.cores, n_mels=n_mels_of(model))
                ort_same_plan[label] = o["median_ms"]
                msg += f", onnxruntime int8 of the same plan {o['median_ms']:.3f} ms"
            console.print(msg)
    fp32_ms = remeasured["fp32"]

    def speedup(label: str) -> float | None:
        """fp32 / the plan re-measured: paired within one measurement, else two medians."""
        if label in paired_speedup:
            return paired_speedup[label]
        ms = remeasured.get(label)
        return fp32_ms / ms if fp32_ms and ms else None

    # every re-measured trial >= 4x smaller and >= 2x faster (re-measured), best quality first;
    # the best point is the first of them within the accuracy bounds, if one is
    strong = [t for t in by_quality if smaller(t) >= 4.0 and (speedup(f"#{t.number}") or 0.0) >= 2]
    bounded = [t for t in strong if within_bounds(row(t, fp32, ""))]
    best = (bounded or strong or [fallback])[0]
    remeasured["best"] = remeasured[f"#{best.number}"]
    best_row = row(best, fp32, "best")
    if (x := speedup(f"#{best.number}")) is not None:
        best_row["speedup_vs_fp32_remeasured"] = x
    if fp32_ms and remeasured["best"]:
        best_row["speedup_vs_fp32_medians"] = fp32_ms / remeasured["best"]
    baseline_rows = []
    for n, t in sorted(base.items()):
        r = row(t, fp32, n)
        r["measured_ms"] = remeasured.get(n)
        if remeasured.get(n) and remeasured["fp32"]:
            r["speedup_vs_fp32_remeasured"] = speedup(n)
        baseline_rows.append(r)
    best_row["measured_ms"] = remeasured["best"]
    # the peer's opponent: the fastest measured point (baselines included) within the bounds
    fastest = [
        (ms, t)
        for label, t in todo
        if (ms := remeasured.get(label)) and within_bounds(row(t, fp32, label))
    ]
    peer_point = min(fastest, key=lambda x: x[0])[1] if fastest else best
    peer_tuning = final_tuning(args, measured_profile)
    peer_profile, peer_db, _ = peer_tuning
    peer = _peer_vs_best(
        args,
        ctx,
        peer_tuning,
        peer_point,
        fp32_model,
        profile.channel_multiple,
        console,
    )
    if peer and peer_point.number == best.number:
        best_row["speedup_vs_fp32_peer_rounds"] = peer["fp32_speedup"]
    analysis_minutes = (time.monotonic() - t0 - searching) / 60
    result = {
        "hypervolume_ratio_vs_random": hv[samplers[0]] / hv["random"]
        if hv.get("random")
        else None,  # None: random search was not run (or found no feasible point)
        "speedup_vs_fp32": best_row.get("speedup_vs_fp32_remeasured", best_row["speedup_vs_fp32"]),
        "size_reduction_vs_fp32": best_row["size_reduction_vs_fp32"],
        "dev_per_delta": best_row["dev_per_delta"],
        "post_adapt_per_delta": best_row["post_adapt_per_delta"],
        "n_trials": {
            n: len(s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            for n, s in studies.items()
        },
        # the trials' run time (read from the storage, so --no-search keeps it) + this analysis
        "wall_minutes": sum(minutes.values()) + analysis_minutes,
        "analysis_wall_minutes": analysis_minutes,
        "baselines": baseline_rows,
        "latency_in_search": latency_in_search(studies),
        "best": best_row,
        "met_targets": bool(strong)
        and within_bounds(best_row)
        and best_row.get("speedup_vs_fp32_remeasured", 0.0) >= 2,
        "remeasured_ms": remeasured,
        "remeasured_speedup_paired": paired_speedup,
        "hypervolume": hv,
        # onnxruntime's static int8 of the base / the fastest measured point within the
        # accuracy bounds, back to back (None: not run)
        "front_vs_ort_int8_base": peer["ratio"] if peer else None,
        # the ISA onnxruntime ran at (--peer-isa): the CPU features hidden from it
        "peer_isa": peer_isa,
        # the profile's cost model on this model's held-out candidates (--cost-model-figures)
        **cost_figures,
        "peer": peer,
        "peer_point": row(peer_point, fp32, "peer_point") if peer else None,
        # each measured plan in onnxruntime int8 (ms), timed right after its TVM library
        "ort_int8_same_plan_ms": ort_same_plan,
        "reference_point": ref.tolist(),
        "objectives": default.user_attrs.get("objectives"),
        "measured_candidates": [t.number for t in small],
        # the non-dominated feasible trials (before: the count of feasible trials)
        "front_sizes": {n: len(front(complete(s))) for n, s in studies.items()},
        "feasible_counts": {n: len(p) for n, p in pts.items()},
        "sampler_minutes": minutes,
        "median_trial_s": {n: median_trial_s(s) for n, s in studies.items()},
        # finished in the first 15 minutes (make run's search timeout), if it ran in one go
        "trials_within_900s": {n: trials_within(s, 900.0) for n, s in studies.items()},
        "default_sampler": samplers[0],
        "profile": profile.name,
        "latency_budget_ms": profile.latency_budget_ms,
        "memory_budget_mb": profile.memory_budget_mb,
        "space": space.name,
        "storage": args.storage,
        "studies": {n: s.study_name for n, s in studies.items()},
        # trials per task of the peer rounds' tuning (the profile's unless --final-trials)
        "peer_trials_per_task": peer_profile.tuning.trials_per_task,
        "peer_tuning_dir": str(peer_db),
        "provenance": provenance({"optuna": optuna.__version__}, checkpoint=str(ctx.checkpoint)),
    }
    write_result(args.out, result, default=str)

    title = f"{profile.name}: best within {profile.latency_budget_ms:g} ms vs baselines"
    table = Table(title=title)
    for col in ("row", "trial", "ms", "src", "MB", "dev PER", "post PER", "speedup", "smaller"):
        table.add_column(col, justify="right")
    for r in [*result["baselines"], best_row]:
        table.add_row(
            r["name"],
            str(r["trial"]),
            f"{r['latency_ms']:.2f}",
            r["latency_source"],
            f"{r['size_mb']:.2f}",
            f"{r['dev_per']:.2f}",
            f"{r['post_adapt_per']:.2f}",
            f"{r.get('speedup_vs_fp32_remeasured', r['speedup_vs_fp32']):.2f}x",
            f"{r['size_reduction_vs_fp32']:.1f}x",
        )
    console.print(table)
    console.print(f"hypervolume {hv}; ratio {result['hypervolume_ratio_vs_random']}")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
