"""Concurrent writers to one tuning database: ``locked`` is a real inter-process lock.

MetaSchedule's JSON database refers to a workload by its line number, so two processes
appending without the lock would point records at each other's workloads. Writers here do
what a tuning run does under the lock (repair, read the workloads, append a workload and
records that refer to it by index) from separate processes, at the same time.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

from voxfit.compile import check, locked, repair
from voxfit.compile._database import RECORDS, WORKLOADS


def _writer(db: str, name: str, rounds: int) -> None:
    for i in range(rounds):
        with locked(db) as d:
            repair(d)
            index = len((d / WORKLOADS).read_text().splitlines())
            time.sleep(0.002)  # widen the window a missing lock would lose in
            with (d / WORKLOADS).open("a") as f:
                f.write(json.dumps([f"{name}-{i}", {"writer": name, "round": i}]) + "\n")
            with (d / RECORDS).open("a") as f:
                for k in range(2):
                    f.write(json.dumps([index, [f"{name}-{i}", k]]) + "\n")


def _holder(db: str, hold_s: float, stamps: str) -> None:
    with locked(db):
        Path(stamps, "held").write_text(str(time.time()))
        time.sleep(hold_s)
        Path(stamps, "released").write_text(str(time.time()))


def _waiter(db: str, stamps: str) -> None:
    with locked(db):
        Path(stamps, "acquired").write_text(str(time.time()))


def test_two_processes_write_one_database_without_corrupting_it(tmp_path: Path) -> None:
    db = tmp_path / "tuning"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(db), n, 40)) for n in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    report = check(db)
    assert not report.changed
    assert (report.workloads, report.records) == (80, 160)
    workloads = [json.loads(x) for x in (db / WORKLOADS).read_text().splitlines()]
    for line in (db / RECORDS).read_text().splitlines():
        index, (tag, _) = json.loads(line)
        assert workloads[index][0] == tag  # every record points at its own workload
    assert sorted(w[0] for w in workloads) == sorted(
        f"{n}-{i}" for n in ("a", "b") for i in range(40)
    )


def test_the_lock_blocks_another_process(tmp_path: Path) -> None:
    db, stamps = tmp_path / "tuning", tmp_path / "stamps"
    stamps.mkdir()
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_holder, args=(str(db), 1.5, str(stamps)))
    holder.start()
    deadline = time.monotonic() + 60
    while not (stamps / "held").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiter = ctx.Process(target=_waiter, args=(str(db), str(stamps)))
    waiter.start()
    for p in (holder, waiter):
        p.join(60)
        assert p.exitcode == 0
    released = float((stamps / "released").read_text())
    acquired = float((stamps / "acquired").read_text())
    assert acquired >= released
