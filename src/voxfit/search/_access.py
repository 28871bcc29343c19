"""Study access: open a storage, pick a study, read its trials' records, the one front.

Everything that reviews a study (the report, bundles, the CLI, the notebook, benchmarks)
comes through here, so there is one rule for which study a storage name means, one
feasibility rule (:attr:`TrialRecord.feasible`: every constraint <= 0, a trial without
constraints is feasible, as Optuna has it) and one front (:func:`front`).
"""

from __future__ import annotations

import datetime
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile
from voxfit.search._record import OBJECTIVES, TrialRecord, record_of

__all__ = [
    "front",
    "front_table",
    "load_study",
    "open_storage",
    "profile_of",
    "records",
    "study_frame",
]


def open_storage(
    url: str, grace_s: int = 90, heartbeat_s: int = 30
) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so trials of a killed process get failed and retried.

    A trial whose heartbeat (every ``heartbeat_s``) is older than ``grace_s`` is failed by
    the next process that starts a trial and retried once (a copy queued as WAITING).
    ``postgresql://`` URLs are read with Psycopg 3 (:func:`sqlalchemy_url`).

    Raises:
        ConfigError: the storage cannot be opened (the URL, its password hidden, and why).
    """
    from voxfit.search._audit import redact_url
    from voxfit.search._postgres import sqlalchemy_url

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                sqlalchemy_url(url),
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                ),
            )
    except Exception as e:  # noqa: BLE001 - sqlalchemy raises many kinds
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise ConfigError(f"--storage {redact_url(url)}: cannot open ({redact_url(why)})") from e


def load_study(storage: str, study_name: str | None = None) -> optuna.Study:
    """Open a study of ``storage`` for review.

    Args:
        storage: an Optuna storage URL, e.g. ``sqlite:///work/search/voxfit.db`` (a relative
            SQLite path is relative to the working directory).
        study_name: the study to open; ``None`` = the study whose first trial started last
            (a study without trials counts as the oldest).

    Raises:
        ConfigError: the SQLite file does not exist (Optuna would silently create an empty
            one), the storage holds no study, or ``study_name`` is not one of them.
    """
    if storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///"))
        if str(path) != ":memory:" and not path.exists():
            raise ConfigError(
                f"--storage: no study storage at {path.resolve()} (from {storage!r}); "
                f"relative SQLite paths are relative to the working directory {Path.cwd()}"
            )
    st = open_storage(storage)
    summaries = optuna.get_all_study_summaries(st, include_best_trial=False)
    names = [s.study_name for s in summaries]
    if not names:
        raise ConfigError(f"--storage {storage}: holds no study (run voxfit search)")
    if study_name is None:
        oldest = datetime.datetime.min
        order = sorted(
            enumerate(summaries), key=lambda ix: (ix[1].datetime_start or oldest, ix[0])
        )
        study_name = order[-1][1].study_name
    elif study_name not in names:
        raise ConfigError(
            f"--study: no study {study_name!r} in {storage} (have: {', '.join(names)})"
        )
    return optuna.load_study(study_name=study_name, storage=st)


def profile_of(study: optuna.Study) -> HardwareProfile:
    """The hardware profile the study was made for (as recorded when it began).

    Raises:
        ConfigError: the study records no profile, or one this voxfit cannot load.
    """
    from voxfit.hw_profiles import profile_from_dict

    raw = study.user_attrs.get("profile")
    if not isinstance(raw, dict):
        raise ConfigError(f"study {study.study_name!r}: no profile recorded")
    return profile_from_dict(dict(raw), f"study {study.study_name} profile")


def records(study: optuna.Study, states: Sequence[TrialState] | None = None) -> list[TrialRecord]:
    """The records of the study's trials (of ``states``; all when None), by number."""
    trials = study.get_trials(deepcopy=False, states=tuple(states) if states else None)
    return [record_of(t) for t in trials]


def complete(study: optuna.Study) -> list[TrialRecord]:
    """The COMPLETE trials with one value per objective."""
    return [
        r
        for r in records(study, (TrialState.COMPLETE,))
        if r.values is not None and len(r.values) == len(OBJECTIVES)
    ]


