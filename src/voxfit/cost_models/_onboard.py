"""Onboarding a new device: tune on it, measure a few candidates, transfer a latency model.

:func:`onboard` does, for a profile with nothing of its own (no tuning records, no model):

1. **tune** on the device the tasks of the uncompressed base and of the first sampled
   candidates that no database covers (through the profile's runner: its RPC tracker for an
   RPC profile), until the tuning budget is spent; tasks the seed profile's schedules serve
   (``tuning.seed_from``) keep them, timed on the device first, unless ``tune_seeded``;
2. **measure** ``n_shot`` candidates (the levelled sampler spreads them over the space's
   light and heavy corners), each in rounds alternating with the base, so the labels are
   drift-free (relative to the base x the base's typical time);
3. **fit** a :class:`~voxfit.cost_models._transfer.TransferModel` from the source profile's
   fitted cost model, and a :class:`~voxfit.cost_models._kernels.KernelModel` over the
   device's own tuning records (``kernel_models`` more sampled candidates are tuned in step
   1, not timed whole, to fill its table); a search predicts with the kernel model where it
   can (:class:`~voxfit.cost_models._estimator.KernelPredictor`);
4. **validate** it on ``validate`` further candidates measured the same way (and the
   from-scratch models on the same samples, for comparison), write its card with the
   figures, and report what each step spent.

Every measurement is stored as soon as it is made (:class:`MeasurementStore` under the work
folder) and every tuning record in the device's database, so a killed onboarding resumes
where it stopped; a device that goes away ends it with one line naming tracker and key.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from voxfit._progress import progress_bar
from voxfit.cost_models._dataset import (
    random_calibration,
    reference_key,
    rows_of,
    sample_candidates,
)
from voxfit.cost_models._features import FEATURES, Task
from voxfit.cost_models._kernels import KernelModel, database_kernels, fit_kernels
from voxfit.cost_models._model import CostModel, fitted_model_dir, load_for, metrics
from voxfit.cost_models._store import (
    MeasurementStore,
    load_dataset,
    measurements_dir,
    noisy_keys,
)
from voxfit.cost_models._transfer import (
    TransferModel,
    fit_scratch,
    fit_transfer,
    scratch_loo_mape,
)
from voxfit.errors import ConfigError, VoxfitError
from voxfit.hw_profiles import HardwareProfile, describe_host
from voxfit.models import n_mels_of
from voxfit.plan import Candidate
from voxfit.spaces import BoundSpace

log = logging.getLogger(__name__)

SOURCE = "onboard"
#: a paired measurement whose ratio IQR exceeds this share of the ratio is measured again
NOISY_REL_IQR = 0.15


class DeviceGone(VoxfitError):
    """The device stopped answering during onboarding (what was measured is kept)."""


@dataclass
class OnboardReport:
    """What an onboarding did: the model's folder and card figures, and the time spent."""

    profile: str
    model_dir: Path
    n_shot: int
    n_validate: int
    tuned_candidates: int = 0
    tuned_tasks: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, dict[str, Any]] = field(default_factory=dict)
    heldout_kernels: dict[str, Any] = field(default_factory=dict)
    failed: int = 0

    @property
    def minutes(self) -> float:
        return sum(self.seconds.values()) / 60

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "model_dir": str(self.model_dir),
            "n_shot": self.n_shot,
            "n_validate": self.n_validate,
            "tuned_candidates": self.tuned_candidates,
            "tuned_tasks": self.tuned_tasks,
            "seconds": self.seconds,
            "minutes": self.minutes,
            "heldout": self.heldout,
            "scratch": self.scratch,
            "heldout_kernels": self.heldout_kernels,
            "failed": self.failed,
        }


def _estimator(
    profile: HardwareProfile,
    base: nn.Module,
    work: Path,
    cost_models_dir: Path,
    tuning_dir: Path | None = None,
) -> Any:
    from voxfit.compile import default_tuning_dir
    from voxfit.latency import TvmLocalEstimator, TvmRpcEstimator

    cls = TvmRpcEstimator if profile.measurement.method == "rpc" else TvmLocalEstimator
    if profile.measurement.method not in ("rpc", "local"):
        raise ConfigError(
            f"{profile.source or profile.name}: measurement.method: onboarding measures on the "
            f"device (local or rpc), not {profile.measurement.method}"
        )
    return cls(
        profile,
        work / "onboard-builds" / profile.name,
        cost_models_dir=cost_models_dir,
        tuning_dir=tuning_dir or default_tuning_dir(work, profile),
        reference=base,
    )


