"""A new device from nothing: how good is its latency model after ~20 measurements?

For each new device this machine can host (none of them the source profile
``x86-avx2-2core``, whose shipped model is transferred):

- ``x86-64-sse-rpc`` (the headline): a CPU without AVX (x86-64 baseline ISA), reached through
  a TVM RPC tracker and server on 127.0.0.1;
- ``x86-avx2-1core``: the AVX2 CPU with one core, measured locally;

it onboards the device cold (an empty tuning database: ``voxfit device onboard``: tune on
the device within a budget, measure ``--n`` levelled candidates in rounds alternating with
the base, fit the transfer model), then measures ``--heldout`` further candidates the same
way and reports, on them: the transfer model's share within +-10% and Spearman, a model
from scratch on the same samples (``scratch_spearman``: the best of a linear FLOPs model
and shallow xgboost), and a ceiling (``full_spearman``: the from-scratch xgboost in 5-fold
cross-validation over every candidate measured on the device, fewer than the source's 300:
said in ``full_n``). It also measures what seeding buys: the base model's time on the device
with no schedules, with the seed profile's schedules, and after tuning on the device.

The sibling-host check: the source profile on this host (which is not where its shipped
model was fitted, or fresh candidates where it is): ``--n`` measured candidates calibrate
the shipped model (the same transfer), ``--sibling-fresh`` more test it
(``sibling_host_within_10pct``), against the shipped model as it is.

Measurements go to ``<work>/measurements/<profile>/`` and tuning records to
``<work>/tuning/<profile>/`` (``--work``, default ``work/onboard-bench``), so a killed run
resumes; ``--fresh`` empties that work folder first (a cold start). Writes
``benchmarks/results/onboard.json`` (after each device) and ``onboard.html``.

    python benchmarks/onboard.py --fresh
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from _common import RESULTS, provenance
from voxfit.cost_models import CostModel, fitted_model_dir, load_dataset, metrics
from voxfit.cost_models._kernels import KernelModel, fit_kernels
from voxfit.cost_models._onboard import (
    kernel_or_transfer,
    labelled,
    labelled_keys,
    measure_candidates,
    onboard,
    split_candidates,
)
from voxfit.cost_models._transfer import fit_scratch, fit_transfer
from voxfit.errors import ConfigError
from voxfit.hw_profiles import describe_host, find_profile, load_profile

SOURCE = "x86-avx2-2core"
DEVICES = ("x86-64-sse-rpc", "x86-avx2-1core")


def _base(checkpoint: Path | None) -> Any:
    from voxfit.models import build_model, default_config
    from voxfit.train import load_checkpoint

    if checkpoint is not None and checkpoint.exists():
        return load_checkpoint(checkpoint).model.eval()
    return build_model(default_config("tdnn", 55, "default")).eval()


def _cv_full(rows: list[tuple[list[Any], float]], folds: int = 5) -> dict[str, Any]:
    """The from-scratch xgboost and linear models in k-fold CV over every measured row."""
    idx = np.arange(len(rows))
    rng = np.random.default_rng(0)
    rng.shuffle(idx)
    preds: dict[str, list[float]] = {}
    ys: list[float] = []
    for k in range(folds):
        test = set(idx[k::folds].tolist())
        train = [rows[i] for i in idx if i not in test]
        models = fit_scratch(train)
        for i in sorted(test):
            for name, f in models.items():
                preds.setdefault(name, []).append(f(rows[i][0]))
        ys += [rows[i][1] for i in sorted(test)]
    return {name: metrics(p, ys) for name, p in preds.items()}


def _seed_buys(base: Any, profile: Any, work: Path, cost_models: Path) -> dict[str, Any]:
    """The base's time on the device: untuned, seed schedules only, the device's own."""
    from voxfit.latency import TvmLocalEstimator, TvmRpcEstimator

    cls = TvmRpcEstimator if profile.measurement.method == "rpc" else TvmLocalEstimator
    out: dict[str, Any] = {}
    spec = (profile.primary_input,)
    variants = {
        "untuned": (dataclasses.replace(profile.tuning, seed_from=None), work / "empty-tuning"),
        "seeded": (profile.tuning, work / "empty-tuning"),
        "device_tuned": (profile.tuning, work / "tuning" / profile.name),
    }
    for name, (tuning, tdir) in variants.items():
        p = dataclasses.replace(profile, tuning=tuning)
        with cls(p, work / "seed-buys" / name, cost_models_dir=cost_models, tuning_dir=tdir,
                 tune=False) as est:  # fmt: skip
            (r,) = est.estimate(base, spec)
        out[f"{name}_ms"] = r.median_ms if r.ok else None
        if not r.ok:
            out[f"{name}_error"] = r.error
    return out


def device_row(
    name: str, base: Any, space: Any, args: Any, stack: ExitStack, previous: dict[str, Any]
) -> dict[str, Any]:
    profile = load_profile(find_profile(name))
    if profile.measurement.method == "rpc":  # the device, hosted here
        from voxfit.latency import hosted

        profile = stack.enter_context(hosted(profile, args.work / "devices" / name))
    source = load_profile(find_profile(SOURCE))
    from voxfit.cost_models._transfer import TransferModel

    t0 = time.monotonic()
    if args.rescore:  # the saved models on the stored measurements: nothing tuned or refitted
        model_dir = fitted_model_dir(profile, args.work)
        card = TransferModel.load(model_dir).card["onboard"]
        tuned = (card["tuned_models"], card["tuned_tasks"])
    else:
        rep = onboard(
            base, space, profile, work=args.work, cost_models_dir=args.cost_models,
            source=source, n_shot=args.n, validate=0, tune_budget_s=args.tune_minutes * 60,
            tune_models=args.tune_models, seed=args.seed, tune_seeded=args.tune_seeded,
            kernel_models=args.kernel_models,
        )  # fmt: skip
        model_dir, tuned = rep.model_dir, (rep.tuned_candidates, rep.tuned_tasks)
    onboard_s = time.monotonic() - t0
    # the runs of this onboarding that completed (a killed run saves nothing): the first
    # was the cold one; later ones re-measured (e.g. after --remeasure)
    runs = TransferModel.load(model_dir).card["onboard"].get("runs") or []
    spent_s = sum(runs[0][k] for k in ("tune", "measure", "fit")) if runs else onboard_s
    _, held = split_candidates(space, args.n, args.heldout, args.seed)
    t1 = time.monotonic()
    if not args.rescore:
        measure_candidates(
            base, held, profile, _mstore(_store(args.work, profile)), work=args.work,
            cost_models_dir=args.cost_models, seed=args.seed, label="held out",
        )  # fmt: skip
    heldout_s = (
        time.monotonic() - t1 if not args.rescore else previous["heldout_measure_minutes"] * 60
    )

    model = TransferModel.load(model_dir)
    shots, _ = split_candidates(space, args.n, 0, args.seed)
    shot_rows, _ = labelled(_store(args.work, profile), shots, profile.primary_input.name)
    held_keyed, _ = labelled_keys(_store(args.work, profile), held, profile.primary_input.name)
    held_rows = [(t, y) for t, _, y in held_keyed]
    ys = [y for _, y in held_rows]
    transfer = metrics([model.predict_tasks(t).ms for t, _ in held_rows], ys)
    # the kernel model (fitted at onboarding over the database as it was then: kernels the
    # held-out candidates brought later are estimated from their pattern, or the transfer
    # model predicts the candidate)
    try:
        kmodel: KernelModel | None = KernelModel.load(model_dir)
    except ConfigError:
        kmodel = None
    kpreds, khow = kernel_or_transfer(kmodel, model, held_keyed)
    # the device's model as a search predicts with it (KernelPredictor): the kernel model
    # where it can, the transfer model else
    mine = metrics(kpreds, ys)
    scratch = {
        k: metrics([f(t) for t, _ in held_rows], ys) for k, f in fit_scratch(shot_rows).items()
    }
    full = _cv_full(shot_rows + held_rows)
    models, _ = load_dataset(_store(args.work, profile))
    return {
        "device": name,
        "method": profile.measurement.method,
        "target": profile.target,
        "n_shot": len(shot_rows),
        "n_heldout": len(held_rows),
        "model": "kernels where the kernel model can predict, else transfer"
        if kmodel is not None
        else "transfer",
        "heldout_within_10pct": mine["within_10pct"],
        "heldout_spearman": mine["spearman"],
        "heldout_mape": mine["mape"],
        "transfer_heldout_within_10pct": transfer["within_10pct"],
        "transfer_heldout_spearman": transfer["spearman"],
        "transfer_heldout_mape": transfer["mape"],
        "kernel_how": khow,
        "kernel_card": kmodel.card if kmodel is not None else None,
        "scratch_spearman": max(m["spearman"] for m in scratch.values()),
        "scratch_within_10pct": max(m["within_10pct"] for m in scratch.values()),
        "scratch": scratch,
        "full_spearman": max(m["spearman"] for m in full.values()),
        "full_within_10pct": max(m["within_10pct"] for m in full.values()),
        "full_n": len(shot_rows) + len(held_rows),
        "full": full,
        "onboard_minutes": spent_s / 60,
        "onboard_runs": runs,
        "this_run_minutes": previous.get("this_run_minutes") if args.rescore else onboard_s / 60,
        "heldout_measure_minutes": heldout_s / 60,
        "tuned_models": tuned[0],
        "tuned_tasks": tuned[1],
        # tuning records of the device's own, measured through its RPC runner
        "device_records": _records(args.work / "tuning" / name),
        "rpc_tuned": profile.measurement.method == "rpc"
        and _records(args.work / "tuning" / name) > 0,
        "median_relative_iqr": float(models["relative_iqr"].median()) if len(models) else None,
        "coef": model.card["coef"],
        "seed_buys": previous["seed_buys"]
        if args.rescore
        else _seed_buys(base, profile, args.work, args.cost_models),
        "points": [
            {"measured_ms": y, "predicted_ms": k, "transfer_ms": model.predict_tasks(t).ms}
            for (t, y), k in zip(held_rows, kpreds, strict=True)
        ],
    }


def _records(db: Path) -> int:
    f = db / "database_tuning_record.json"
    return sum(1 for x in f.read_text().splitlines() if x.strip()) if f.exists() else 0


def _store(work: Path, profile: Any) -> Path:
    from voxfit.cost_models import measurements_dir

    return Path(measurements_dir(profile, work))


def sibling_row(base: Any, space: Any, args: Any, previous: dict[str, Any]) -> dict[str, Any]:
    """The source profile on this host: the shipped model as it is, and calibrated with
    ``--n`` measurements, on ``--sibling-fresh`` fresh candidates."""
    from voxfit.cost_models import load_for, reference_key

    profile = load_profile(find_profile(SOURCE))
    src = load_for(profile, args.cost_models)
    assert isinstance(src, CostModel), "the shipped model is a fitted cost model"
    shots, fresh = split_candidates(space, args.n, args.sibling_fresh, args.seed + 77)
    store = _store(args.work, profile)
    # the tuning records this host's searches made (the check is about the latency model:
    # a cold database would only make it slower)
    measure_candidates(
        base, shots + fresh, profile, _mstore(store), work=args.work,
        cost_models_dir=args.cost_models, seed=args.seed, label="sibling",
        tuning_dir=args.sibling_tuning,
    )  # fmt: skip
    shot_rows, ref = labelled(store, shots, profile.primary_input.name)
    fresh_keyed, _ = labelled_keys(store, fresh, profile.primary_input.name)
    fresh_rows = [(t, y) for t, _, y in fresh_keyed]
    cal = fit_transfer(src, shot_rows, profile, reference_ms=ref)
    ys = [y for _, y in fresh_rows]
    transfer = metrics([cal.predict_tasks(t).ms for t, _ in fresh_rows], ys)
    # this host's kernel table (voxfit device time-kernels: the schedules the profile's
    # databases pick, timed here), then the kernel model of the shots over it, as a search
    # on this host calibrates (KernelPredictor); the transfer where it cannot predict
    from voxfit.cost_models._host_kernels import host_table, time_kernels_here, timed_seconds

    # timed once, after the shots and fresh candidates were measured (as a user runs it
    # before a search: kernels tuned later, by the confirmation candidates, are estimated
    # from their pattern; a re-run scores with the table as it was first made)
    t0 = time.monotonic()
    timed = None
    if host_table(profile, args.work) is None or args.sibling_retime:
        timed = time_kernels_here(
            profile, work=args.work, cost_models_dir=args.cost_models,
            tuning_dir=args.sibling_tuning,
        )  # fmt: skip
    time_s = time.monotonic() - t0
    table = host_table(profile, args.work) or {}
    shot_keyed, _ = labelled_keys(store, shots, profile.primary_input.name)
    try:
        kmodel: KernelModel | None = fit_kernels(
            [(k, y) for _, k, y in shot_keyed if k is not None], table
        )
    except ConfigError as e:
        print(f"sibling: no kernel model: {e}")
        kmodel = None
    kpreds, khow = kernel_or_transfer(kmodel, cal, fresh_keyed)
    calibrated = metrics(kpreds, ys)
    # a confirmation set, measured after the method was settled on the fresh ones: other
    # candidates (another sampling seed), the same fitted models
    confirm: dict[str, Any] | None = None
    if args.sibling_confirm:
        seen = {c.stable_hash() for c in shots + fresh}
        _, more = split_candidates(space, 0, args.sibling_confirm, args.seed + 177)
        more = [c for c in more if c.stable_hash() not in seen]
        measure_candidates(
            base, more, profile, _mstore(store), work=args.work,
            cost_models_dir=args.cost_models, seed=args.seed, label="sibling confirmation",
            tuning_dir=args.sibling_tuning,
        )  # fmt: skip
        more_keyed, _ = labelled_keys(store, more, profile.primary_input.name)
        cy = [y for *_, y in more_keyed]
        cpreds, chow = kernel_or_transfer(kmodel, cal, more_keyed)
        confirm = {
            "n": len(more_keyed),
            "calibrated": metrics(cpreds, cy),
            "transfer_calibrated": metrics(
                [cal.predict_tasks(t).ms for t, _, _ in more_keyed], cy
            ),
            "kernel_how": chow,
        }
    # the shipped model as it is: its ms are at its own reference speed; compare relative
    # latencies (candidate / base), the only scale the two hosts share
    from voxfit.cost_models import decompose

    base_pred = src.predict_tasks(decompose(base, profile.primary_input.frames)).ms
    typical = next(iter(ref.values()))
    as_is = metrics([src.predict_tasks(t).ms / base_pred * typical for t, _ in fresh_rows], ys)
    host = describe_host()
    return {
        "host": host.as_dict(),
        "fitted_host": src.card.get("host") or "not recorded (fitted 2026-11-26 on another host)",
        "reference": reference_key(base),
        "n_shot": len(shot_rows),
        "n_fresh": len(fresh_rows),
        "calibrated": calibrated,
        "model": "this host's kernel times where they predict, else the transfer calibration"
        if kmodel is not None
        else "transfer calibration",
        "transfer_calibrated": transfer,
        "as_is": as_is,
        "coef": cal.card["coef"],
        "kernel_how": khow,
        "kernel_card": kmodel.card if kmodel is not None else None,
        "confirmation": confirm,
        "kernels_timed_here": len(table),
        "kernels_not_timed": len(timed.errors) if timed else previous.get("kernels_not_timed"),
        # every run that timed kernels into the table (None: made before it was recorded)
        "time_kernels_minutes": (s / 60 if (s := timed_seconds(profile, args.work)) else None),
        "time_kernels_this_run_minutes": time_s / 60,
        "points": [
            {"measured_ms": y, "predicted_ms": k, "transfer_ms": cal.predict_tasks(t).ms}
            for (t, y), k in zip(fresh_rows, kpreds, strict=True)
        ],
    }


def _mstore(d: Path) -> Any:
    from voxfit.cost_models import MeasurementStore

    return MeasurementStore(d)


def qemu_row(base: Any, args: Any) -> dict[str, Any]:
    """The aarch64 device under qemu (timings under emulation are not latency): the base
    tuned on the emulated device through the RPC runner (``--qemu-trials`` per task) and
    run there, against torch."""
    import torch

    from voxfit.compile import TvmWorker, compile_model
    from voxfit.latency import local_farm
    from voxfit.latency._qemu import QemuSetupError, qemu_rpc_server, setup_qemu_aarch64

    name = "arm-aarch64-qemu"
    try:
        env = setup_qemu_aarch64(install=False)
    except QemuSetupError as e:
        return {"device": name, "skipped": str(e)}
    shipped = load_profile(find_profile(name))
    rpc = shipped.measurement.rpc
    assert rpc is not None, f"{name}: an RPC profile"
    logs = args.work / "devices" / name
    t0 = time.monotonic()
    with (
        local_farm(rpc.device_key, servers=0, log_dir=logs) as farm,
        qemu_rpc_server(env, farm.host, farm.tracker_port, rpc.device_key,
                        log_file=logs / "qemu.log"),
        TvmWorker(1) as w,
    ):  # fmt: skip
        rpc = dataclasses.replace(rpc, tracker_port=farm.tracker_port)
        p = dataclasses.replace(
            shipped,
            measurement=dataclasses.replace(shipped.measurement, rpc=rpc),
            tuning=dataclasses.replace(
                shipped.tuning, trials_per_task=args.qemu_trials, trials_per_iter=args.qemu_trials
            ),
        )
        up_s = time.monotonic() - t0
        (r,) = compile_model(base, p, w, args.work / "qemu-build", inputs=(p.primary_input,),
                             cost_models_dir=args.cost_models,
                             tuning_dir=args.work / "tuning" / name)  # fmt: skip
        if not r.ok:
            return {"device": name, "error": r.error}
        x = torch.randn(1, r.frames, 80, generator=torch.Generator().manual_seed(1))
        out = w.call("run_rpc", timeout_s=900, lib=str(r.lib), input=x.numpy(), rpc={
            "tracker_host": farm.host, "tracker_port": farm.tracker_port,
            "device_key": rpc.device_key, "connect_timeout_s": rpc.connect_timeout_s,
            "session_timeout_s": 600.0,
        })  # fmt: skip
    if "error" in out:
        return {"device": name, "error": out["error"]}
    with torch.no_grad():
        ref = base(x, torch.tensor([r.frames]))[0].numpy()
    diff = float(np.max(np.abs(np.asarray(out["output"]) - ref)))
    agree = float(np.mean(np.asarray(out["output"]).argmax(-1) == ref.argmax(-1)))
    return {
        "device": name,
        "method": "rpc (qemu-aarch64 emulation: correctness, not latency)",
        "target": shipped.target,
        "rpc_tuned": r.details.get("tuner") == "rpc" and r.tuned_trials > 0,
        "tasks": r.n_tasks,
        "tuned_trials": r.tuned_trials,
        "tune_s": r.tune_s,
        "server_up_s": up_s,
        "max_abs_diff_vs_torch": diff,
        "frame_agreement_vs_torch": agree,
        "matches_torch": diff <= 1e-3,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for row in result["devices"]:
        pts = row.get("points") or []
        if not pts:
            continue
        fig.add_trace(
            go.Scatter(
                x=[p["measured_ms"] for p in pts],
                y=[p["predicted_ms"] for p in pts],
                mode="markers",
                name=f"{row['device']} (n_shot {row['n_shot']}, "
                f"{row['heldout_within_10pct']:.0%} within 10%)",
            )
        )
    sib = result.get("sibling") or {}
    if sib.get("points"):
        fig.add_trace(
            go.Scatter(
                x=[p["measured_ms"] for p in sib["points"]],
                y=[p["predicted_ms"] for p in sib["points"]],
                mode="markers",
                name=f"{SOURCE} on {sib['host'].get('cpu_model')} (calibrated from "
                f"{sib['n_shot']}, {sib['calibrated']['within_10pct']:.0%} within 10%)",
            )
        )
    rows = [*result["devices"], sib]
    lo = min((p["measured_ms"] for r in rows for p in r.get("points", [])), default=0)
    hi = max((p["measured_ms"] for r in rows for p in r.get("points", [])), default=1)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="exact"))
    fig.update_layout(
        title="New devices: transferred latency model on held-out candidates",
        xaxis_title="measured ms (at the device's reference speed)",
        yaxis_title="predicted ms",
    )
    fig.write_html(path)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--devices", default=",".join(DEVICES))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=50)
    ap.add_argument("--sibling-fresh", type=int, default=30)
    ap.add_argument("--no-sibling", action="store_true")
    ap.add_argument(
        "--sibling-retime", action="store_true",
        help="time this host's kernels again (what the databases have that the table lacks)",
    )  # fmt: skip
    ap.add_argument(
        "--sibling-confirm", type=int, default=0,
        help="more sibling candidates (another seed) scored with the same fitted models",
    )  # fmt: skip
    ap.add_argument("--tune-minutes", type=float, default=12.0)
    ap.add_argument("--tune-models", type=int, default=4)
    ap.add_argument("--kernel-models", type=int, default=30, help="onboard --kernel-models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--checkpoint", type=Path, default=Path("work/models/tdnn-d9381586fb1b/checkpoint.pt")
    )
    ap.add_argument("--space", default="tdnn-default")
    ap.add_argument("--work", type=Path, default=Path("work/onboard-bench"))
    ap.add_argument("--cost-models", type=Path, default=Path("cost_models"))
    ap.add_argument("--sibling-tuning", type=Path, default=Path("work/tuning/x86-avx2-2core"))
    ap.add_argument("--tune-seeded", action="store_true", help="onboard --tune-seeded")
    ap.add_argument("--qemu", action="store_true", help="also the aarch64 device under qemu")
    ap.add_argument("--qemu-trials", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="empty --work first (a cold start)")
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="score the stored measurements again with the saved models (nothing tuned, "
        "measured or refitted; the seed timings are the previous run's)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "onboard.json")
    args = ap.parse_args()
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    from voxfit.spaces import find_space

    base = _base(args.checkpoint)
    space = find_space(args.space).bind(base.structure())
    result: dict[str, Any] = (
        json.loads(args.out.read_text()) if args.out.exists() and not args.fresh else {}
    )
    result.setdefault("devices", [])
    rows = {r["device"]: r for r in result["devices"]}
    for name in [d for d in args.devices.split(",") if d]:
        if name in rows and not args.rescore:
            continue
        with ExitStack() as stack:
            row = device_row(name, base, space, args, stack, rows.get(name, {}))
        # what ran this row (the file's top-level provenance is the last run's)
        row["provenance"] = rows.get(name, {}).get("provenance") if args.rescore else None
        row["provenance"] = row["provenance"] or _provenance(args)
        result["devices"] = [r for r in result["devices"] if r["device"] != name] + [row]
        _headline(result)
        _write(result, args)
    if args.qemu and not any(r["device"] == "arm-aarch64-qemu" for r in result["devices"]):
        result["devices"].append(qemu_row(base, args))
        _write(result, args)
    if not args.no_sibling and ("sibling" not in result or args.rescore):
        result["sibling"] = sibling_row(base, space, args, result.get("sibling") or {})
        result["sibling_host_within_10pct"] = result["sibling"]["calibrated"]["within_10pct"]
        result["sibling_host"] = result["sibling"]["host"].get("cpu_model")
        conf = result["sibling"].get("confirmation")
        result["sibling_host_confirm_within_10pct"] = (
            conf["calibrated"]["within_10pct"] if conf else None
        )
        result["sibling"]["provenance"] = _provenance(args)
        _write(result, args)


HEADLINE = {
    "n_shot", "heldout_within_10pct", "heldout_spearman", "scratch_spearman", "full_spearman",
    "full_n", "onboard_minutes", "rpc_tuned", "model", "transfer_heldout_within_10pct",
    "transfer_heldout_spearman",
}  # fmt: skip
KEPT = {
    "devices", "headline_device", "provenance", "measured_provenance", "sibling",
    "sibling_host_within_10pct", "sibling_host", "sibling_host_confirm_within_10pct",
}  # fmt: skip


def _headline(result: dict[str, Any]) -> None:
    rows = {r["device"]: r for r in result["devices"] if "heldout_spearman" in r}
    if not rows:
        return
    head = rows.get("x86-64-sse-rpc") or next(iter(rows.values()))
    result["headline_device"] = head["device"]
    # a key an earlier version of this script wrote to the same file is not kept
    for k in set(result) - HEADLINE - KEPT:
        del result[k]
    for k in HEADLINE:
        result[k] = head.get(k)


def _provenance(args: Any) -> dict[str, Any]:
    return provenance(
        checkpoint=str(args.checkpoint), host=describe_host().as_dict(), source=SOURCE,
        settings={k: str(v) for k, v in vars(args).items()},
    )  # fmt: skip


def _write(result: dict[str, Any], args: Any) -> None:
    if args.rescore and "provenance" in result:  # what measured them: the first run's
        result.setdefault("measured_provenance", result["provenance"])
    result["provenance"] = _provenance(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    plot(result, args.out.with_suffix(".html"))
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("devices", "sibling")}, indent=1)
    )


if __name__ == "__main__":
    main()
