"""This host's kernel table for a profile whose model was fitted on another host.

A local profile (``x86-avx2-2core``) run on another machine of its kind runs the same
schedules (the shipped tuning database's) at other speeds, and not by one factor: on a Zen 2
host the shipped model put 69% of fresh candidates within +-10%, and calibrated to a new host
from 20 measurements by per-kernel-kind scales (the transfer model) 50% on Zen 4. What
changed is each kernel's time, so measure that: time here the schedule the profile's
databases pick for each of their workloads (a few minutes, no tuning: MetaSchedule's
builder and runner on each database record), keep the times as a tuning database of this
host's (``<work>/host-kernels/<profile>/<host key>/``), and predict a candidate as the sum of
its kernels' times here, ``c0 + scale * sum w_k t_k`` (:mod:`voxfit.cost_models._kernels`),
with ``c0`` and ``scale`` fitted on the few whole-model measurements a search makes anyway
(:class:`~voxfit.cost_models._estimator.KernelPredictor`). ``voxfit device time-kernels``
makes the table; a search on this host uses it when it exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from voxfit.errors import DataError
from voxfit.hw_profiles import HardwareProfile, HostInfo, describe_host

#: workloads timed per worker call (a progress step; a killed run loses at most one)
BATCH = 32
#: timed repeats of each schedule (MetaSchedule's runner: each at least 100 ms of runs); the
#: table takes their median. One repeat is not enough: a kernel of 0.01 ms measured 0.32 ms
#: once on this 2-core VM (32x: a TVM thread descheduled mid-repeat) and skewed 3 of 40
#: candidates' predictions by 17-26%; re-timed three times it measured 0.010 ms each time.
REPEAT = 3


def host_kernels_dir(
    profile: HardwareProfile, work: str | Path, host: HostInfo | None = None
) -> Path:
    """Where this host's (or ``host``'s) kernel table of ``profile`` lives under ``work``."""
    return Path(work) / "host-kernels" / profile.name / (host or describe_host()).key


def host_table(
    profile: HardwareProfile, work: str | Path, host: HostInfo | None = None
) -> dict[str, float] | None:
    """This host's kernel times of ``profile`` (ms by workload key), or None where
    ``voxfit device time-kernels`` has not timed any here.

    Raises:
        DataError: the table's database is torn (``voxfit device time-kernels`` repairs it).
    """
    from voxfit.compile._database import RECORDS
    from voxfit.cost_models._kernels import database_kernels

    d = host_kernels_dir(profile, work, host)
    if not (d / RECORDS).exists():
        return None
    try:
        table = database_kernels(d, median=True)
    except DataError as e:
        raise DataError(
            f"{e}: `voxfit device time-kernels {profile.name} --work {work}` writes this "
            "host's kernel table"
        ) from None
    return table or None


@dataclass
class TimedHere:
    """What :func:`time_kernels_here` did."""

    directory: Path
    total: int = 0  # workloads in the profile's databases
    timed: int = 0  # timed by this run
    skipped: int = 0  # timed by an earlier run
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def time_kernels_here(
    profile: HardwareProfile,
    *,
    work: str | Path,
    cost_models_dir: str | Path = "cost_models",
    tuning_dir: str | Path | None = None,
    batch: int = BATCH,
) -> TimedHere:
    """Time on this host the schedule the profile's databases (the shipped one and the
    user's, ``tuning_dir``, default the work folder's) pick for each of their workloads, into
    :func:`host_kernels_dir`. Resumable: workloads timed before are skipped.

    Raises:
        ConfigError: the profile is not measured on this machine (an RPC or GPU device:
            onboarding times its kernels on the device instead).
        DataError: the profile has no tuning records at all, or the worker failed.
    """
    from voxfit._progress import progress_bar
    from voxfit.compile import TvmWorker, default_tuning_dir, runner_spec
    from voxfit.errors import ConfigError

    if profile.measurement.method != "local":
        raise ConfigError(
            f"{profile.source or profile.name}: measurement.method: {profile.measurement.method}"
            ": time-kernels times a local profile on this host (onboard an RPC device instead)"
        )
    out = host_kernels_dir(profile, work)
    user = Path(tuning_dir) if tuning_dir is not None else default_tuning_dir(work, profile)
    user.mkdir(parents=True, exist_ok=True)
    shipped = profile.database_dir(cost_models_dir)
    res = TimedHere(out)
    t0 = time.monotonic()
    req = dict(
        profile=profile.to_dict(), db_dir=str(user.resolve()),
        shipped_db_dir=str(shipped.resolve()), out_dir=str(out.resolve()),
        runner={**runner_spec(profile).to_dict(), "repeat": REPEAT},
    )  # fmt: skip
    with TvmWorker(profile.cores) as w, progress_bar(info=True) as bar:
        task = bar.add_task(f"timing {profile.name}'s kernels here", total=None, info="")
        start = 0
        while True:
            r = w.call("time_here", timeout_s=None, start=start, count=batch, **req)
            if "error" in r:
                raise DataError(f"timing kernels into {out}: {r['error']}")
            res.total = int(r["total"])
            res.timed += int(r["timed"])
            res.skipped += int(r["skipped"])
            res.errors += list(r["errors"])
            start += batch
            bar.update(task, total=res.total, completed=min(start, res.total),
                       info=f"{res.timed} timed, {len(res.errors)} not")  # fmt: skip
            if start >= res.total:
                break
    if res.total == 0:
        raise DataError(
            f"{profile.name}: no tuning records in {shipped} or {user}: nothing to time "
            "(tune or search first)"
        )
    res.seconds = time.monotonic() - t0
    if res.timed:
        _log_run(out, res)
    return res


TIMED_FILE = "timed.json"


def _log_run(out: Path, res: TimedHere) -> None:
    """Append what this run timed (and how long it took, on which host) to the table's
    ``timed.json``."""
    import json
    from datetime import UTC, datetime

    f = out / TIMED_FILE
    try:
        runs = json.loads(f.read_text())["runs"] if f.exists() else []
    except (ValueError, KeyError, TypeError):
        runs = []
    runs.append(
        {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": describe_host().as_dict(),
            "timed": res.timed,
            "not_timed": len(res.errors),
            "seconds": res.seconds,
        }
    )
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1))
    tmp.replace(f)


def timed_seconds(profile: HardwareProfile, work: str | Path) -> float | None:
    """The seconds the runs that made this host's table spent timing (None: not recorded)."""
    import json

    f = host_kernels_dir(profile, work) / TIMED_FILE
    try:
        return float(sum(r["seconds"] for r in json.loads(f.read_text())["runs"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
