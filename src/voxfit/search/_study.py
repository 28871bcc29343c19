"""The search: an Optuna multi-objective study over a space, for one hardware profile.

Objectives (all minimized, named on the study so optuna-dashboard shows them): latency on
the profile's primary input (ms), post-adaptation PER of held-out speakers (the adaptation
proxy, %), dev PER (%) and size (MB of packed weights). The profile's latency and memory
budgets are Optuna constraints (``Trial.set_constraint``). Each trial's facts are one
:class:`~voxfit.search._record.TrialRecord`, written once at its end.

Every trial's latency is first predicted by the profile's cost model (when it has one) and
promoted to a real TVM measurement when the prediction is within ``margin`` of the current
front, low-confidence, unavailable, or a baseline (the stack of :mod:`voxfit.latency`); the
trial records both and which the objective used, and every measurement is kept for the cost
model under ``<work>/measurements/<profile>/``, one file per candidate. Storage is any Optuna RDB
URL (SQLite by default) with heartbeats: a trial left RUNNING by a killed process is marked
failed and retried once when the study resumes, and completed trials are never redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from voxfit._config import OPEN_ENDED_TRIALS
from voxfit.errors import ConfigError, DataError, VoxfitError
from voxfit.hw_profiles import HardwareProfile, check_recorded_host
from voxfit.latency import LatencyResult, PromotingEstimator, always, front_rule
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan
from voxfit.search._access import complete, front, open_storage, records
from voxfit.search._audit import AuditLog
from voxfit.search._context import SearchContext
from voxfit.search._early import (
    EarlyStop,
    StoppedEarly,
    dominating_point,
    largest_relative_gain,
    optimistic_bound,
)
from voxfit.search._record import (
    FINISHED_STATES,
    OBJECTIVES,
    OVER_BUDGET_KEY,
    RECORD_KEY,
    AccuracyRecord,
    LatencyRecord,
    TrialRecord,
    record_of,
)
from voxfit.spaces import BoundSpace, SearchSpace, params_of, sample

log = logging.getLogger(__name__)
SAMPLERS = ("tpe", "nsga2", "random")
DEFAULT_SAMPLER = "tpe"


def finished_trials(study: optuna.Study) -> int:
    """Trials that count against the budget: complete, failed, stopped early."""
    return sum(
        not t.user_attrs.get(OVER_BUDGET_KEY)
        for t in study.get_trials(deepcopy=False, states=FINISHED_STATES)
    )


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The samplers read each trial's constraints (``Trial.set_constraint``, Optuna 5)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=12)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"--sampler: {name!r} is not one of {', '.join(SAMPLERS)}")


def baselines(space: BoundSpace, adapter_dim: int) -> dict[str, Candidate]:
    """fp32 base, uniform int8 weights, uniform 50% pruning (of every group the space lets be
    halved; the others stay whole) -- each with the default adapters (the largest offered
    size <= ``adapter_dim`` at every slot) so the personalization of each is measured the
    same way. A baseline the space cannot express is left out (with a log line)."""
    dims = {}
    for slot, choices in space.adapters.items():
        ok = [int(d) for d in choices if 0 < int(d) <= adapter_dim] or [
            int(d) for d in choices if int(d) > 0
        ]
        if ok:
            dims[slot] = max(ok)
    kind = space.space.adapter_kinds[0]
    adapters = tuple(AdapterPlan(s, d, kind) for s, d in dims.items())  # type: ignore[arg-type]
    halved = tuple(GroupPlan(g, 0.5) for g, keep in space.groups.items() if 0.5 in keep)
    out = {
        "fp32": Candidate(adapters=adapters),
        "int8": Candidate(
            layers=tuple(LayerPlan(n, 8) for n in space.weight_bits), adapters=adapters
        ),
    }
    if halved:
        out["prune50"] = Candidate(
            groups=halved,
            adapters=adapters,
            recovery_steps=max(space.space.recovery_steps),
            importance=space.space.importance[0],  # type: ignore[arg-type]
        )
    else:
        log.warning("baseline prune50 left out: no group of the space may keep 0.5")
    usable = {}
    for name, cand in out.items():
        try:
            params_of(space, cand)
            usable[name] = cand
        except ConfigError as e:
            log.warning("baseline %s left out: %s", name, e)
    return usable


@dataclass
class SearchSettings:
    profile: HardwareProfile
    space: BoundSpace
    storage: str
    study_name: str
    n_trials: int
    timeout_s: float | None = None
    sampler: str = DEFAULT_SAMPLER
    seed: int = 0
    margin: float = 0.10
    work: Path = Path("work")
    cost_models_dir: Path = Path("cost_models")
    # a cost model fitted by the user (``voxfit cost-model fit``) instead of the shipped one
    cost_model: Path | None = None
    enqueue_baselines: bool = True
    # time onnxruntime's static int8 of the base once per study (local profiles): the peer
    measure_peer: bool = True
    # stop a trial before adaptation when its optimistic bound is dominated (None: never;
    # needs a cost model: the bound uses its latency prediction)
    early_stop: EarlyStop | None = None


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("voxfit", "torch", "apache-tvm", "optuna", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _latency_record(r: LatencyResult, profile: HardwareProfile) -> LatencyRecord:
    """The trial's latency facts from the stack's result (a prediction, or a measurement
    promoted from one)."""
    p = r.predicted if r.method != "predicted" else r
    measured = r.method != "predicted"
    c = r.compile
    return LatencyRecord(
        objective_ms=r.value_ms,
        basis=r.basis,
        source="measured" if measured else "predicted",
        predicted_ms=p.median_ms if p is not None else None,
        measured_ms=r.median_ms if measured else None,
        measured_ref_ms=r.at_reference_ms,
        relative_to_base=r.relative,
        base_ms=r.reference_ms,
        iqr_ms=r.iqr_ms if measured else None,
        repeats=r.repeats,
        low_confidence=p.low_confidence if p is not None else False,
        note=p.note if p is not None else "",
        input=r.input,
        frames=r.frames,
        target=json.dumps(profile.target, sort_keys=True),
        tvm_version=md.version("apache-tvm"),
        method=r.method if measured else None,
        new_tasks=c.new_tasks if c else None,
        compile_s=c.total_s if c else None,
        lowering=c.lowering if c else None,
        peak_memory_mb=r.peak_memory_mb if measured else None,
        predicted_memory_mb=p.peak_memory_mb if p is not None else None,
    )


def make_latency(s: SearchSettings, reference: nn.Module | None) -> PromotingEstimator:
    """The search's latency stack: the profile's cost model (when it has a usable one: the
    one named, else the shipped one, else the one ``voxfit device onboard`` or ``cost-model
    fit`` saved in the work folder) promoting to the profile's measurer; ``reference`` (the
    base) is timed alongside each measurement."""
    from voxfit.cost_models import PROFILE_CALLS, fitted_model_dir, load_predictor, model_dir
    from voxfit.latency import make_estimator

    predictor = None
    directory = s.cost_model
    if directory is None and not (model_dir(s.profile, s.cost_models_dir) / "card.yaml").exists():
        # nothing shipped for this profile: the model onboarded or fitted in the work folder
        mine = fitted_model_dir(s.profile, s.work)
        if (mine / "card.yaml").exists():
            directory = mine
            log.info("latency model: %s (fitted in the work folder)", mine)
    try:
        try:
            predictor = load_predictor(s.profile, s.cost_models_dir, directory, work=s.work)
        except DataError as e:  # this host's kernel table is torn: predict without it
            log.warning("this host's kernel table is not used (%s)", e)
            predictor = load_predictor(s.profile, s.cost_models_dir, directory)
    except ConfigError as e:
        if s.profile.measurement.method == "predicted":
            raise
        log.warning("no usable cost model (%s): every trial is measured", e)
    from voxfit.compile import default_tuning_dir

    kw: dict[str, Any] = {
        "cost_models_dir": s.cost_models_dir,
        "tuning_dir": default_tuning_dir(s.work, s.profile),  # shared by everything in work
    }
    if s.profile.measurement.method == "local":
        kw["profile_calls"] = PROFILE_CALLS  # per-task times: rows for the cost model's dataset
    return make_estimator(
        s.profile,
        s.work / "search-builds" / s.profile.name,
        predictor=predictor,
        reference=reference,
        **kw,
    )


def resume_scale(study: optuna.Study, latency: PromotingEstimator) -> None:
    """Seed the latency stack's ``base`` scale with the quietest base time the study's
    finished trials recorded (a resumed search or another worker continues on their scale)."""
    for rec in records(study, (TrialState.COMPLETE,)):
        lat = rec.latency
        if lat.basis == "base" and lat.base_ms:
            latency.seed_quietest(lat.input, lat.base_ms)


def _keep_measurement(
    s: SearchSettings, model: nn.Module, cand: Candidate, r: LatencyResult, ref: nn.Module | None
) -> None:
    """A measured candidate's rows for the cost model (a by-product: never fails a trial)."""
    from voxfit.cost_models import MeasurementStore, measurements_dir, reference_key, rows_of

    if r.method == "predicted" or not r.calls:
        return
    try:
        key = reference_key(ref) if ref is not None else None
        row, task_rows = rows_of(model, cand, r, s.profile, "search", key)
        MeasurementStore(measurements_dir(s.profile, s.work)).add(row, task_rows)
    except (VoxfitError, OSError, ValueError) as e:
        log.warning("measurement not added to the cost-model dataset: %s", e)


