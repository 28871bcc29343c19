"""Elastic against distilled candidates at equal wall-clock: ``hv_ratio_equal_wallclock``.

Two studies of one space, sampler and seed run for ``--minutes`` each, at the same time, each
in its own process with ``--threads`` torch threads (so the host's drift and load fall on
both alike), each tuning into its own folder from the shipped database:

- ``elastic``: the elastic checkpoint (``voxfit train --elastic``): candidates inherit;
- ``distilled``: its base (today's path): candidates are pruned from the base and distilled
  the space's ``recovery_steps``.

Only trials complete within ``--minutes`` of their study's first start count (a trial in
flight at the timeout finishes, but not in the comparison). Then the feasible front of each
arm (up to ``--remeasure-max`` points, spread over its latency range, and the arm's fp32
baseline as a check: one architecture, so ``fp32_baseline_relative`` should be ~1) is
compiled with the arm's own tuning records and timed with TVM, the arms' points alternating,
each in rounds paired with the base's fp32 library within one measurement: a point's latency
is that drift-free ratio times the median fp32 time of all of them. The hypervolume of each
arm's re-measured front, with one reference point (1.1x the worst value of each objective
over both arms' re-measured points), gives ``hv_ratio_equal_wallclock`` = elastic /
distilled (issue 17: >= 2). The same ratio from the objectives as the searches recorded them
(``hv_ratio_in_search``) and the hypervolume over time (``elastic_equal_time.html``) are
reported too.

``--search-only`` runs the arms and stops: re-measure on a quiet machine by running the same
command without it. Resumable: an arm that finished its minutes is reused, an interrupted
one runs the minutes it has left (the gap counts against its trials' start times: rerun both
then), and every re-measured point is kept in ``<work>/equal-time/remeasured-<key>.jsonl``.

    python benchmarks/equal_time.py --base work/models/<base>/checkpoint.pt \\
        --elastic work/models/<base>-elastic-<hash>/checkpoint.pt --minutes 40
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import statistics
import time
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from _common import parser, provenance, resolve_profile, write_result
from search import (
    common_reference,
    finished_within,
    first_start,
    hv_curve,
    hypervolume,
    median_trial_s,
    plot_hv_curves,
    points,
    search_minutes,
)
from voxfit._config import OPEN_ENDED_TRIALS
from voxfit.search import (
    SearchContext,
    SearchSettings,
    TrialRecord,
    front,
    open_storage,
    record_of,
)
from voxfit.spaces import find_space

ARMS = ("elastic", "distilled")


def _study_name(args: Any, profile: str, arm: str) -> str:
    ck = args.elastic if arm == "elastic" else args.base
    return f"equal-{profile}-{args.space}-{args.sampler}-{arm}-s{args.seed}-{ck.parent.name}"


def _arm_work(args: Any, arm: str) -> Path:
    return Path(args.work) / "equal-time" / f"{arm}-s{args.seed}"


def _run_arm(args: Any, arm: str) -> None:
    """One arm's search (in its own process): the minutes it has left, then marked done."""
    import torch

    from voxfit.search import run_search

    torch.set_num_threads(args.threads)
    profile = resolve_profile(args.profile)
    space = find_space(args.space)
    ck = args.elastic if arm == "elastic" else args.base
    ctx = SearchContext.prepare(preset=args.preset, model=space.model, work=args.work,
                                checkpoint=ck)  # fmt: skip
    name = _study_name(args, profile.name, arm)
    left = args.minutes * 60
    try:
        st = optuna.load_study(study_name=name, storage=open_storage(args.storage))
        if st.user_attrs.get("arm_done"):
            return
        t0 = first_start(st.get_trials(deepcopy=False))
        if t0 is not None:
            left -= time.time() - t0.timestamp()
    except KeyError:
        pass
    if left > 0:
        run_search(
            SearchSettings(
                profile=profile,
                space=space.bind(ctx.base.structure()),  # type: ignore[operator]
                storage=args.storage,
                study_name=name,
                n_trials=OPEN_ENDED_TRIALS,  # until the timeout
                timeout_s=left,
                sampler=args.sampler,
                seed=args.seed,
                work=_arm_work(args, arm),
                cost_models_dir=args.cost_models,
                measure_peer=False,
            ),
            ctx,
        )
    st = optuna.load_study(study_name=name, storage=open_storage(args.storage))
    st.set_user_attr("arm_done", True)