def split_candidates(
    space: BoundSpace, n_shot: int, validate: int, seed: int
) -> tuple[list[Candidate], list[Candidate]]:
    """The ``n_shot`` candidates to learn from (levelled: spread over the space's corners)
    and ``validate`` others (half uniform, half levelled, from another seed)."""
    shots = sample_candidates(space, 0, seed, levelled=n_shot)
    taken = {c.stable_hash() for c in shots}
    more = sample_candidates(space, validate, seed + 1000, levelled=validate)
    uniform = [c for c in more[:validate] if c.stable_hash() not in taken]
    lev = [c for c in more[validate:] if c.stable_hash() not in taken]
    held = [x for pair in zip(uniform, lev, strict=False) for x in pair][:validate]
    return shots, held


def _check_device(profile: HardwareProfile) -> None:
    """An RPC profile's tracker answers and has a device under the profile's key, before
    anything is built.

    Raises:
        DeviceGone: naming the tracker and the key.
    """
    from voxfit.latency import tracker_state

    rpc = profile.measurement.rpc
    if profile.measurement.method != "rpc" or rpc is None:
        return
    try:
        tracker_state(
            rpc.tracker_host, rpc.tracker_port, rpc.device_key, rpc.connect_timeout_s + 60
        )
    except ConfigError as e:
        raise DeviceGone(f"{profile.name}: {e}") from None


def tune_on_device(
    base: nn.Module,
    candidates: Sequence[nn.Module],
    profile: HardwareProfile,
    *,
    work: Path,
    cost_models_dir: Path,
    budget_s: float,
    on_done: Callable[[int, float, int], None] | None = None,
    tune_seeded: bool = False,
) -> tuple[int, int]:
    """Tune on the device every task of ``base`` and then of each of ``candidates`` that
    no database has (with ``tune_seeded``, also those the seed profile's schedules serve),
    starting no new model once ``budget_s`` is spent. Returns (models compiled, tasks
    tuned).

    Raises:
        DeviceGone: the device or tracker went away (the records so far are kept).
    """
    from voxfit.compile import TvmWorker, compile_model, default_tuning_dir

    t0 = time.monotonic()
    done = tasks = 0
    with TvmWorker(profile.cores) as w:
        for i, m in enumerate([base, *candidates]):
            if time.monotonic() - t0 >= budget_s:
                break
            r = compile_model(
                m,
                profile,
                w,
                work / "onboard-builds" / profile.name / f"tune-{i}",
                inputs=(profile.primary_input,),
                cost_models_dir=cost_models_dir,
                tuning_dir=default_tuning_dir(work, profile),
                tune_seeded=tune_seeded,
                export=False,
            )[0]
            if not r.ok:
                if "DeviceLost" in str(r.error) or "tracker" in str(r.error).lower():
                    raise DeviceGone(f"{profile.name}: tuning on the device: {r.error}")
                log.warning("tuning model %d on %s failed: %s", i, profile.name, r.error)
                continue
            done += 1
            tasks += r.new_tasks
            if on_done is not None:
                on_done(i, time.monotonic() - t0, r.new_tasks)
    return done, tasks


def measure_candidates(
    base: nn.Module,
    candidates: Sequence[Candidate],
    profile: HardwareProfile,
    store: MeasurementStore,
    *,
    work: Path,
    cost_models_dir: Path,
    seed: int = 0,
    label: str = "measure",
    tuning_dir: Path | None = None,
) -> tuple[int, int]:
    """Measure each candidate the store lacks (alternating with ``base``) into ``store``
    (compiling with the device's database under ``work``, or ``tuning_dir``).
    Returns (measured now, failed).

    Raises:
        DeviceGone: two candidates in a row failed to be measured for a device reason.
    """
    from voxfit.compress import apply

    spec = profile.primary_input
    todo = _unmeasured(store, candidates, spec.name)
    if not todo:
        return 0, 0
    ref = reference_key(base)
    calib = random_calibration(spec.frames, seed, n_mels_of(base))
    measured = failed = lost = 0
    with (
        _estimator(profile, base, work, cost_models_dir, tuning_dir) as est,
        progress_bar(info=True) as bar,
    ):
        task = bar.add_task(f"{label} on {profile.name}", total=len(todo), info="")
        # a candidate measured too noisily (a busy host) is measured once more in this same
        # run, so a resumed run has nothing left to measure
        total = len(todo)
        again = _queue(todo, lambda: _unmeasured(store, todo, spec.name, noisy_only=True))
        for i, cand in enumerate(again):
            if i >= total:
                total += 1
                bar.update(task, total=total)
            t_c = time.monotonic()
            model = apply(base, cand, channel_multiple=profile.channel_multiple, calibration=calib)
            (r,) = est.estimate(model, (spec,))
            if not r.ok or r.relative is None:
                failed += 1
                lost = lost + 1 if "RPC" in str(r.error) or "device" in str(r.error) else 0
                bar.console.print(f"[red]{cand.stable_hash()}: {r.error or 'no reference'}")
                if lost >= 2:
                    raise DeviceGone(
                        f"{profile.name}: the device stopped answering ({r.error}); the "
                        f"{measured} candidates measured this run are kept in "
                        f"{store.directory}: run again to resume"
                    )
                bar.advance(task)
                continue
            lost = 0
            row, task_rows = rows_of(model, cand, r, profile, SOURCE, ref)
            row["collect_s"] = time.monotonic() - t_c
            row["cv"] = getattr(r, "cv", None)
            store.add(row, task_rows)
            measured += 1
            bar.update(task, info=f"{r.median_ms:.2f} ms (x{r.relative:.2f} of the base)")
            bar.advance(task)
    return measured, failed


