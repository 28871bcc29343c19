"""One typed record per trial: written once by the objective, read by everything else.

The objective stores a :class:`TrialRecord` as the single user attribute ``record`` (a
versioned dict); report, bundles, CLI, notebook and benchmarks read a trial only through
:func:`record_of`, which also reads trials written before the record existed (loose user
attributes ``plan``, ``metrics``, ``latency``, ``per_speaker``, ``constraints``, ...).

Constraints are not part of the record: Optuna stores them (``Trial.set_constraint``) and
:attr:`TrialRecord.constraints` reads them from there, so there is one copy of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from voxfit.plan import Candidate

RECORD_KEY = "record"
# a worker's trial started after the study's budget was full: PRUNED, never counted
OVER_BUDGET_KEY = "over_budget"
# the states of a trial that counts against the budget: complete, failed, or stopped early
# (PRUNED; over-budget trials are PRUNED too, and never count)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
RECORD_VERSION = 1
# The objective values of a trial, in order (all minimized).
OBJECTIVES = ("latency_ms", "post_adapt_per", "dev_per", "size_mb")


def _fields(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``raw`` that ``cls`` has as fields (older records carry more or fewer)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


@dataclass(frozen=True, slots=True)
class LatencyRecord:
    """How a trial's latency objective was obtained (times in ms, at ``basis``'s speed).

    ``basis``: ``reference`` (at the cost model's reference machine speed: a prediction, or a
    measurement put on that speed by the base model timed alongside), ``base`` (no cost
    model: relative to the base model timed alongside, at the quietest base time the search
    process saw) or ``raw`` (the median at the moment's speed). ``source``: ``measured`` or
    ``predicted``.
    """

    objective_ms: float | None = None
    basis: str = "raw"
    source: str = "predicted"
    predicted_ms: float | None = None
    measured_ms: float | None = None
    measured_ref_ms: float | None = None
    relative_to_base: float | None = None
    base_ms: float | None = None
    iqr_ms: float | None = None
    repeats: int = 0
    low_confidence: bool = False
    note: str = ""
    input: str = ""
    frames: int = 0
    target: str = ""
    tvm_version: str = ""
    method: str | None = None
    new_tasks: int | None = None
    compile_s: float | None = None
    lowering: str | None = None
    peak_memory_mb: float | None = None
    predicted_memory_mb: float | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LatencyRecord:
        raw = dict(raw)
        if "objective_basis" in raw:  # the name before the record
            raw.setdefault("basis", raw.pop("objective_basis"))
        return cls(**_fields(cls, raw))


@dataclass(frozen=True, slots=True)
class AccuracyRecord:
    """Error rates in percent; ``per_speaker`` maps a held-out speaker to PER [before,
    after] adapting to them; ``adaptation`` is ``proxy`` or ``full``."""

    dev_per: float | None = None
    post_adapt_per: float | None = None
    pre_adapt_per: float | None = None
    adapt_gain: float | None = None
    per_speaker: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    adaptation: str = "proxy"


@dataclass(frozen=True, slots=True)
class TrialRecord:
    """Everything voxfit knows of one trial.

    ``plan`` is None for a trial that failed before its plan was drawn, or whose recorded
    plan does not load (``plan_dict`` keeps what was recorded). ``values`` are
    the objectives (:data:`OBJECTIVES`) of a COMPLETE trial, else None. ``failure`` is the
    one-line reason of a FAILED trial; ``stopped`` why a PRUNED one stopped early (its
    accuracy then has dev and pre-adaptation PER only, its latency is the prediction).
    """

    number: int
    state: str
    version: int = RECORD_VERSION
    plan: Candidate | None = None
    plan_dict: Mapping[str, Any] = field(default_factory=dict)
    plan_hash: str | None = None
    seed: int | None = None
    baseline: str = ""
    values: tuple[float, ...] | None = None
    constraints: tuple[float, ...] | None = None
    accuracy: AccuracyRecord = field(default_factory=AccuracyRecord)
    latency: LatencyRecord = field(default_factory=LatencyRecord)
    size_mb: float | None = None
    params: int | None = None
    peak_memory_mb: float | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    failure: str | None = None
    stopped: str | None = None
    stop_bound: tuple[float, ...] | None = None  # the objectives' best case that was dominated
    duration_s: float | None = None
    trial_params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE.name and self.values is not None

    @property
    def feasible(self) -> bool:
        """Every constraint <= 0; a trial that records none is feasible (as in Optuna)."""
        return all(c <= 0.0 for c in self.constraints or ())

    def objective(self, name: str) -> float | None:
        if self.values is None:
            return None
        return dict(zip(OBJECTIVES, self.values, strict=False)).get(name)

    def to_attr(self) -> dict[str, Any]:
        """What the objective stores under :data:`RECORD_KEY` (JSON-safe; no constraints,
        state, values or params: Optuna keeps those)."""
        return {
            "version": self.version,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "plan_hash": self.plan_hash,
            "seed": self.seed,
            "accuracy": {
                **dataclasses.asdict(self.accuracy),
                "per_speaker": {k: list(v) for k, v in self.accuracy.per_speaker.items()},
            },
            "latency": dataclasses.asdict(self.latency),
            "size_mb": self.size_mb,
            "params": self.params,
            "peak_memory_mb": self.peak_memory_mb,
            "timings": dict(self.timings),
            "failure": self.failure,
            "stopped": self.stopped,
            "stop_bound": list(self.stop_bound) if self.stop_bound is not None else None,
        }


def _constraints(t: FrozenTrial) -> tuple[float, ...] | None:
    if t.constraints:  # Optuna's own (set_constraint, or constraints_func)
        return tuple(float(v) for v in t.constraints.values())
    legacy = t.user_attrs.get("constraints")  # studies from before set_constraint
    return tuple(float(c) for c in legacy) if legacy is not None else None


def _accuracy(raw: Mapping[str, Any], per_speaker: Any, adaptation: str) -> AccuracyRecord:
    speakers = {
        str(k): (float(v[0]), float(v[1]))
        for k, v in (per_speaker or {}).items()
        if isinstance(v, list | tuple) and len(v) == 2
    }
    acc = AccuracyRecord(**_fields(AccuracyRecord, raw))
    return dataclasses.replace(acc, per_speaker=speakers, adaptation=adaptation)


def _plan(raw: Any, number: int) -> dict[str, Any]:
    from voxfit.errors import ConfigError

    if not isinstance(raw, Mapping):
        return {"plan": None, "plan_dict": {}}
    try:
        plan = Candidate.from_dict(raw, f"trial {number} plan")
    except ConfigError:
        plan = None
    return {"plan": plan, "plan_dict": dict(raw)}


def record_of(t: FrozenTrial) -> TrialRecord:
    """The record of a trial, from the ``record`` attribute or, for a trial written before
    it existed, from the loose attributes of that time. Never raises for missing parts:
    they are None/empty in the record."""
    a = t.user_attrs
    common: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name,
        "baseline": str(a.get("baseline") or ""),
        "values": tuple(t.values) if t.values is not None else None,
        "constraints": _constraints(t),
        "duration_s": t.duration.total_seconds() if t.duration is not None else None,
        "trial_params": dict(t.params),
    }
    raw = a.get(RECORD_KEY)
    raw = raw if isinstance(raw, Mapping) else _legacy(a)
    acc = raw.get("accuracy") or {}
    return TrialRecord(
        **common,
        version=int(raw.get("version", RECORD_VERSION)),
        **_plan(raw.get("plan"), t.number),
        plan_hash=raw.get("plan_hash"),
        seed=raw.get("seed"),
        accuracy=_accuracy(acc, acc.get("per_speaker"), str(acc.get("adaptation", "proxy"))),
        latency=LatencyRecord.from_dict(raw.get("latency") or {}),
        size_mb=raw.get("size_mb"),
        params=raw.get("params"),
        peak_memory_mb=raw.get("peak_memory_mb"),
        timings=dict(raw.get("timings") or {}),
        failure=raw.get("failure"),
        stopped=raw.get("stopped"),
        stop_bound=tuple(raw["stop_bound"]) if raw.get("stop_bound") else None,
    )


def _legacy(a: Mapping[str, Any]) -> dict[str, Any]:
    """The loose user attributes of a trial written before the record (version 0), in the
    record's shape."""
    metrics = a.get("metrics") or {}
    return {
        "version": 0,
        "plan": a.get("plan"),
        "plan_hash": a.get("plan_hash"),
        "seed": a.get("seed"),
        "accuracy": {
            **metrics,
            "per_speaker": a.get("per_speaker"),
            "adaptation": a.get("adaptation", "proxy"),
        },
        "latency": a.get("latency"),
        "size_mb": metrics.get("size_mb"),
        "params": metrics.get("params"),
        "peak_memory_mb": metrics.get("peak_memory_mb"),
        "timings": a.get("timings"),
        "failure": a.get("fail_reason"),
    }
