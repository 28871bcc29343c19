"""Search workers: any number of processes, on any hosts, finishing one study together.

A study is made by ``voxfit search`` (or :func:`~voxfit.search.prepare_study`), which also
records its trial budget (``n_trials``); ``voxfit worker`` (:func:`run_worker`) joins it from
the storage alone: profile, space, sampler, corpus and base checkpoint are read from the
study's attributes. Every worker runs trials until the budget is met with nothing in flight.

How the budget is counted (:func:`count_budget`). A *logical trial* is one candidate
evaluation: a trial and the copies that retried it (Optuna's retry keeps the original
number first in ``retry_history``); its state is the state of its latest attempt. A worker
starts a trial only while ``done + running < n_trials`` or a trial is queued (WAITING: a
baseline, a retry); a fresh trial (not a queued one) whose logical trials before it already
fill the budget is pruned at once (``over_budget``, PRUNED states never count). Overshoot
is thus bounded by the trials created in the same instant by workers that could not see
each other's uncommitted insert -- in practice none.

Killed workers (``kill -9``, a lost host): each trial keeps a heartbeat in the storage; a
trial whose heartbeat is older than the grace period is failed by the next worker that
looks and queued again once (``RetryHeartbeatStaleTrialCallback(max_retry=1)``; only the
worker that wins the RUNNING -> FAIL update queues the copy, so a retry is never queued
twice). A worker whose budget is met keeps polling while other workers' trials run, so a
trial of a worker killed last is still retried: no trial is lost while one worker lives.

What workers write besides the study: measurements for the cost model (one file per
candidate, :class:`~voxfit.cost_models.MeasurementStore`), the TVM tuning database (locked
per profile, :func:`voxfit.compile.locked`), build caches (unique temporary names), the
audit log (appends under a lock) -- each safe for concurrent writers on one host's ``work``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from voxfit.errors import ConfigError
from voxfit.search._record import FINISHED_STATES, OVER_BUDGET_KEY

log = logging.getLogger(__name__)

__all__ = [
    "BudgetCount",
    "WorkerReport",
    "count_budget",
    "logical_trials",
    "record_budget",
    "run_worker",
    "work_until_budget",
]

BUDGET_KEY = "n_trials"
Objective = Callable[[optuna.Trial], Any]


def _origin(t: FrozenTrial) -> int:
    """The number of the first attempt of ``t``'s logical trial."""
    history = t.system_attrs.get("retry_history") or []
    return int(history[0]) if history else t.number


