"""Publishing tuned tasks into a shipped database: the best records of tasks it lacks, in
MetaSchedule's format, re-indexed; tasks it has are left alone; failed runs and a torn tail
are not copied; publishing twice adds nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from voxfit.compile import publish
from voxfit.compile._database import RECORDS, WORKLOADS


def _wl(h: int) -> str:
    return json.dumps([h, f"module-{h}"])


def _rec(i: int, secs: list[float], tag: str) -> str:
    return json.dumps([i, [[tag], secs, {"kind": "llvm"}, []]], separators=(",", ":"))


def _write(d: Path, workloads: list[str], records: list[str], tail: str = "") -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / WORKLOADS).write_text("".join(x + "\n" for x in workloads))
    (d / RECORDS).write_text("".join(x + "\n" for x in records) + tail)


def _read(d: Path) -> tuple[list[list], list[list]]:  # type: ignore[type-arg]
    w = [json.loads(x) for x in (d / WORKLOADS).read_text().splitlines()]
    r = [json.loads(x) for x in (d / RECORDS).read_text().splitlines()]
    return w, r


def test_publish_copies_the_best_records_of_new_tasks_only(tmp_path: Path) -> None:
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    # task 7 is shipped already (with a record); 8 is new; 9's every run failed
    _write(shipped, [_wl(7)], [_rec(0, [1.0], "shipped-7")])
    _write(
        user,
        [_wl(8), _wl(7), _wl(9)],
        [
            _rec(0, [3e-3, 3e-3], "8-slow"),
            _rec(0, [1e-3], "8-best"),
            _rec(0, [2e-3], "8-second"),
            _rec(0, [1e-3, 1e10], "8-half-failed"),
            _rec(1, [0.1], "7-mine"),
            _rec(2, [1e10], "9-failed"),
        ],
        tail='[0,[["8-torn"',  # a killed run's half line: not copied
    )
    r = publish(user, shipped, top_k=2)
    assert (r.workloads_added, r.records_added, r.already_there) == (1, 2, 1)
    w, recs = _read(shipped)
    assert [x[0] for x in w] == [7, 8]
    assert [(i, rec[0][0]) for i, rec in recs] == [
        (0, "shipped-7"),
        (1, "8-best"),
        (1, "8-second"),
    ]
    # again: nothing new
    again = publish(user, shipped, top_k=2)
    assert (again.workloads_added, again.records_added, again.already_there) == (0, 0, 2)
    assert _read(shipped) == (w, recs)


def test_a_shipped_workload_without_records_gets_them_and_bad_input_is_refused(
    tmp_path: Path,
) -> None:
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    _write(shipped, [_wl(5)], [])
    _write(user, [_wl(5)], [_rec(0, [2e-3], "5-a"), _rec(0, [1e-3], "5-b")])
    r = publish(user, shipped, top_k=4)
    assert (r.workloads_added, r.records_added) == (0, 2)
    assert [rec[0][0] for _, rec in _read(shipped)[1]] == ["5-b", "5-a"]
    with pytest.raises(ValueError, match="top_k"):
        publish(user, shipped, top_k=0)
    (shipped / RECORDS).write_text((shipped / RECORDS).read_text() + "[0,[[")
    with pytest.raises(ValueError, match="torn"):
        publish(user, shipped)


def test_the_cli_publishes_a_work_folders_tuning(tmp_path: Path) -> None:
    from voxfit.cli import app
    from voxfit.errors import ConfigError

    runner = CliRunner()
    args = ["profile", "publish-tuning", "x86-avx2-2core", "--work", str(tmp_path / "w"),
            "--into", str(tmp_path / "s")]  # fmt: skip
    res = runner.invoke(app, args)
    assert isinstance(res.exception, ConfigError)
    assert "no tuning database here" in str(res.exception)
    _write(tmp_path / "w" / "tuning" / "x86-avx2-2core", [_wl(1)], [_rec(0, [1e-3], "1")])
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "1 tasks added with 1 records" in " ".join(res.output.split())
    assert len(_read(tmp_path / "s")[1]) == 1


def test_improve_adds_only_records_faster_than_the_shipped_best(tmp_path: Path) -> None:
    """A longer tuning of shipped tasks: its faster records join (the compile takes the
    fastest), slower ones and tasks it did not beat stay out; the CLI takes any database."""
    from voxfit.cli import app

    user, shipped = tmp_path / "t128", tmp_path / "shipped"
    _write(shipped, [_wl(1), _wl(2)], [_rec(0, [2e-3], "1-old"), _rec(1, [1e-3], "2-old")])
    records = [_rec(0, [3e-3], "1-slower"), _rec(0, [1e-3], "1-faster")]
    _write(user, [_wl(1), _wl(2)], [*records, _rec(1, [5e-3], "2-slower")])
    r = publish(user, shipped, top_k=4, improve=True)
    assert (r.workloads_added, r.records_added, r.already_there, r.improved) == (0, 1, 2, 1)
    assert [(i, rec[0][0]) for i, rec in _read(shipped)[1]] == [
        (0, "1-old"),
        (1, "2-old"),
        (0, "1-faster"),
    ]
    again = publish(user, shipped, top_k=4, improve=True)  # nothing beats the new best
    assert (again.records_added, again.improved) == (0, 0)
    plain = publish(user, tmp_path / "other", top_k=1)  # improve off: new tasks only
    assert plain.records_added == 2
    _write(user, [_wl(1)], [_rec(0, [5e-4], "1-fastest")])
    res = CliRunner().invoke(
        app,
        [
            "profile",
            "publish-tuning",
            "x86-avx2-2core",
            "--from",
            str(user),
            "--into",
            str(shipped),
            "--improve",
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    assert "1 of the 1 tasks it had records of given faster ones" in " ".join(res.output.split())
    assert _read(shipped)[1][-1][1][0][0] == "1-fastest"
