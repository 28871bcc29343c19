"""How well does the learned cost model predict tuned TVM latency on the local CPU profile?

Samples candidates from a space, compiles (tuning tasks the profile's database lacks) and
measures each on this machine with per-kernel times (``voxfit cost-model collect``), in
rounds alternating with the uncompressed base model so the host's speed drift cancels, holds
out a share of the candidates, fits the xgboost per-task model on the rest and reports, for
it and for the analytic roofline, RMSE, MAPE, the share within +-10% / +-5% and rank
correlations on the held-out candidates; writes ``benchmarks/results/cost_model.json`` and a
predicted-vs-measured scatter (``cost_model.html``), and saves the model refitted on every
candidate under ``<work>/cost_models/<profile>/model`` (``--model-out``). The dataset is the
shipped ``cost_models/<profile>/dataset`` (read-only) plus the measurement store
``<work>/measurements/<profile>``, where new measurements go. Collection resumes: candidates
either holds are skipped; candidates measured under load (whole-model IQR above 25% of the
median) are measured once more before fitting, and the noisy rows the second pass did not
measure again are left out. To refresh the shipped dataset and model, say so:
``--dataset-out cost_models/<profile>/dataset --model-out cost_models/<profile>/model``.

One model learns every family measured on the profile (the task features are the same for
any architecture): the held-out candidates are the ``--space``'s model's, and everything
else in the dataset -- the other families' candidates too -- trains it. For the Conformer:

    python benchmarks/cost_model.py --profile x86-avx2-2core --space conformer-default \
        --n 30 --levelled 10 --out benchmarks/results/cost_model_conformer.json

    python benchmarks/cost_model.py --n 200 --levelled 100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from rich.console import Console

from voxfit import __version__
from voxfit.compile import default_tuning_dir
from voxfit.compress import apply
from voxfit.cost_models import (
    FEATURES,
    MIXING,
    MeasurementStore,
    collect,
    dataset_dir,
    decompose,
    drop_keys,
    evaluate,
    fit,
    fitted_model_dir,
    load_dataset,
    measurements_dir,
    metrics_table,
    noisy_keys,
    random_calibration,
    refeaturize,
    reference_key,
    sample_candidates,
    split,
    write_dataset,
)
from voxfit.hw_profiles import describe_host, find_profile, load_profile, pick_local_profile
from voxfit.models import build_model, default_config
from voxfit.spaces import find_space

KEYS = ("within_10pct", "within_5pct", "spearman", "kendall", "mape", "rmse_ms")


def repeatability(store: Path) -> dict[str, Any] | None:
    """How far two timings of one candidate's library (the last two in ``store``) lie apart:
    its time relative to the base, and each block's share of it (the per-task split from the
    instrumented runs the labels come from): median and 90th percentile of |a/b - 1|."""
    import numpy as np

    runs: dict[str, list[dict[str, Any]]] = {}
    for f in MeasurementStore(store).files():
        d = json.loads(f.read_text())
        if d["model"].get("relative") is not None:
            runs.setdefault(d["model"]["cand"], []).append(d)
    whole: list[float] = []
    shares: list[float] = []
    for ds in runs.values():
        if len(ds) < 2:
            continue
        a, b = sorted(ds, key=lambda d: d["model"]["date"])[-2:]
        whole.append(abs(a["model"]["relative"] / b["model"]["relative"] - 1))
        ta = {t["task"]: t["ms"] for t in a["tasks"] if t.get("ms")}
        tb = {t["task"]: t["ms"] for t in b["tasks"] if t.get("ms")}
        sa, sb = sum(ta.values()), sum(tb.values())
        shares += [
            abs(ta[k] / sa / (tb[k] / sb) - 1) for k in ta if k.startswith("blocks") and k in tb
        ]
    if not whole:
        return None
    return {
        "candidates": len(whole),
        "relative_diff_median": float(np.median(whole)),
        "relative_diff_p90": float(np.quantile(whole, 0.9)),
        "block_share_diff_median": float(np.median(shares)),
        "block_share_diff_p90": float(np.quantile(shares, 0.9)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--profile", default=None, help="default: the first local profile this CPU runs"
    )
    ap.add_argument("--space", default="tdnn-default")
    ap.add_argument("--preset", default="default", choices=["tiny", "default"])
    ap.add_argument("--n", type=int, default=200, help="uniformly sampled candidates")
    ap.add_argument(
        "--levelled",
        type=int,
        default=100,
        help="more candidates drawn near per-candidate levels (the space's corners)",
    )
    ap.add_argument("--test-frac", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("work"))
    ap.add_argument("--cost-models", type=Path, default=Path("cost_models"))
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "cost_model.json"
    )
    ap.add_argument(
        "--model-out",
        type=Path,
        default=None,
        help="where to save the fitted model (default: <work>/cost_models/<profile>/model)",
    )
    ap.add_argument(
        "--compare-model",
        type=Path,
        default=None,
        help="also score this fitted model folder on the same held-out candidates "
        "(e.g. the shipped one, against a refit)",
    )
    ap.add_argument(
        "--dataset-out",
        type=Path,
        default=None,
        help="also write the merged dataset here as parquet (e.g. the shipped one, on purpose)",
    )
    ap.add_argument(
        "--no-shipped",
        action="store_true",
        help="leave the shipped dataset out (e.g. rows from another host, or from libraries "
        "that predate today's lowering): only <work>/measurements/<profile>",
    )
    ap.add_argument(
        "--splits",
        type=int,
        default=0,
        help="also repeat the split, fit and held-out figures over this many split seeds (0.."
        "N-1), with every feature and without the int8/float mixing ones (`splits` in --out)",
    )
    args = ap.parse_args(argv)
    console = Console()
    profile = (
        load_profile(find_profile(args.profile))
        if args.profile
        else pick_local_profile("hw_profiles")
    )
    space = find_space(args.space)
    base = build_model(default_config(space.model, 55, args.preset)).eval()  # type: ignore[arg-type]
    bound = space.bind(base.structure())

    t0 = time.monotonic()
    store = measurements_dir(profile, args.work)
    sources = (store,) if args.no_shipped else (dataset_dir(profile, args.cost_models), store)

    measured: set[tuple[str, str]] = set()

    def run_collect(remeasure: frozenset[tuple[str, str]] = frozenset()) -> dict[str, Any]:
        return collect(
            base,
            bound,
            profile,
            args.n,
            work_dir=args.work / "cost-collect" / profile.name,
            store=store,
            cost_models_dir=args.cost_models,
            tuning_dir=default_tuning_dir(args.work, profile),
            seed=args.seed,
            levelled=args.levelled,
            remeasure=remeasure,
            on_result=lambda c, r: measured.add((c.stable_hash(), r.input)),
        )

    info = run_collect()
    # candidates measured while the machine was loaded (IQR > 25% of the median) are
    # measured once more, so the held-out figures judge the model, not the noise; noisy
    # rows the second pass did not measure (not among its samples) are left out
    noisy = frozenset(noisy_keys(load_dataset(*sources)[0], 0.25))
    remeasured = len(noisy)
    if noisy:
        measured.clear()
        run_collect(noisy)
    collect_minutes = (time.monotonic() - t0) / 60
    models, tasks = drop_keys(*load_dataset(*sources), noisy - measured)
    # rows stored before the mixing features get them once, not in every fit and evaluation
    tasks = refeaturize(models, tasks, profile)
    if args.dataset_out is not None:
        write_dataset(models, tasks, args.dataset_out)
    models = models[models["input"] == profile.primary_input.name]
    # one cost model per profile learns every family measured on it; the held-out
    # candidates are this space's model's, the rest of the dataset (other families) trains
    own = models[models["reference"] == reference_key(base)]
    if own.empty:
        console.print(f"[red]no measured candidate of {reference_key(base)} to hold out")
        return 1
    timed = own.get("collect_s")  # rows from before it was recorded: NaN, skipped
    per_cand = float(timed.median()) if timed is not None and timed.notna().any() else None
    own_train, test_ids = split(own, args.test_frac, args.seed)
    train_ids = set(models["cand"]) - test_ids
    tr = models[models["cand"].isin(train_ids)]
    te = models[models["cand"].isin(test_ids)]
    cm = fit(tr, tasks[tasks["cand"].isin(train_ids)], profile, seed=args.seed)
    m, frame = evaluate(cm, te, tasks[tasks["cand"].isin(test_ids)], profile)
    compared = None
    if args.compare_model is not None:
        from voxfit.cost_models import CostModel

        other, _ = evaluate(
            CostModel.load(args.compare_model), te, tasks[tasks["cand"].isin(test_ids)], profile
        )
        compared = {
            "model": str(args.compare_model),
            **{k: other[k] for k in KEYS},
            "low_confidence": other["low_confidence"],
        }

    # prediction cost: from a compressed torch model to milliseconds, per candidate
    cands = sample_candidates(bound, 20, args.seed + 1)
    calib = random_calibration(profile.primary_input.frames, args.seed)  # 8-bit activations
    compressed = [
        apply(base, c, channel_multiple=profile.channel_multiple, calibration=calib) for c in cands
    ]
    t1 = time.perf_counter()
    for model in compressed:
        cm.predict_tasks(decompose(model, profile.primary_input.frames))
    predict_ms = (time.perf_counter() - t1) * 1e3 / len(compressed)

    # the held-out figures over several splits, with and without the mixing features: one
    # split of ~50 candidates moves the share within 10% by +-10 points
    splits: dict[str, Any] | None = None
    if args.splits:
        without = tuple(f for f in FEATURES if f not in MIXING)
        per: dict[str, list[dict[str, float]]] = {"all_features": [], "without_mixing": []}
        for s in range(args.splits):
            _, ids = split(own, args.test_frac, s)
            trs, tes = models[~models["cand"].isin(ids)], models[models["cand"].isin(ids)]
            for name, feats in (("all_features", FEATURES), ("without_mixing", without)):
                c = fit(
                    trs, tasks[tasks["cand"].isin(trs["cand"])], profile, seed=s, features=feats
                )
                ms, _ = evaluate(c, tes, tasks[tasks["cand"].isin(ids)], profile)
                per[name].append({k: float(ms[k]) for k in KEYS})
        splits = {
            name: {
                **{f"{k}_mean": statistics.fmean(r[k] for r in rows) for k in KEYS},
                "per_split": rows,
            }
            for name, rows in per.items()
        }
        for name, v in splits.items():
            console.print(
                f"{args.splits} splits, {name}: within 10% {v['within_10pct_mean']:.0%}, "
                f"Spearman {v['spearman_mean']:.3f}, MAPE {v['mape_mean']:.1%}"
            )

    result = {
        **{k: m[k] for k in KEYS},
        "splits": splits,
        # candidates the store holds twice: how well their labels repeat
        "repeatability": repeatability(Path(store)),
        "n_train": len(tr),
        "n_test": len(te),
        "roofline": {k: m["roofline"][k] for k in KEYS},
        "raw": {k: m["raw"][k] for k in KEYS},
        "reference_ms": cm.card.get("reference_ms"),
        "predict_ms": predict_ms,
        "collect_minutes": collect_minutes,
        # this run collected only what the dataset lacked; the whole dataset's collection
        # time, from the candidates that recorded theirs (median x candidates)
        "collect_s_per_candidate": per_cand,
        "dataset_collect_minutes_est": per_cand * len(own) / 60 if per_cand else None,
        "collect": info,
        "remeasured_noisy": remeasured,
        "low_confidence_test": m["low_confidence"],
        # another model (--compare-model) on the same held-out candidates
        "compared_model": compared,
        "profile": profile.name,
        "profile_hash": profile.stable_hash(),
        "input": profile.primary_input.name,
        "measured_ms_range": [
            float(own["measured_ms"].min()),
            float(own["measured_ms"].max()),
        ],
        # the held-out candidates' model, its candidates, and every candidate of the profile
        "held_out_model": reference_key(base),
        "split_seed": args.seed,
        "test_frac": args.test_frac,
        "model_candidates": len(own),
        "n_train_same_model": len(own_train),
        "dataset_candidates": len(models),
        "rows": frame.to_dict(orient="records"),
        "provenance": {
            "voxfit": __version__,
            "tvm": sorted(set(models["tvm_version"])),
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "trials_per_task": profile.tuning.trials_per_task,
            "host": describe_host().as_dict(),
            "shipped_dataset": not args.no_shipped,
            "features": list(cm.card["features"]),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    full = fit(models, tasks, profile, seed=args.seed)
    full.card["metrics"] = {
        "held_out": {k: m[k] for k in KEYS},
        "n_test": len(te),
        "roofline": result["roofline"],
    }
    saved = full.save(args.model_out or fitted_model_dir(profile, args.work))

    fig = go.Figure()
    lim = [0, float(max(frame["measured_ms"].max(), frame["predicted_ms"].max()) * 1.05)]
    fig.add_trace(go.Scatter(x=lim, y=lim, mode="lines", name="y = x", line={"dash": "dot"}))
    for col, name in (("predicted_ms", "xgboost"), ("roofline_ms", "roofline")):
        fig.add_trace(
            go.Scatter(
                x=frame["measured_ms"],
                y=frame[col],
                mode="markers",
                name=name,
                text=frame["cand"],
            )
        )
    fig.update_layout(
        title=f"{profile.name}: predicted vs measured latency, {len(te)} held-out candidates",
        xaxis_title="measured ms (TVM, tuned; at the reference speed)",
        yaxis_title="predicted ms",
    )
    fig.write_html(args.out.with_suffix(".html"), include_plotlyjs="cdn")

    title = f"{profile.name}: {len(tr)} train / {len(te)} held-out candidates"
    console.print(metrics_table(title, m))
    console.print(
        f"predict {predict_ms:.2f} ms/candidate; collection {collect_minutes:.1f} min; "
        f"model -> {saved}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