def _front(study: optuna.Study) -> list[tuple[float, ...]]:
    return _front_of(complete(study))


def _front_of(recs: list[TrialRecord]) -> list[tuple[float, ...]]:
    return [tuple(r.values) for r in front(recs) if r.values is not None]


def make_objective(
    ctx: SearchContext, s: SearchSettings, latency: PromotingEstimator
) -> Callable[[optuna.Trial], tuple[float, float, float, float]]:
    from voxfit.compile import saturates_int8_pairs
    from voxfit.metrics import packed_size_bytes
    from voxfit.models import count_parameters

    saturation = saturates_int8_pairs(s.profile)

    def objective(trial: optuna.Trial) -> tuple[float, float, float, float]:
        t0 = time.monotonic()
        rec = TrialRecord(number=trial.number, state="RUNNING")
        try:
            cand = sample(s.space, trial)
            seed = s.seed * 100003 + trial.number
            rec = replace(rec, plan=cand, plan_hash=cand.stable_hash(), seed=seed)
            model = ctx.build(
                cand, s.profile.channel_multiple, seed, int8_pair_saturation=saturation
            )
            build_s = time.monotonic() - t0
            size_mb = packed_size_bytes(model) / 1e6
            forced = "baseline" in trial.user_attrs
            spec = (s.profile.primary_input,)
            early = None if forced else s.early_stop
            predicted = latency.predict(model, spec) if early is not None else None
            check = None
            if early is not None and predicted and predicted[0].ok and predicted[0].value_ms:
                check = _early_check(trial.study, early, predicted[0], size_mb)
            try:
                acc = ctx.accuracy(model, before_check=check)
            except StoppedEarly as e:
                assert predicted is not None
                rec = replace(
                    rec,
                    accuracy=AccuracyRecord(dev_per=e.bound[2], pre_adapt_per=e.pre_adapt_per),
                    latency=_latency_record(predicted[0], s.profile),
                    size_mb=size_mb,
                    params=count_parameters(model),
                    stopped=str(e),
                    stop_bound=e.bound,
                    timings={"build_s": build_s, "total_s": time.monotonic() - t0},
                )
                trial.set_user_attr(RECORD_KEY, rec.to_attr())
                raise optuna.TrialPruned(str(e)) from None
            quality = (acc["post_adapt_per"], acc["dev_per"], size_mb)
            rule = always if forced else front_rule(quality, _front(trial.study), s.margin)
            (r,) = latency.estimate(model, spec, promote=rule, predicted=predicted)
            if not r.ok:
                raise VoxfitError(f"latency: {r.error}")
            _keep_measurement(s, model, cand, r, ctx.base)
            lat = _latency_record(r, s.profile)
            if lat.objective_ms is None:
                raise VoxfitError("no latency: neither predicted nor measured")
            memory = lat.peak_memory_mb or lat.predicted_memory_mb or size_mb
            trial.set_constraint("latency_ms", lat.objective_ms - s.profile.latency_budget_ms)
            trial.set_constraint("peak_memory_mb", memory - s.profile.memory_budget_mb)
            rec = replace(
                rec,
                accuracy=AccuracyRecord(
                    dev_per=acc["dev_per"],
                    post_adapt_per=acc["post_adapt_per"],
                    pre_adapt_per=acc["pre_adapt_per"],
                    adapt_gain=acc["adapt_gain"],
                    per_speaker={k: (v[0], v[1]) for k, v in acc["per_speaker"].items()},
                    adaptation=acc.get("adaptation", "proxy"),
                ),
                latency=lat,
                size_mb=size_mb,
                params=count_parameters(model),
                peak_memory_mb=memory,
                timings={
                    "build_s": build_s,
                    "dev_s": acc["dev_s"],
                    "adapt_s": acc["adapt_s"],
                    "total_s": time.monotonic() - t0,
                },
            )
            trial.set_user_attr(RECORD_KEY, rec.to_attr())
            return (lat.objective_ms, acc["post_adapt_per"], acc["dev_per"], size_mb)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            trial.set_user_attr(RECORD_KEY, replace(rec, failure=reason).to_attr())
            log.warning("trial %d failed: %s", trial.number, reason)
            raise

    return objective