def _unmeasured(
    store: MeasurementStore,
    candidates: Sequence[Candidate],
    input_name: str,
    *,
    noisy_only: bool = False,
) -> list[Candidate]:
    """The candidates of ``candidates`` that ``store`` lacks for ``input_name`` (or, with
    ``noisy_only``, only those it has once, measured too noisily to learn from; a second
    measurement replaces the first)."""
    models, _ = load_dataset(store.directory)
    if models.empty or "relative" not in models:
        return [] if noisy_only else list(candidates)
    ok = models[models["relative"].notna()]
    have = set(zip(ok["cand"], ok["input"], strict=True))
    times = Counter(p.name.split("-")[0] for p in store.files())
    again = {k for k in noisy_keys(ok, NOISY_REL_IQR) if times[k[0]] < 2}
    if noisy_only:
        return [c for c in candidates if (c.stable_hash(), input_name) in again]
    return [c for c in candidates if (c.stable_hash(), input_name) not in have - again]


def _queue(
    first: Sequence[Candidate], then: Callable[[], Sequence[Candidate]]
) -> Iterator[Candidate]:
    """``first``, then what ``then()`` returns once ``first`` is done."""
    yield from first
    yield from then()


def labelled(
    store_dir: Path, cands: Sequence[Candidate], input_name: str
) -> tuple[list[tuple[list[Task], float]], dict[str, float]]:
    """(tasks, ms at the reference speed) of each candidate of ``cands`` in the store
    (those measured with a reference), and the reference's typical ms."""
    rows, ref_ms = labelled_keys(store_dir, cands, input_name)
    return [(ts, y) for ts, _, y in rows], ref_ms


def labelled_keys(
    store_dir: Path, cands: Sequence[Candidate], input_name: str
) -> tuple[list[tuple[list[Task], list[Any] | None, float]], dict[str, float]]:
    """:func:`labelled` with each candidate's TVM task keys (``task_keys``: None for a row
    measured before builds reported them)."""
    import json

    models, tasks = load_dataset(store_dir)
    if models.empty:
        return [], {}
    models = models[(models["input"] == input_name) & models["relative"].notna()]
    tasks = _with_mixing(models, tasks)
    ref_ms = {
        f"{input_name}@{k}": float(g["reference_ms"].median())
        for k, g in models.groupby("reference")
    }
    typical = float(models["reference_ms"].median()) if len(models) else float("nan")
    by_cand = {k: g for k, g in tasks.groupby("cand")} if not tasks.empty else {}
    out = []
    for c in cands:
        h = c.stable_hash()
        row = models[models["cand"] == h]
        if row.empty or h not in by_cand:
            continue
        ts = _tasks_of(by_cand[h][by_cand[h]["input"] == input_name])
        raw = row["task_keys"].iloc[-1] if "task_keys" in row else None
        keys = json.loads(raw) if isinstance(raw, str) else None
        out.append((ts, keys, float(row["relative"].iloc[-1]) * typical))
    return out, ref_ms


