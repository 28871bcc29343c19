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