def front(recs: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The non-dominated records among the complete feasible ones (the study's front)."""
    from voxfit.latency import dominates

    ok = [r for r in recs if r.complete and r.feasible]
    return [
        r
        for r in ok
        if not any(dominates(o.values, r.values) for o in ok if o is not r)  # type: ignore[arg-type]
    ]


def check_objectives(study: optuna.Study) -> None:
    """Raises ConfigError when the study optimizes other objectives than this version."""
    names = study.user_attrs.get("objectives")
    if names is not None and tuple(names) != OBJECTIVES:
        raise ConfigError(
            f"study {study.study_name!r} optimizes {list(names)}; this version reads "
            f"{list(OBJECTIVES)}"
        )


def natural(name: str) -> list[Any]:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


# fmt: off
FRAME_COLUMNS = [
    "number", *OBJECTIVES, "feasible", "on_front", "baseline", "latency_source",
    "latency_basis", "predicted_ms", "measured_ms", "measured_ref_ms", "low_confidence",
    "peak_memory_mb", "pre_adapt_per", "plan_hash", "duration_s",
]
# fmt: on


def study_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per COMPLETE trial, ordered by trial number.

    Columns: ``number``, the objectives (``latency_ms``, ``post_adapt_per``, ``dev_per``,
    ``size_mb``), ``feasible`` (every constraint <= 0), ``on_front`` (:func:`front`),
    ``baseline`` (``""`` for searched trials), ``latency_source`` (measured/predicted),
    ``latency_basis`` (reference/base/raw), ``predicted_ms``, ``measured_ms`` (raw median),
    ``measured_ref_ms`` (at the basis's speed), ``low_confidence``,
    ``peak_memory_mb``, ``pre_adapt_per``, ``plan_hash``, ``duration_s``, then every trial
    parameter under its own name (``keep:<group>``, ``wbits:<layer>``, ...). Missing
    attributes are NaN/None, never errors.

    Raises:
        ConfigError: the study records objectives other than :data:`OBJECTIVES`.
    """
    check_objectives(study)
    recs = complete(study)
    on_front = {r.number for r in front(recs)}
    rows = []
    params: dict[str, None] = {}
    for r in recs:
        lat = r.latency
        row: dict[str, Any] = {
            "number": r.number,
            **dict(zip(OBJECTIVES, r.values or (), strict=True)),
            "feasible": r.feasible,
            "on_front": r.number in on_front,
            "baseline": r.baseline,
            "latency_source": lat.source if lat.objective_ms is not None else None,
            "latency_basis": lat.basis if lat.objective_ms is not None else None,
            "predicted_ms": lat.predicted_ms,
            "measured_ms": lat.measured_ms,
            "measured_ref_ms": lat.measured_ref_ms,
            "low_confidence": lat.low_confidence,
            "peak_memory_mb": r.peak_memory_mb,
            "pre_adapt_per": r.accuracy.pre_adapt_per,
            "plan_hash": r.plan_hash,
            "duration_s": r.duration_s,
        }
        row.update(r.trial_params)
        params.update(dict.fromkeys(r.trial_params))
        rows.append(row)
    columns = FRAME_COLUMNS + sorted(params, key=natural)
    frame = pd.DataFrame(rows, columns=columns)
    # Explicit dtypes so that an empty frame still filters (an object column of no rows
    # would be read as a list of column labels) and missing numbers are NaN.
    floats = [*OBJECTIVES, "predicted_ms", "measured_ms", "measured_ref_ms", "peak_memory_mb"]
    return frame.astype(
        {"number": int, "feasible": bool, "on_front": bool, **dict.fromkeys(floats, float)}
    )


def front_table(study: optuna.Study) -> list[dict[str, Any]]:
    """The front as printable rows, fastest first.

    Keys: ``trial``, ``latency_ms``, ``latency_source``, ``dev_per``, ``post_adapt_per``,
    ``size_mb``, ``baseline`` (``""`` for searched trials), ``vs_peer`` (the point's
    speed-up over the study's peer, :func:`peer_latency_ms`; None when not measured). Empty
    when no feasible trial completed.
    """
    f = study_frame(study)
    f = f[f["on_front"]].sort_values(["latency_ms", "number"])
    peer = peer_latency_ms(study)
    return [
        {
            "trial": int(r.number),
            "latency_ms": float(r.latency_ms),
            "latency_source": r.latency_source,
            "dev_per": float(r.dev_per),
            "post_adapt_per": float(r.post_adapt_per),
            "size_mb": None if pd.isna(r.size_mb) else float(r.size_mb),
            "baseline": r.baseline,
            "vs_peer": peer / float(r.latency_ms) if peer and r.latency_ms > 0 else None,
        }
        for r in f.itertuples()
    ]


def peer_latency_ms(study: optuna.Study) -> float | None:
    """The peer's latency (onnxruntime's static int8 of the base, ``voxfit.search``'s
    ``measure_peer``) on the study's latency scale: the base's latency objective times the
    peer / TVM-base ratio measured back to back. None until both are known."""
    peer, base = study.user_attrs.get("peer"), study.user_attrs.get("base")
    if not peer or not base or not base.get("latency_ms"):
        return None
    return float(base["latency_ms"]) * float(peer["ratio_to_tvm_base"])


def spread(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most ``n`` of ``rows`` (a front, fastest first), evenly spaced along it: the
    fastest and the slowest always, the rest at even steps between them.

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"n: {n} must be >= 1")
    if len(rows) <= n:
        return list(rows)
    if n == 1:
        return [rows[0]]
    picks = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in picks]