def _early_check(
    study: optuna.Study, cfg: EarlyStop, predicted: LatencyResult, size_mb: float
) -> Callable[[float, float], None]:
    """What :meth:`SearchContext.accuracy` calls before adapting: raises
    :class:`StoppedEarly` when the trial's optimistic bound is dominated by the front."""

    def check(dev_per: float, pre_adapt_per: float) -> None:
        recs = complete(study)  # one read of the study for the gain and the front
        gain = largest_relative_gain(recs)
        if gain is None or len(recs) < cfg.min_complete:
            return
        bound = optimistic_bound(
            float(predicted.value_ms or 0.0), predicted.low_confidence, pre_adapt_per,
            dev_per, size_mb, gain, cfg,
        )  # fmt: skip
        by = dominating_point(bound, _front_of(recs))
        if by is not None:
            raise StoppedEarly(bound, by, pre_adapt_per)

    return check


def progress_of(
    n_trials: int, timeout_s: float | None, clock: Callable[[], float] = time.monotonic
) -> tuple[int | None, Callable[[], str]]:
    """A search's progress-bar total (None where the time, not the count, ends it) and a
    function giving the note on the time limit left (empty without a timeout)."""
    if timeout_s is None:
        return n_trials, lambda: ""
    deadline = clock() + timeout_s

    def left() -> str:
        return f"; time limit in {max(deadline - clock(), 0.0) / 60:.1f} min"

    return (None if n_trials >= OPEN_ENDED_TRIALS else n_trials), left