def kernel_or_transfer(
    kernels: KernelModel | None,
    transfer: TransferModel,
    rows: Sequence[tuple[Sequence[Task], list[Any] | None, float]],
) -> tuple[list[float], dict[str, Any]]:
    """Each row's prediction by the kernel model where it can make one (its kernels are in
    the table or estimable), else by the transfer model; and how: ``kernel`` (share of
    rows the kernel model predicted), ``covered`` (share with every kernel in the table),
    ``estimated_kernels`` (kernels estimated from their pattern, over the predicted rows)."""
    preds, n_kernel, n_covered, n_est = [], 0, 0, 0
    for tasks, keys, _ in rows:
        p, est = (None, 0) if kernels is None or keys is None else kernels.predict_keys(keys)
        if p is None:
            preds.append(transfer.predict_tasks(tasks).ms)
            continue
        preds.append(p)
        n_kernel += 1
        n_covered += est == 0
        n_est += est
    n = max(len(rows), 1)
    return preds, {"kernel": n_kernel / n, "covered": n_covered / n, "estimated_kernels": n_est}


def _with_mixing(models: pd.DataFrame, tasks: pd.DataFrame) -> pd.DataFrame:
    """Task rows with the mixing features (recomputed for rows stored before them; the
    rows' profile is looked up by name, and a profile that cannot be found leaves them
    without, for a model that does not use them)."""
    from voxfit.cost_models._dataset import lacks_mixing, refeaturize
    from voxfit.hw_profiles import find_profile, load_profile

    if models.empty or not lacks_mixing(tasks):
        return tasks
    try:
        profile = load_profile(find_profile(str(models["profile"].iloc[0])))
    except ConfigError:
        return tasks
    return refeaturize(models, tasks, profile)


def _tasks_of(frame: pd.DataFrame) -> list[Task]:
    return [
        Task(str(r["task"]), {f: float(r[f]) for f in FEATURES if f in r and pd.notna(r[f])})
        for _, r in frame.iterrows()
    ]


