"""Which sampler finds the best front once trials are cheap: issue 17's ``sampler_hv_ratios``.

For each seed (``--seeds``) and sampler (``--samplers``: TPE, NSGA-II, random), one study of
``--trials`` trials on one (elastic) checkpoint, the three baselines enqueued first. Every
latency comes from the profile's cost model (measurement ``predicted``: no timing), so the
samplers are judged on one footing, the studies may run beside other work, and ``--jobs``
of them at once (one process each, the cores' torch threads split between them).

Reported: the hypervolume of each study's feasible front, all with one reference point
(1.1x the worst feasible value of each objective over every study); per seed each sampler's
ratio to random search (``sampler_hv_ratios``), their medians, and
``default_sampler_wins``: the default sampler's median ratio is the highest (if not, the
result names the sampler that won). Also the hypervolume after every 10 trials, median over
the seeds (``samplers.html``).

Resumable: a study resumes to ``--trials`` (run the same command again).

    python benchmarks/samplers.py --checkpoint work/models/<base>-elastic-<hash>/checkpoint.pt \\
        --seeds 0,1,2 --trials 100
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from _common import parser, provenance, resolve_profile, write_result
from search import common_reference, feasible, hypervolume, points, predicted
from voxfit.search import DEFAULT_SAMPLER, complete, open_storage


def _name(args: Any, profile: str, sampler: str, seed: int) -> str:
    tag = Path(args.checkpoint).parent.name
    return f"samplers-{profile}-{args.space}-{sampler}-s{seed}-{tag}"


def _run(args: Any, sampler: str, seed: int, threads: int) -> None:
    """One study to ``--trials`` finished trials (in its own process)."""
    import torch

    from voxfit.search import SearchContext, SearchSettings, run_search
    from voxfit.spaces import find_space

    torch.set_num_threads(threads)
    profile = predicted(resolve_profile(args.profile))
    space = find_space(args.space)
    ctx = SearchContext.prepare(
        preset=args.preset, model=space.model, work=args.work, checkpoint=args.checkpoint
    )
    run_search(
        SearchSettings(
            profile=profile,
            space=space.bind(ctx.base.structure()),  # type: ignore[operator]
            storage=args.storage,
            study_name=_name(args, profile.name, sampler, seed),
            n_trials=args.trials,
            sampler=sampler,
            seed=seed,
            work=args.work,
            cost_models_dir=args.cost_models,
            measure_peer=False,
        ),
        ctx,
    )


def hv_by_trials(study: optuna.Study, ref: np.ndarray, step: int) -> list[float]:
    """Hypervolume of the feasible front of the first n trials, n = step, 2 step, ..."""
    recs = sorted(complete(study), key=lambda r: r.number)
    out = []
    for n in range(step, len(recs) + 1, step):
        out.append(hypervolume(points([r for r in recs[:n] if r.feasible]), ref))
    return out


def plot(curves: dict[str, list[float]], step: int, path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, ys in curves.items():
        xs = [step * (i + 1) for i in range(len(ys))]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name))
    fig.update_layout(
        title="Hypervolume of the feasible front by trials (median over seeds)",
        xaxis_title="trials",
        yaxis_title="hypervolume (common reference point)",
    )
    fig.write_html(path)


def main(argv: list[str] | None = None) -> int:
    ap = parser("samplers", __doc__, profile=True, space=True, preset=True, cost_models=True)
    ap.add_argument("--checkpoint", required=True, help="the searched model (elastic)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samplers", default="tpe,nsga2,random")
    ap.add_argument("--trials", type=int, default=100, help="finished trials per study")
    ap.add_argument("--jobs", type=int, default=1, help="studies at once")
    ap.add_argument("--storage", default="sqlite:///work/search/samplers.db")
    ap.add_argument("--no-search", dest="search", action="store_false", help="report only")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    profile = resolve_profile(args.profile)
    args.profile = profile.name
    seeds = [int(s) for s in args.seeds.split(",")]
    samplers = args.samplers.split(",")
    if "random" not in samplers:
        raise SystemExit("--samplers: the ratios are against random search: include random")
    todo = [(s, seed) for seed in seeds for s in samplers]
    if args.search:
        threads = max(1, profile.cores // args.jobs)
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
            pool.starmap(_run, [(args, s, seed, threads) for s, seed in todo])
    storage = open_storage(args.storage)
    studies = {
        (s, seed): optuna.load_study(
            study_name=_name(args, profile.name, s, seed), storage=storage
        )
        for s, seed in todo
    }
    pts = {k: points(feasible(st)) for k, st in studies.items()}
    ref = common_reference(pts.values())
    hv = {k: hypervolume(p, ref) for k, p in pts.items()}
    ratios = {
        s: [hv[s, seed] / hv["random", seed] if hv["random", seed] else None for seed in seeds]
        for s in samplers
        if s != "random"
    }
    medians = {
        s: statistics.median(x for x in r if x is not None) if any(r) else None
        for s, r in ratios.items()
    }
    best = max(medians, key=lambda s: medians[s] or 0.0)
    wins = DEFAULT_SAMPLER in medians and (medians[DEFAULT_SAMPLER] or 0) >= max(
        [1.0, *(m or 0 for m in medians.values())]
    )
    step = 10
    curves_by = {k: hv_by_trials(st, ref, step) for k, st in studies.items()}
    curves = {}
    for s in samplers:
        runs = [curves_by[s, seed] for seed in seeds]
        n = min(len(c) for c in runs)
        curves[s] = [statistics.median(c[i] for c in runs) for i in range(n)]
    result: dict[str, Any] = {
        "profile": profile.name,
        "space": args.space,
        "checkpoint": str(args.checkpoint),
        "latency": "predicted (cost model) for every trial",
        "seeds": seeds,
        "trials_per_study": args.trials,
        "finished": {f"{s}-s{seed}": len(complete(st)) for (s, seed), st in studies.items()},
        "reference_point": ref.tolist(),
        "hypervolume": {f"{s}-s{seed}": v for (s, seed), v in hv.items()},
        "sampler_hv_ratios": ratios,
        "sampler_hv_ratio_medians": medians,
        "default_sampler": DEFAULT_SAMPLER,
        "default_sampler_wins": wins,
        "best_sampler": best if (medians[best] or 0) >= 1.0 else "random",
        "hv_by_trials_median": curves,
        "provenance": provenance(wall_s=time.monotonic() - t0),
    }
    write_result(args.out, result)
    plot(curves, step, args.out.with_suffix(".html"))
    print({k: v for k, v in result.items() if k != "hv_by_trials_median"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