def _best_line(study: optuna.Study, budget_ms: float) -> str:
    ok = [r for r in complete(study) if r.feasible and r.values is not None]
    if not ok:
        return f"no trial meets the budgets yet ({budget_ms:g} ms)"
    best = min(ok, key=lambda r: r.values[1])  # type: ignore[index]
    v = best.values
    assert v is not None
    return f"best in budget: #{best.number} {v[0]:.2f} ms, post-adapt {v[1]:.1f}%, dev {v[2]:.1f}%"


def reseed_on_resume(study: optuna.Study, sampler: str, seed: int) -> None:
    """A resumed study gets a sampler seeded from ``seed`` and its trial count, so a resumed
    run does not replay the draws of the first run (a sampler re-made with the same seed
    would: random search would repeat its first trials)."""
    n = len(study.get_trials(deepcopy=False))
    if n:
        study.sampler = make_sampler(sampler, seed + 7919 * n)


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def space_change(attrs: dict[str, Any], space: SearchSpace) -> str | None:
    """Why a study (its user attributes) cannot go on with ``space``, or None when it can.

    Only what a search can draw counts: a reworded description does not stop a resume. A
    study recorded before the choices were stored is compared by the whole file's hash.
    """
    if "space_choices_hash" in attrs:
        if attrs["space_choices_hash"] == space.choices_hash():
            return None
        old, new = _leaves(attrs.get("space_choices") or {}), _leaves(space.choices())
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        return f"changed: {', '.join(keys[:4])}{more}" if keys else "its choices changed"
    if "space_hash" in attrs and attrs["space_hash"] != space.stable_hash():
        return "its file changed since the study began"
    return None