def within_time(study: optuna.Study, seconds: float) -> list[TrialRecord]:
    """The complete feasible trials of ``study`` that completed within ``seconds`` of its
    first start."""
    recs = [record_of(t) for t in finished_within(study.get_trials(deepcopy=False), seconds)]
    return [r for r in recs if r.complete and r.feasible and r.values is not None]


def _is_fp32(recs: list[TrialRecord], number: int) -> bool:
    return any(r.number == number and r.baseline == "fp32" for r in recs)


def spread(recs: list[TrialRecord], n: int) -> list[TrialRecord]:
    """At most ``n`` of ``recs``, evenly over their latency order (fastest and slowest kept)."""
    ordered = sorted(recs, key=lambda r: r.values[0])  # type: ignore[index]
    if len(ordered) <= n:
        return ordered
    idx = sorted({round(i) for i in np.linspace(0, len(ordered) - 1, n)})
    return [ordered[i] for i in idx]


def _remeasure(
    args: argparse.Namespace,
    profile: Any,
    pending: list[tuple[str, Any]],
    done: dict[str, dict[str, Any]],
    cache: Path,
) -> None:
    """Measure ``pending`` (arm, trial) in order, each paired with the fp32 base, appending
    each row to ``cache`` (and ``done``) as it is measured."""
    from voxfit.compile import default_tuning_dir
    from voxfit.latency import TvmLocalEstimator
    from voxfit.plan import Candidate

    model_name = find_space(args.space).model
    ctxs = {
        a: SearchContext.prepare(preset=args.preset, model=model_name, work=args.work,
                                 checkpoint=args.elastic if a == "elastic" else args.base)
        for a in ARMS
    }  # fmt: skip
    fp32 = ctxs["distilled"].build(Candidate(), profile.channel_multiple, 0)
    ests = {
        a: TvmLocalEstimator(
            profile,
            Path(args.work) / "equal-time" / "bench-builds" / a,
            cost_models_dir=args.cost_models,
            tuning_dir=default_tuning_dir(_arm_work(args, a), profile),
            reference=fp32,
        )
        for a in ARMS
    }
    try:
        for a, r in pending:
            assert r.plan is not None
            model = ctxs[a].build(replace(r.plan, recovery_steps=0), profile.channel_multiple,
                                  r.seed or 0)  # fmt: skip
            (m,) = ests[a].estimate(model, (profile.primary_input,))
            row = {"key": f"{a}:{r.number}", "arm": a, "trial": r.number,
                   "search_values": list(r.values or ()), "median_ms": m.median_ms,
                   "relative": m.relative, "reference_ms": m.reference_ms,
                   "error": m.error}  # fmt: skip
            done[row["key"]] = row
            with cache.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{a} #{r.number}: {m.relative} x fp32 ({m.median_ms} ms)", flush=True)
    finally:
        for e in ests.values():
            e.close()


