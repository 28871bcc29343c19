"""The shipped tuning database, read-only, under the user's own (TVM side, in the worker).

What the repository ships (``cost_models/<profile>/tuning/``) is an input: it is opened
read-only, checked but never repaired in place, and nothing is committed to it. New tasks'
records (and MetaSchedule's logs) go to the user's database (a folder under the work
folder), which is locked and repaired like any database a run writes. A task is missing
only when neither has it; compilation takes the better record of the two
(MetaSchedule's ``UnionDatabase``). Re-tuning a task the user's database lacks first copies
the shipped best records of it there, so the search starts from them.

Both databases are cached per worker process and re-read only when their files change (a
multi-MB JSON database takes seconds to parse). A compile names the workloads it needs
(``keys``): of a read-only database only those are parsed. MetaSchedule parses every
workload's IR when it opens a JSON database; the shipped x86 one (393 workloads, 31 MB)
took 12.8 s of a fresh worker's first compile of the default Conformer (22 tasks), read by
key 1.4 s (an ad-hoc check, 2026-12-06: ``db_load_s`` of ``compile_model``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from voxfit.compile._database import RECORDS, WORKLOADS, _scan, check, repair
from voxfit.errors import DataError

# Records copied per task when re-tuning starts from the shipped database: more than the
# evolutionary search seeds its population with (a fifth of 128).
SEED_TOP_K = 32
# A seed profile's best schedules of a task measured on the device before any is used there:
# its best on the seed's device need not be the best here (measured: see the README's
# onboarding section).
SEED_MEASURE_K = 3

_CACHE: dict[str, tuple[tuple[int, ...], Any]] = {}


def _signature(db_dir: Path) -> tuple[int, ...]:
    sig: list[int] = []
    for name in (WORKLOADS, RECORDS):
        st = (db_dir / name).stat()
        sig += [st.st_size, st.st_mtime_ns]
    return tuple(sig)


def _cached(db_dir: Path, cache: dict[str, tuple[tuple[int, ...], Any]] = _CACHE) -> Any | None:
    hit = cache.get(str(db_dir.resolve()))
    if hit is None or not (db_dir / WORKLOADS).exists() or not (db_dir / RECORDS).exists():
        return None
    return hit[1] if hit[0] == _signature(db_dir) else None


def _open_user(db_dir: Path) -> tuple[Any, str]:
    """The user's database (the caller holds its lock), repaired and loaded if changed."""
    db = _cached(db_dir)
    if db is not None:
        return db, "cached"
    report = repair(db_dir)
    db = ms.database.JSONDatabase(work_dir=str(db_dir))
    _CACHE[str(db_dir.resolve())] = (_signature(db_dir), db)
    return db, repr(report)


def _torn(db_dir: Path, dropped_workloads: int, dropped_records: int) -> DataError:
    return DataError(
        f"{db_dir}: the shipped tuning database is torn ({dropped_workloads} "
        f"workload and {dropped_records} record lines broken); it is read-only "
        "at run time: restore it (git checkout -- <folder>) or point the profile's "
        "tuning.database_dir at a good copy"
    )


@dataclass
class _ByKey:
    """A read-only database's lines by workload key, parsed into ``db`` (a MetaSchedule
    MemoryDatabase) only for the keys asked for."""

    lines: dict[str, list[tuple[str, list[str]]]]  # key -> [(workload line, record lines)]
    db: Any
    loaded: set[str] = field(default_factory=set)

    def load(self, keys: Iterable[str]) -> Any:
        for key in set(keys) - self.loaded:
            for line, records in self.lines.get(key, ()):
                workload = ms.database.Workload.from_json(json.loads(line))
                self.db.commit_workload(workload.mod)
                for rec in records:
                    # bound to its own line's workload, as MetaSchedule's JSON database does:
                    # lines of one key are equal workloads, but their block names can differ
                    record = ms.database.TuningRecord.from_json(json.loads(rec)[1], workload)
                    self.db.commit_tuning_record(record)
            self.loaded.add(key)
        return self.db


_BY_KEY: dict[str, tuple[tuple[int, ...], _ByKey]] = {}


def _head(line: str) -> Any:
    """The first item of a database line (a workload's ``["<key>", "<its IR>"]``, a
    record's ``[<workload index>, <record>]``), read without parsing the rest."""
    return json.loads(line[: line.index(",")] + "]")[0]


def _by_key(db_dir: Path) -> _ByKey:
    """``db_dir``'s lines by workload key (cached until its files change).

    Raises:
        DataError: the database is torn.
    """
    hit = _cached(db_dir, _BY_KEY)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    sig = _signature(db_dir)  # before reading: a write meanwhile makes the next call re-read
    workloads, records, dropped_w, dropped_r = _scan(db_dir)
    if dropped_w or dropped_r:
        raise _torn(db_dir, dropped_w, dropped_r)
    # complete lines (_scan parsed each): only their heads are read here, the rest when a
    # workload is asked for
    of: list[list[str]] = [[] for _ in workloads]
    for line in records:
        of[int(_head(line))].append(line)
    lines: dict[str, list[tuple[str, list[str]]]] = {}
    for w, recs in zip(workloads, of, strict=True):
        lines.setdefault(str(_head(w)), []).append((w, recs))
    out = _ByKey(lines, ms.database.MemoryDatabase())
    _BY_KEY[str(db_dir.resolve())] = (sig, out)
    return out