def prepare_study(s: SearchSettings, ctx: SearchContext) -> optuna.Study:
    """Create or resume the study; enqueue the baselines into a new one."""
    storage = open_storage(s.storage)
    study = optuna.create_study(
        storage=storage,
        study_name=s.study_name,
        directions=["minimize"] * len(OBJECTIVES),
        sampler=make_sampler(s.sampler, s.seed),
        load_if_exists=True,
    )
    reseed_on_resume(study, s.sampler, s.seed)
    attrs = study.user_attrs
    if "objectives" in attrs and tuple(attrs["objectives"]) != OBJECTIVES:
        raise ConfigError(
            f"study {s.study_name!r} optimizes {attrs['objectives']}, this version "
            f"{list(OBJECTIVES)}: pick another --study name"
        )
    if "profile" in attrs and attrs["profile"].get("name") != s.profile.name:
        raise ConfigError(
            f"study {s.study_name!r} was made for profile {attrs['profile'].get('name')}, "
            f"not {s.profile.name}: pick another --study name"
        )
    if attrs.get("checkpoint") and _ckpt_id(attrs["checkpoint"]) != _ckpt_id(ctx.checkpoint):
        raise ConfigError(
            f"study {s.study_name!r} searches the model {attrs['checkpoint']}, not "
            f"{ctx.checkpoint}: pick another --study name"
        )
    with warnings.catch_warnings():  # optuna-dashboard shows these names, not "Objective 0"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVES))
    changed = space_change(attrs, s.space.space)
    if changed:
        raise ConfigError(
            f"study {s.study_name!r} was made with another version of space "
            f"{attrs.get('space')} ({changed}): pick another --study name"
        )
    if "profile" not in attrs:
        study.set_user_attr("profile", {**s.profile.to_dict(), "name": s.profile.name})
        study.set_user_attr("space", s.space.space.name)
        study.set_user_attr("space_hash", s.space.space.stable_hash())
        study.set_user_attr("space_choices_hash", s.space.space.choices_hash())
        study.set_user_attr("space_choices", s.space.space.choices())
        study.set_user_attr("objectives", list(OBJECTIVES))
        study.set_user_attr("checkpoint", str(ctx.checkpoint))
        study.set_user_attr("preset", ctx.preset)
        study.set_user_attr("manifest", str(ctx.manifest.source))
        study.set_user_attr("model", ctx.model_kind)
        study.set_user_attr("versions", _versions())
        study.set_user_attr("sampler", s.sampler)
        study.set_user_attr("seed", s.seed)
        study.set_user_attr("constraints", ["latency_ms <= budget", "peak_memory_mb <= budget"])
        if s.enqueue_baselines:
            for name, cand in baselines(s.space, ctx.adapt.bottleneck).items():
                study.enqueue_trial(
                    params_of(s.space, cand), user_attrs={"baseline": name}, skip_if_exists=True
                )
    return study


def _ckpt_id(path: str | Path) -> tuple[str, ...]:
    """A checkpoint's identity across working directories: its folder (named by the content
    hash of what trained it) and file name."""
    return Path(path).parts[-2:]


def _record_base(study: optuna.Study) -> None:
    if "base" in study.user_attrs:
        return
    for r in complete(study):
        if r.baseline == "fp32":
            study.set_user_attr(
                "base",
                {
                    "trial": r.number,
                    "dev_per": r.accuracy.dev_per,
                    "post_adapt_per": r.accuracy.post_adapt_per,
                    "pre_adapt_per": r.accuracy.pre_adapt_per,
                    "size_mb": r.size_mb,
                    "latency_ms": r.objective("latency_ms"),
                    "latency_source": r.latency.source,
                },
            )
            return