def logical_trials(trials: Sequence[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    """Attempts per logical trial (keyed by the first attempt's number), oldest first;
    trials pruned as over budget are left out."""
    out: dict[int, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state == TrialState.PRUNED and t.user_attrs.get(OVER_BUDGET_KEY):
            continue
        out.setdefault(_origin(t), []).append(t)
    return out


@dataclass(frozen=True, slots=True)
class BudgetCount:
    """Logical trials of a study by the state of their latest attempt."""

    budget: int
    done: int  # COMPLETE, FAIL (an objective error, or a retry that also died), or PRUNED
    # (stopped early)
    running: int
    waiting: int
    complete: int = 0
    retried: int = 0  # logical trials with more than one attempt
    duplicated: int = 0  # logical trials with more than one COMPLETE attempt

    @property
    def met(self) -> bool:
        """The budget is met and nothing is in flight or queued."""
        return self.done >= self.budget and not self.running and not self.waiting

    @property
    def may_start(self) -> bool:
        return self.waiting > 0 or self.done + self.running < self.budget


def count_budget(study: optuna.Study, budget: int) -> BudgetCount:
    """Count ``study``'s logical trials against ``budget`` (one storage read)."""
    groups = logical_trials(study.get_trials(deepcopy=False))
    last = [g[-1].state for g in groups.values()]
    return BudgetCount(
        budget=budget,
        done=sum(s in FINISHED_STATES for s in last),
        running=sum(s == TrialState.RUNNING for s in last),
        waiting=sum(s == TrialState.WAITING for s in last),
        complete=sum(s == TrialState.COMPLETE for s in last),
        retried=sum(len(g) > 1 for g in groups.values()),
        duplicated=sum(
            sum(t.state == TrialState.COMPLETE for t in g) > 1 for g in groups.values()
        ),
    )


def _over_budget(trial: optuna.Trial, budget: int) -> bool:
    """Whether a fresh trial comes after the budget is full: the logical trials that began
    before it (lower first-attempt number; for an equal number, a lower storage id) and are
    not pruned already number ``budget``. Queued trials (baselines, retries) always run."""
    frozen = trial.study._storage.get_trial(trial._trial_id)
    if "fixed_params" in frozen.system_attrs or "failed_trial" in frozen.system_attrs:
        return False
    # PRUNED: stopped early (over-budget ones are not in the groups)
    counted = (*FINISHED_STATES, TrialState.RUNNING, TrialState.WAITING)
    mine = (trial.number, trial._trial_id)
    groups = logical_trials(trial.study.get_trials(deepcopy=False)).items()
    before = sum(
        (origin, g[0]._trial_id) < mine and g[-1].state in counted for origin, g in groups
    )
    return before >= budget


def record_budget(study: optuna.Study, n_trials: int | None) -> int:
    """The study's trial budget: ``n_trials`` (recorded when given, so later workers read
    it) or the recorded one.

    Raises:
        ConfigError: neither given nor recorded.
    """
    if n_trials is not None:
        if study.user_attrs.get(BUDGET_KEY) != n_trials:
            study.set_user_attr(BUDGET_KEY, int(n_trials))
        return int(n_trials)
    recorded = study.user_attrs.get(BUDGET_KEY)
    if not isinstance(recorded, int):
        raise ConfigError(
            f"study {study.study_name!r} records no trial budget (n_trials): pass --trials N"
        )
    return recorded


@dataclass
class WorkerReport:
    """What one worker did: trial numbers it ran, by outcome, and how it ended."""

    worker: str
    budget: int
    completed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    retries_run: list[int] = field(default_factory=list)  # retried trials it ran
    over_budget: list[int] = field(default_factory=list)
    stopped_early: list[int] = field(default_factory=list)  # PRUNED before adaptation
    waited_s: float = 0.0
    final: BudgetCount | None = None
    stopped: str = ""  # "budget met", "timeout"

    @property
    def ran(self) -> int:
        return len(self.completed) + len(self.stopped_early) + len(self.failed)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def work_until_budget(
    study: optuna.Study,
    objective: Objective,
    budget: int,
    *,
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    on_wait: Callable[[BudgetCount], None] | None = None,
) -> WorkerReport:
    """Run ``objective`` in trials of ``study`` until :attr:`BudgetCount.met`.

    Each trial runs through ``study.optimize`` (heartbeats, stale-trial retry, exceptions
    recorded as FAIL). While the budget is full but others' trials run, the worker polls
    every ``poll_s`` (failing stale trials, so their retries are run here).

    Args:
        study: loaded from an RDB storage with heartbeats (``open_storage``).
        objective: Optuna objective; it may raise (a FAIL trial).
        budget: logical trials the study should finish.
        timeout_s: stop starting trials after this long (None: no limit).
        on_trial: called after each trial this worker ran (not over-budget ones).
        on_wait: called on each poll while waiting for others' trials.
    """
    from optuna.storages import fail_stale_trials

    me = worker_id()
    report = WorkerReport(me, budget)
    t0 = time.monotonic()

    def guarded(trial: optuna.Trial) -> Any:
        trial.set_user_attr("worker", me)  # every trial says who ran it, over-budget ones too
        if _over_budget(trial, budget):
            trial.set_user_attr(OVER_BUDGET_KEY, True)
            raise optuna.TrialPruned(f"over the study's budget of {budget} trials")
        return objective(trial)

    def after(st: optuna.Study, t: FrozenTrial) -> None:
        if t.state == TrialState.PRUNED and t.user_attrs.get(OVER_BUDGET_KEY):
            report.over_budget.append(t.number)
            return
        if t.state == TrialState.COMPLETE:
            report.completed.append(t.number)
        elif t.state == TrialState.PRUNED:
            report.stopped_early.append(t.number)
        else:
            report.failed.append(t.number)
        if t.system_attrs.get("failed_trial") is not None:
            report.retries_run.append(t.number)
        if on_trial is not None:
            on_trial(st, t)

    while True:
        with warnings.catch_warnings():  # experimental since Optuna 2.9; what optimize calls
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        c = count_budget(study, budget)
        if c.met:
            report.stopped = "budget met"
            break
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            report.stopped = "timeout"
            break
        if not c.may_start:
            if on_wait is not None:
                on_wait(c)
            time.sleep(poll_s)
            report.waited_s += poll_s
            continue
        study.optimize(guarded, n_trials=1, catch=(Exception,), callbacks=[after])
    report.final = count_budget(study, budget)
    return report


def _salted_sampler(study: optuna.Study, sampler: str, seed: int) -> None:
    """A sampler for this worker: seeded from the study's seed, its trial count and this
    worker's id, so workers that start together do not draw the same candidates."""
    from voxfit.search._study import make_sampler

    n = len(study.get_trials(deepcopy=False))
    salt = zlib.crc32(worker_id().encode()) % 1_000_003
    study.sampler = make_sampler(sampler, seed + 7919 * n + salt)


def run_worker(
    storage: str,
    study_name: str,
    *,
    work: Path = Path("work"),
    cost_models_dir: Path = Path("cost_models"),
    cost_model: Path | None = None,
    n_trials: int | None = None,
    margin: float | None = None,
    timeout_s: float | None = None,
    threads: int | None = 1,
    grace_s: int = 90,
    heartbeat_s: int = 30,
    poll_s: float | None = None,
    on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> WorkerReport:
    """Join ``study_name`` in ``storage`` and run its trials until its budget is met.

    Everything a trial needs is read from the study (recorded when it was made): the
    profile, the space's choices, sampler and seed, corpus manifest and base checkpoint
    (paths: a worker on another host needs them at the same paths, e.g. a shared disk).
    ``work`` holds what this worker writes (builds, tuning records, measurements, audit).

    Args:
        n_trials: the budget; recorded in the study when given, else the recorded one.
        margin: promote a prediction within this of the front (None: the study's, 0.10).
        threads: torch threads of this process (None: torch's default). TVM's threads are
            the profile's cores (they define the latency measured).
        grace_s / heartbeat_s: a trial without a heartbeat for ``grace_s`` is failed and
            retried once.
        poll_s: how often a worker with nothing to start looks again (default: the
            heartbeat interval).

    Raises:
        ConfigError: the storage cannot be opened, has no such study, or the study lacks
            what a worker needs (budget, profile, space, checkpoint).
    """
    import torch

    from voxfit.search._access import open_storage, profile_of
    from voxfit.search._audit import AuditLog, redact_url
    from voxfit.search._context import SearchContext
    from voxfit.search._early import EarlyStop
    from voxfit.search._study import (
        DEFAULT_SAMPLER,
        SearchSettings,
        for_base,
        make_latency,
        make_objective,
        resume_scale,
        space_change,
    )
    from voxfit.spaces import space_from_dict

    if threads is not None:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = open_storage(storage, grace_s=grace_s, heartbeat_s=heartbeat_s)
    names = [s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)]
    if study_name not in names:
        raise ConfigError(
            f"--study: no study {study_name!r} in {redact_url(storage)} "
            f"(have: {', '.join(names) or 'none'}; make one with voxfit search)"
        )
    study = optuna.load_study(study_name=study_name, storage=st)
    budget = record_budget(study, n_trials)
    attrs = study.user_attrs
    profile = profile_of(study)
    if not isinstance(attrs.get("space_choices"), dict):
        raise ConfigError(f"study {study_name!r}: no space recorded (made by an older voxfit?)")
    space = space_from_dict(dict(attrs["space_choices"]), f"study {study_name} space")
    changed = space_change(attrs, space)
    if changed:
        raise ConfigError(f"study {study_name!r}: its recorded space does not match ({changed})")
    ctx = SearchContext.of_study(study, work)
    settings = SearchSettings(
        profile=profile,
        space=space.bind(ctx.base.structure()),  # type: ignore[operator]
        storage=storage,
        study_name=study_name,
        n_trials=budget,
        timeout_s=timeout_s,
        sampler=str(attrs.get("sampler", DEFAULT_SAMPLER)),
        seed=int(attrs.get("seed", 0)),
        margin=float(margin if margin is not None else attrs.get("margin", 0.10)),
        early_stop=EarlyStop(**attrs["early_stop"]) if attrs.get("early_stop") else None,
        work=work,
        cost_models_dir=cost_models_dir,
        cost_model=cost_model,
        enqueue_baselines=False,
    )
    settings = for_base(settings, ctx)
    _salted_sampler(study, settings.sampler, settings.seed)
    audit = AuditLog.of_study(work, study_name)
    audit.search_started(study, ctx, storage)
    latency = make_latency(settings, ctx.base)
    resume_scale(study, latency)
    objective = make_objective(ctx, settings, latency)

    def finished(s: optuna.Study, t: FrozenTrial) -> None:
        audit.trial_finished(t, ctx)
        if on_trial is not None:
            on_trial(s, t)

    try:
        return work_until_budget(
            study,
            objective,
            budget,
            poll_s=float(poll_s if poll_s is not None else heartbeat_s),
            timeout_s=timeout_s,
            on_trial=finished,
        )
    finally:
        latency.close()