def compare(
    model: TransferModel,
    shots: Sequence[tuple[Sequence[Task], float]],
    held: Sequence[tuple[Sequence[Task], float]],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Held-out figures of the transfer model, and of each from-scratch model fitted on the
    same ``shots``."""
    ys = [y for _, y in held]
    mine = metrics([model.predict_tasks(t).ms for t, _ in held], ys)
    scratch = {
        name: metrics([f(t) for t, _ in held], ys) for name, f in fit_scratch(shots).items()
    }
    return mine, scratch


def onboard(
    base: nn.Module,
    space: BoundSpace,
    profile: HardwareProfile,
    *,
    work: str | Path = "work",
    cost_models_dir: str | Path = "cost_models",
    source: HardwareProfile,
    source_model: str | Path | None = None,
    n_shot: int = 20,
    validate: int = 10,
    tune_budget_s: float = 600.0,
    tune_models: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
    tune_seeded: bool = False,
    kernel_models: int = 0,
) -> OnboardReport:
    """Onboard ``profile`` (see the module doc); the model goes to ``out`` (default
    :func:`~voxfit.cost_models.fitted_model_dir`), the measurements to the work folder's
    store. ``source``: the profile whose fitted model is transferred (``source_model``: its
    folder, default the shipped one); ``tune_models``: the base plus this many candidates are
    tuned on the device at most (within ``tune_budget_s``): the tasks no database covers,
    and with ``tune_seeded`` also those the seed profile's schedules serve. Off by default:
    measured on the no-AVX device, the base ran 3.74 ms with its tasks tuned there (16
    trials each, from scratch) against 3.01 ms on the AVX2 profile's schedules (54.6 ms
    untuned; unpaired timings, ``benchmarks/results/onboard_tune_seeded.json``): no gain,
    and a mix of both kinds of schedules across candidates is a difference no latency model
    sees.

    Raises:
        ConfigError: bad settings, no source model.
        DeviceGone: the device went away (everything measured so far is kept).
    """
    if n_shot < 3:
        raise ConfigError(f"onboard: n_shot={n_shot}: measure at least 3 candidates")
    work, cost_models_dir = Path(work), Path(cost_models_dir)
    src = load_for(source, cost_models_dir, source_model)
    if not isinstance(src, CostModel):
        raise ConfigError(
            f"onboard: the source model {src.directory} is itself a transfer model; "
            "transfer from a fitted cost model (voxfit cost-model fit)"
        )
    _check_device(profile)
    store = MeasurementStore(measurements_dir(profile, work))
    shots, held = split_candidates(space, n_shot, validate, seed)
    report = OnboardReport(profile.name, Path(out or fitted_model_dir(profile, work)), 0, 0)

    from voxfit.compress import apply

    t0 = time.monotonic()
    calib = random_calibration(profile.primary_input.frames, seed, n_mels_of(base))
    # the kernel model's table: every kernel of these is tuned (or its seed schedules
    # timed) on the device, without timing the whole model
    half = max(kernel_models, 0) // 2
    extra = sample_candidates(space, half, seed + 2000, levelled=max(kernel_models, 0) - half)
    to_tune = [
        apply(base, c, channel_multiple=profile.channel_multiple, calibration=calib)
        for c in [*shots[: max(0, tune_models)], *extra]
    ]
    report.tuned_candidates, report.tuned_tasks = tune_on_device(
        base, to_tune, profile, work=work, cost_models_dir=cost_models_dir,
        budget_s=tune_budget_s, tune_seeded=tune_seeded,
    )  # fmt: skip
    report.seconds["tune"] = time.monotonic() - t0

    t1 = time.monotonic()
    _, f1 = measure_candidates(
        base, shots, profile, store, work=work, cost_models_dir=cost_models_dir, seed=seed,
        label="measure",
    )  # fmt: skip
    report.seconds["measure"] = time.monotonic() - t1

    t2 = time.monotonic()
    spec = profile.primary_input
    shot_rows, ref_ms = labelled(store.directory, shots, spec.name)
    model = fit_transfer(src, shot_rows, profile, reference_ms=ref_ms, host=describe_host())
    # by measurement, on the same samples: does the transfer beat a model from scratch?
    mine = min(model.card["ridge"]["loo_mape"].values())
    theirs = scratch_loo_mape(shot_rows)
    model.card["loo_mape"] = {"transfer": mine, **{f"scratch_{k}": v for k, v in theirs.items()}}
    if min(theirs.values()) < mine:
        log.warning(
            "%s: a model from scratch fits the %d samples better than the transfer "
            "(leave-one-out MAPE %.1f%% vs %.1f%%): the source model misses what this device "
            "does; measure more candidates or refit the source", profile.name,
            len(shot_rows), 100 * min(theirs.values()), 100 * mine,
        )  # fmt: skip
    kernels = _fit_kernels(store.directory, shots, profile, work)
    if kernels is not None:
        model.card["kernels"] = kernels.card
    report.seconds["fit"] = time.monotonic() - t2
    report.n_shot = len(shot_rows)

    t3 = time.monotonic()
    f2 = 0
    if validate > 0:
        _, f2 = measure_candidates(
            base, held, profile, store, work=work, cost_models_dir=cost_models_dir,
            seed=seed, label="validate",
        )  # fmt: skip
        held_keyed, _ = labelled_keys(store.directory, held, spec.name)
        held_rows = [(ts, y) for ts, _, y in held_keyed]
        if len(held_rows) >= 3:
            report.heldout, report.scratch = compare(model, shot_rows, held_rows)
            preds, how = kernel_or_transfer(kernels, model, held_keyed)
            report.heldout_kernels = {**metrics(preds, [y for *_, y in held_keyed]), **how}
        report.n_validate = len(held_rows)
    report.seconds["validate"] = time.monotonic() - t3
    report.failed = f1 + f2
    model.card["metrics"] = {
        "heldout": report.heldout,
        "scratch_same_samples": report.scratch,
        "kernels_heldout": report.heldout_kernels,
    }
    model.card["onboard"] = {
        # every run of this onboarding (a killed one resumes): what each spent, in order
        "runs": [
            *_previous_runs(report.model_dir),
            {k: round(v, 1) for k, v in report.seconds.items()},
        ],
        "n_validate": report.n_validate,
        "tuned_models": report.tuned_candidates,
        "tuned_tasks": report.tuned_tasks,
        "seconds": {k: round(v, 1) for k, v in report.seconds.items()},
        "measurements": str(store.directory),
    }
    model.save(report.model_dir)
    if kernels is not None:
        kernels.save(report.model_dir)
    return report


def _fit_kernels(
    store_dir: Path, shots: Sequence[Candidate], profile: HardwareProfile, work: Path
) -> KernelModel | None:
    """The kernel model of the shots over a snapshot of the device's tuning database as it
    is now (None, with a warning, where the shots cannot fit one)."""
    from voxfit.compile import default_tuning_dir

    keyed, _ = labelled_keys(store_dir, shots, profile.primary_input.name)
    samples = [(k, y) for _, k, y in keyed if k is not None]
    try:
        return fit_kernels(samples, database_kernels(default_tuning_dir(work, profile)))
    except ConfigError as e:
        log.warning("%s: no kernel model: %s", profile.name, e)
        return None


def _previous_runs(model_dir: Path) -> list[dict[str, float]]:
    """What earlier runs of an onboarding into ``model_dir`` spent (none: a first run)."""
    import yaml

    try:
        card = yaml.safe_load((model_dir / "card.yaml").read_text())
        runs = card["onboard"].get("runs") or [card["onboard"]["seconds"]]
        return [dict(r) for r in runs]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return []
