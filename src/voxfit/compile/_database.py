"""The persistent, per-profile MetaSchedule tuning database: crash-safe and locked.

MetaSchedule's JSON database is two append-only files: ``database_workload.json`` (one
``[hash, workload]`` line per distinct fused task) and ``database_tuning_record.json`` (one
``[workload_index, record]`` line per measured schedule). Every measured batch is appended
as it finishes, so a killed tuning run keeps all batches before the kill — but the kill can
leave a half-written last line, which MetaSchedule refuses to load. :func:`repair` keeps
every complete line, drops a torn tail (and records pointing past the surviving
workloads), and rewrites the files atomically. :func:`locked` serializes tuning processes
sharing one profile's database. This module is plain Python (no TVM import).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What :func:`repair` found: complete lines kept and broken lines dropped."""

    workloads: int
    records: int
    dropped_workloads: int
    dropped_records: int

    @property
    def changed(self) -> bool:
        return bool(self.dropped_workloads or self.dropped_records)


def _complete_lines(path: Path) -> tuple[list[str], int]:
    """Lines that parse as JSON lists, up to the first broken one; and how many were dropped."""
    if not path.exists():
        return [], 0
    raw = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    good: list[str] = []
    for i, line in enumerate(raw):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return good, len([x for x in raw[i:] if x.strip()])
        if not isinstance(value, list) or len(value) != 2:
            return good, len([x for x in raw[i:] if x.strip()])
        good.append(line)
    return good, 0


def _write_atomic(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        f.write("".join(x + "\n" for x in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _scan(d: Path) -> tuple[list[str], list[str], int, int]:
    """Complete workload lines, records that point at them, and how many lines are broken."""
    workloads, dropped_w = _complete_lines(d / WORKLOADS)
    records, dropped_r = _complete_lines(d / RECORDS)
    kept = [r for r in records if 0 <= int(json.loads(r)[0]) < len(workloads)]
    return workloads, kept, dropped_w, dropped_r + len(records) - len(kept)


def check(db_dir: str | Path) -> RepairReport:
    """What :func:`repair` would find in ``db_dir``, without writing anything.

    For a database that is read-only at run time (the shipped one): a torn one is reported
    (``changed``), never rewritten in place. A missing folder or file counts as empty.
    """
    workloads, kept, dropped_w, dropped_r = _scan(Path(db_dir))
    return RepairReport(len(workloads), len(kept), dropped_w, dropped_r)


def repair(db_dir: str | Path) -> RepairReport:
    """Make ``db_dir``'s database loadable after a crash, keeping every complete record.

    Creates the folder and empty files when absent. Safe to run on a healthy database
    (it changes nothing then).
    """
    d = Path(db_dir)
    d.mkdir(parents=True, exist_ok=True)
    wl_path, rec_path = d / WORKLOADS, d / RECORDS
    workloads, kept, dropped_w, dropped_r = _scan(d)
    if dropped_w or not wl_path.exists():
        _write_atomic(wl_path, workloads)
    if dropped_r or not rec_path.exists():
        _write_atomic(rec_path, kept)
    return RepairReport(len(workloads), len(kept), dropped_w, dropped_r)


@contextmanager
def locked(db_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``db_dir`` (blocks while another process tunes into it)."""
    d = Path(db_dir)
    d.mkdir(parents=True, exist_ok=True)
    with (d / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True, slots=True)
class PublishReport:
    """What :func:`publish` added to a shipped database."""

    workloads_added: int
    records_added: int
    already_there: int  # tasks the target database had records of: left as they were
    improved: int = 0  # of those, tasks given faster records (``improve``)


def _mean_secs(record_line: str) -> float:
    """A record line's mean run time; failed runs (MetaSchedule writes 1e10) sort last."""
    secs = json.loads(record_line)[1][1]
    ok = [float(s) for s in secs if float(s) < 1e9]
    return sum(ok) / len(ok) if ok and len(ok) == len(secs) else float("inf")


def publish(
    user_dir: str | Path, into: str | Path, top_k: int = 4, *, improve: bool = False
) -> PublishReport:
    """Copy the best ``top_k`` records of every task ``user_dir``'s database tuned that
    ``into``'s database has no record of (e.g. a work folder's tuning into the repository's
    ``cost_models/<profile>/tuning``, so a fresh checkout compiles those tasks warm).
    ``improve``: also add, for tasks ``into`` has, the records that run faster than its
    best one (at most ``top_k``; e.g. a longer tuning of tasks shipped from a short one --
    compilation takes the fastest record of a task).

    Both databases keep MetaSchedule's format (a workload line is copied as it is; records
    are re-indexed); ``into`` is rewritten atomically, ``user_dir`` is read under its lock.
    Records whose every run failed are not copied.

    Raises:
        ValueError: ``top_k`` < 1, or ``into``'s database is torn.
    """
    if top_k < 1:
        raise ValueError(f"top_k: {top_k} must be >= 1")
    dst = Path(into)
    have_w, have_r, dropped_w, dropped_r = _scan(dst)
    if dropped_w or dropped_r:
        raise ValueError(f"{dst}: the tuning database is torn; repair or restore it first")
    with locked(user_dir) as src:
        workloads, records, _, _ = _scan(src)
    dst.mkdir(parents=True, exist_ok=True)
    index = {line: i for i, line in enumerate(have_w)}
    have_best: dict[int, float] = {}
    for r in have_r:
        task = int(json.loads(r)[0])
        have_best[task] = min(have_best.get(task, float("inf")), _mean_secs(r))
    covered = set(have_best)
    by_task: dict[int, list[str]] = {}
    for r in records:
        by_task.setdefault(int(json.loads(r)[0]), []).append(r)
    new_w, new_r = list(have_w), list(have_r)
    added_w = added_r = there = improved = 0
    for i, lines in sorted(by_task.items()):
        best = sorted((r for r in lines if _mean_secs(r) < float("inf")), key=_mean_secs)
        if not best:
            continue
        j = index.get(workloads[i])
        if j is not None and j in covered:
            there += 1
            if not improve:
                continue
            best = [r for r in best if _mean_secs(r) < have_best[j]]
            if not best:
                continue
            improved += 1
        if j is None:
            j = index[workloads[i]] = len(new_w)
            new_w.append(workloads[i])
            added_w += 1
        for r in best[:top_k]:
            new_r.append(json.dumps([j, json.loads(r)[1]], separators=(",", ":")))
            added_r += 1
    if added_w or added_r:
        _write_atomic(dst / WORKLOADS, new_w)
        _write_atomic(dst / RECORDS, new_r)
    return PublishReport(added_w, added_r, there, improved)