def _record_calibration(study: optuna.Study, latency: PromotingEstimator) -> None:
    """The latency model's calibration to this host so far, and how an onboarded device's
    kernel model predicted (the report shows both)."""
    pred = latency.predictor.predictor if latency.predictor else None
    cal = getattr(pred, "calibration", None)
    if cal is not None and study.user_attrs.get("latency_calibration") != cal:
        study.set_user_attr("latency_calibration", cal)
    counts = getattr(pred, "counts", None)
    if isinstance(counts, dict) and study.user_attrs.get("latency_kernels") != counts:
        study.set_user_attr("latency_kernels", dict(counts))


PEER = "onnxruntime static int8 of the base (int8 weights per channel, uint8 activations)"


def export_peer(base: nn.Module, path: Path, calibration: Any) -> Path:
    """Write the peer, onnxruntime's static int8 of ``base`` (every quantizable layer),
    calibrated on ``calibration`` batches, to ``path``."""
    from voxfit.compress import apply, export_onnx_static_int8

    layers = tuple(LayerPlan(q, 8) for q in base.structure().quantizable)  # type: ignore[operator]
    export_onnx_static_int8(apply(base, Candidate(layers=layers)), path, calibration)
    return path


def measure_peer(
    s: SearchSettings, ctx: SearchContext, study: optuna.Study, rounds: int = 3
) -> dict[str, Any] | None:
    """Time the peer a front is judged against: onnxruntime's static int8 of the base, in
    ``rounds`` alternating with the base's TVM library on this machine, once per study
    (``peer`` user attribute: the median ratio peer / TVM base; the front's speed-up over
    the peer is then the base's latency objective x that ratio / a point's latency). Local
    profiles only (onnxruntime runs here); a failure is a warning, never a failed search."""
    import statistics

    if "peer" in study.user_attrs:
        return dict(study.user_attrs["peer"])
    if s.profile.measurement.method != "local":
        return None
    from voxfit.compile import default_tuning_dir
    from voxfit.latency import TvmLocalEstimator, peer_isa, time_onnxruntime
    from voxfit.models import n_mels_of

    t0 = time.monotonic()
    isa = peer_isa(s.profile.target)
    if isa["beyond_target"]:
        log.warning(
            "peer: onnxruntime may use %s, which %s (mcpu %s) lacks: `voxfit search` "
            "restricts it to the profile's ISA",
            ", ".join(isa["beyond_target"]), s.profile.name, isa["mcpu"],
        )  # fmt: skip
    frames = s.profile.primary_input.frames
    try:
        onnx_path = export_peer(
            ctx.base, s.work / "peer" / s.profile.name / f"{s.study_name}-ort-int8.onnx",
            ctx.calibration,
        )  # fmt: skip
        pairs = []
        with TvmLocalEstimator(
            s.profile,
            s.work / "peer" / s.profile.name / "builds",
            cost_models_dir=s.cost_models_dir,
            tuning_dir=default_tuning_dir(s.work, s.profile),
        ) as est:
            for _ in range(rounds):
                (r,) = est.estimate(ctx.base, (s.profile.primary_input,))
                if not r.ok or not r.median_ms:
                    raise VoxfitError(f"the base's TVM library: {r.error}")
                o = time_onnxruntime(
                    onnx_path, frames, s.profile.cores, n_mels=n_mels_of(ctx.base)
                )["median_ms"]
                pairs.append((float(r.median_ms), float(o)))
    except Exception as e:  # noqa: BLE001 - the peer is a comparison: it never fails a search
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        log.warning("peer (onnxruntime int8 of the base) not measured: %s", why)
        return None
    peer = {
        "name": PEER,
        "ratio_to_tvm_base": statistics.median(o / t for t, o in pairs),
        "rounds": [{"tvm_base_ms": t, "peer_ms": o} for t, o in pairs],
        "threads": s.profile.cores,
        "input": s.profile.primary_input.name,
        "seconds": time.monotonic() - t0,
        # the CPU features hidden from onnxruntime, and those it had beyond the profile
        "isa": isa,
    }
    study.set_user_attr("peer", peer)
    log.info(
        "peer: onnxruntime int8 of the base takes %.2fx the base's TVM time (%d rounds)",
        peer["ratio_to_tvm_base"], rounds,
    )  # fmt: skip
    return peer