def main(argv: list[str] | None = None) -> int:
    ap = parser("elastic_equal_time", __doc__, profile=True, space=True, preset=True,
                cost_models=True)  # fmt: skip
    ap.add_argument("--base", type=Path, required=True, help="the base checkpoint")
    ap.add_argument("--elastic", type=Path, required=True, help="its elastic checkpoint")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock per arm")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storage", default="sqlite:///work/search/equal_time.db")
    ap.add_argument("--remeasure-max", type=int, default=24, help="front points per arm")
    ap.add_argument(
        "--search-only",
        action="store_true",
        help="run (or finish) the arms and stop: re-measure later, on a quiet machine",
    )
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    profile = resolve_profile(args.profile)
    args.profile = profile.name
    procs = [mp.get_context("spawn").Process(target=_run_arm, args=(args, a)) for a in ARMS]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [a for a, p in zip(ARMS, procs, strict=True) if p.exitcode != 0]
    if bad:
        raise SystemExit(f"equal_time: the {', '.join(bad)} arm failed (see above); rerun resumes")
    if args.search_only:
        return 0
    storage = open_storage(args.storage)
    studies = {
        a: optuna.load_study(study_name=_study_name(args, profile.name, a), storage=storage)
        for a in ARMS
    }
    budget_s = args.minutes * 60
    recs = {a: within_time(s, budget_s) for a, s in studies.items()}
    fronts = {a: spread(front(r), args.remeasure_max) for a, r in recs.items()}
    # each arm's fp32 baseline too: one architecture, so both should come out ~1.0x the
    # reference (a check on the pairing and on the two arms' tuning records)
    for a, rs in recs.items():
        fp = [r for r in rs if r.baseline == "fp32"]
        if fp and all(r.number != fp[0].number for r in fronts[a]):
            fronts[a].append(fp[0])

    # the fronts re-measured back to back, arms alternating, each paired with fp32
    key = hashlib.sha256(
        json.dumps([studies[a].study_name for a in ARMS] + [args.minutes]).encode()
    ).hexdigest()[:12]
    cache = Path(args.work) / "equal-time" / f"remeasured-{key}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["key"]] = r
    # the arms alternating (an arm whose front ran out gives None: dropped)
    pairs = zip_longest(*([(a, r) for r in fronts[a]] for a in ARMS))
    pending = [
        (a, r) for pair in pairs for a, r in filter(None, pair) if f"{a}:{r.number}" not in done
    ]
    if pending:  # every point cached: no model is built and no TVM worker started
        _remeasure(args, profile, pending, done, cache)
    rows = [done[f"{a}:{r.number}"] for a in ARMS for r in fronts[a]]
    ok = [r for r in rows if r["relative"] is not None and r["reference_ms"]]
    fp32_ms = statistics.median(r["reference_ms"] for r in ok)
    measured = {
        a: np.array(
            [[r["relative"] * fp32_ms, *r["search_values"][1:]] for r in ok if r["arm"] == a],
            dtype=float,
        ).reshape(-1, 4)
        for a in ARMS
    }
    ref = common_reference(measured.values())
    hv = {a: hypervolume(measured[a], ref) for a in ARMS}
    searched = {a: points(recs[a]) for a in ARMS}
    ref_s = common_reference(searched.values())
    hv_s = {a: hypervolume(searched[a], ref_s) for a in ARMS}
    result: dict[str, Any] = {
        "profile": profile.name,
        "space": args.space,
        "sampler": args.sampler,
        "seed": args.seed,
        "minutes_per_arm": args.minutes,
        "threads_per_arm": args.threads,
        "checkpoints": {"elastic": str(args.elastic), "distilled": str(args.base)},
        "hv_ratio_equal_wallclock": hv["elastic"] / hv["distilled"] if hv["distilled"] else None,
        "hv_ratio_in_search": hv_s["elastic"] / hv_s["distilled"] if hv_s["distilled"] else None,
        "hypervolume": hv,
        "hypervolume_in_search": hv_s,
        "reference_point": ref.tolist(),
        "fp32_ms": fp32_ms,
        "fp32_baseline_relative": {
            a: next(
                (r["relative"] for r in ok if r["arm"] == a and _is_fp32(recs[a], r["trial"])),
                None,
            )
            for a in ARMS
        },
        "arms": {
            a: {
                "study": studies[a].study_name,
                "finished_within": len(recs[a]),
                "search_minutes": search_minutes(studies[a]),
                "median_trial_s": median_trial_s(studies[a]),
                "front": len(front(recs[a])),
                "remeasured": sum(r["arm"] == a for r in ok),
            }
            for a in ARMS
        },
        "remeasured": rows,
    }
    curves = {a: hv_curve(studies[a], ref_s) for a in ARMS}
    result["hv_curves_in_search"] = curves
    result["provenance"] = provenance(wall_s=time.monotonic() - t_start)
    write_result(args.out, result)
    plot_hv_curves(curves, args.out.with_suffix(".html"))
    print({k: v for k, v in result.items() if k not in ("remeasured", "hv_curves_in_search")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