def _open_shipped(db_dir: Path, keys: Iterable[str] | None = None) -> Any | None:
    """The shipped database read-only, or None when the folder has none; with ``keys``
    (workload keys: :func:`~voxfit.compile._build.task_keys`) a database holding only those
    workloads' records (the rest of the folder is not parsed).

    Raises:
        DataError: the database is torn (a broken line); it is not rewritten here.
    """
    if not (db_dir / WORKLOADS).exists() or not (db_dir / RECORDS).exists():
        return None
    if keys is not None:
        return _by_key(db_dir).load(keys)
    db = _cached(db_dir)
    if db is not None:
        return db
    report = check(db_dir)
    if report.changed:
        raise _torn(db_dir, report.dropped_workloads, report.dropped_records)
    db = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
    _CACHE[str(db_dir.resolve())] = (_signature(db_dir), db)
    return db


@dataclass(frozen=True, slots=True)
class LayeredDatabase:
    """The user's database over the shipped one (None: nothing shipped for the profile),
    and a seed: another profile's shipped database (``tuning.seed_from``, same ISA family)
    whose schedules serve the tasks this device has no record of yet.

    The seed is a fallback, never compared with this device's records: its run times were
    measured on another device, so a task tuned here always uses its own record."""

    user: Any
    shipped: Any | None
    user_dir: Path
    seed: Any | None = None

    @property
    def layers(self) -> tuple[Any, ...]:
        """This device's own databases (the seed is not one of them)."""
        return (self.user,) if self.shipped is None else (self.user, self.shipped)

    def union(self) -> Any:
        """The database compilation applies: the better record of the device's two for each
        task, else the seed's best."""
        own = self.user if self.shipped is None else ms.database.UnionDatabase(*self.layers)
        return own if self.seed is None else ms.database.OrderedUnionDatabase(own, self.seed)

    def _has(self, dbs: tuple[Any, ...], t: Any, target: tvm.target.Target) -> bool:
        return any(
            db.query_tuning_record(t.dispatched[0], target, t.task_name) is not None for db in dbs
        )

    def missing(self, tasks: list[Any], target: tvm.target.Target) -> list[Any]:
        """The tasks no database has a record of (the seed counts)."""
        layers = self.layers if self.seed is None else (*self.layers, self.seed)
        return [t for t in tasks if not self._has(layers, t, target)]

    def seeded(self, tasks: list[Any], target: tvm.target.Target) -> list[Any]:
        """The tasks only the seed has: compiled with another device's schedules."""
        if self.seed is None:
            return []
        return [
            t
            for t in tasks
            if not self._has(self.layers, t, target) and self._has((self.seed,), t, target)
        ]

    def seed_from_shipped(self, tasks: list[Any], top_k: int = SEED_TOP_K) -> int:
        """Copy the shipped best records of ``tasks`` the user's database has none of into
        it (re-tuning starts from them there). Returns how many records were copied."""
        if self.shipped is None:
            return 0
        copied = 0
        for t in tasks:
            mod = t.dispatched[0]
            # has_workload first: committing a workload the shipped database lacks would
            # append it to the shipped file
            if not self.shipped.has_workload(mod):
                continue
            best = self.shipped.get_top_k(self.shipped.commit_workload(mod), top_k)
            if not best:
                continue
            mine = self.user.commit_workload(mod)
            if self.user.get_top_k(mine, 1):
                continue
            for r in best:
                self.user.commit_tuning_record(
                    ms.database.TuningRecord(r.trace, mine, r.run_secs, r.target, r.args_info)
                )
            copied += len(best)
        return copied

    def committed(self) -> None:
        """Records went to the user's files through this very object: it is current."""
        _CACHE[str(self.user_dir.resolve())] = (_signature(self.user_dir), self.user)


def open_layered(
    user_dir: Path,
    shipped_dir: Path | None,
    seed_dir: Path | None = None,
    keys: Iterable[str] | None = None,
) -> tuple[LayeredDatabase, str]:
    """The user's database (the caller holds its lock) over the shipped one, and the seed
    profile's shipped database (read-only like the shipped one; absent files: no seed).
    ``keys``: the workload keys the caller will ask about; the read-only databases then
    hold only those (None: all of theirs).

    ``shipped_dir`` the same folder as ``user_dir`` makes one writable database (for a
    maintainer growing the shipped records on purpose). Returns the databases and what the
    user database's repair found (``"cached"`` when it was not re-read).

    Raises:
        DataError: the shipped database is torn.
    """
    user, report = _open_user(user_dir)
    shipped = None
    if shipped_dir is not None and shipped_dir.resolve() != user_dir.resolve():
        shipped = _open_shipped(shipped_dir, keys)
    seed = _open_shipped(seed_dir, keys) if seed_dir is not None else None
    return LayeredDatabase(user, shipped, user_dir, seed), report