def for_base(s: SearchSettings, ctx: SearchContext) -> SearchSettings:
    """The settings a search of ``ctx.base`` runs with: an elastic base (``voxfit train
    --elastic``) makes its candidates by inheriting its weights, so the space's
    ``recovery_steps`` become 0 only (no per-candidate distillation); any other base as is."""
    from voxfit.compress import elastic_widths

    if not elastic_widths(ctx.base) or s.space.space.recovery_steps == (0,):
        return s
    log.info(
        "elastic base %s: candidates inherit its weights (recovery_steps %s -> 0)",
        ctx.checkpoint,
        list(s.space.space.recovery_steps),
    )
    inner = replace(s.space.space, recovery_steps=(0,))
    return replace(s, space=replace(s.space, space=inner))


def run_search(s: SearchSettings, ctx: SearchContext) -> optuna.Study:
    """Run (or resume) the study until it has ``n_trials`` finished trials or times out.

    The start and every finished trial are entries of the study's audit log
    (``<work>/audit/<study>.jsonl``, :class:`~voxfit.search._audit.AuditLog`)."""
    from voxfit._progress import progress_bar

    s = for_base(s, ctx)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = prepare_study(s, ctx)
    # the budget and margin workers that join this study read (voxfit worker)
    study.set_user_attr("n_trials", s.n_trials)
    study.set_user_attr("margin", s.margin)
    early = dataclasses.asdict(s.early_stop) if s.early_stop is not None else None
    study.set_user_attr("early_stop", early)
    audit = AuditLog.of_study(s.work, s.study_name)
    audit.search_started(study, ctx, s.storage)  # what of users' data this search uses
    latency = make_latency(s, ctx.base)
    resume_scale(study, latency)
    if s.early_stop is not None and latency.predictor is None:
        log.warning("early stopping needs a cost model (its bound uses the latency prediction): "
                    "%s has none, so no trial stops early", s.profile.name)  # fmt: skip
    if latency.predictor is not None:
        card = latency.predictor.predictor.card
        study.set_user_attr(
            f"cost_model_{card.get('model_sha256', '')[:12]}",
            {k: card.get(k) for k in ("trained", "n_candidates", "hardware_key", "metrics")}
            | {
                "host": card.get("host"),
                "host_check": list(check_recorded_host(card.get("host"))),
            },
        )
    objective = make_objective(ctx, s, latency)
    if s.measure_peer:
        measure_peer(s, ctx, study)

    def finished() -> int:
        return finished_trials(study)

    total, time_left = progress_of(s.n_trials, s.timeout_s)

    def info(st: optuna.Study) -> str:
        return _best_line(st, s.profile.latency_budget_ms) + time_left()

    try:
        with progress_bar(info=True) as bar:
            task = bar.add_task(
                f"search {s.study_name}",
                total=total,
                completed=min(finished(), s.n_trials),
                info=info(study),
            )

            def on_trial(st: optuna.Study, t: FrozenTrial) -> None:
                _record_base(st)
                _record_calibration(st, latency)
                audit.trial_finished(t, ctx)
                msg = (
                    f"#{t.number} failed: {record_of(t).failure or ''}"
                    if t.state == TrialState.FAIL
                    else info(st)
                )
                bar.update(task, completed=min(finished(), s.n_trials), info=msg)

            def budget_met(st: optuna.Study, _t: FrozenTrial) -> None:
                if finished() >= s.n_trials:
                    st.stop()

            remaining = s.n_trials - finished()
            if remaining > 0:
                study.optimize(
                    objective,
                    timeout=s.timeout_s,
                    catch=(Exception,),
                    callbacks=[
                        on_trial,
                        budget_met,
                    ],
                    gc_after_trial=True,
                )
    finally:
        latency.close()
    _record_base(study)
    return study
