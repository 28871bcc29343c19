"""The tuning database survives a torn write: complete records are kept, the tail dropped."""

from __future__ import annotations

import json
from pathlib import Path

from voxfit.compile import check, repair
from voxfit.compile._database import RECORDS, WORKLOADS


def _db(tmp_path: Path, workloads: int, records: list[int]) -> Path:
    (tmp_path / WORKLOADS).write_text(
        "".join(json.dumps([str(i), f"wl{i}"]) + "\n" for i in range(workloads))
    )
    (tmp_path / RECORDS).write_text(
        "".join(json.dumps([w, [f"rec{j}"]]) + "\n" for j, w in enumerate(records))
    )
    return tmp_path


def test_healthy_database_is_left_alone(tmp_path: Path) -> None:
    d = _db(tmp_path, 3, [0, 1, 2, 2])
    before = (d / RECORDS).read_bytes(), (d / WORKLOADS).read_bytes()
    r = repair(d)
    assert (r.workloads, r.records, r.changed) == (3, 4, False)
    assert ((d / RECORDS).read_bytes(), (d / WORKLOADS).read_bytes()) == before


def test_torn_record_line_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    d = _db(tmp_path, 2, [0, 1, 1])
    with (d / RECORDS).open("a") as f:
        f.write('[1, ["rec-half')  # killed mid-write
    r = repair(d)
    assert (r.records, r.dropped_records) == (3, 1)
    lines = (d / RECORDS).read_text().splitlines()
    assert [json.loads(x)[1][0] for x in lines] == ["rec0", "rec1", "rec2"]
    assert repair(d).changed is False  # idempotent


def test_torn_workload_drops_records_that_point_past_it(tmp_path: Path) -> None:
    d = _db(tmp_path, 2, [0, 1, 2])
    text = (d / WORKLOADS).read_text() + '["2", "wl'
    (d / WORKLOADS).write_text(text)
    r = repair(d)
    assert (r.workloads, r.dropped_workloads) == (2, 1)
    assert (r.records, r.dropped_records) == (2, 1)


def test_missing_database_is_created_empty(tmp_path: Path) -> None:
    r = repair(tmp_path / "new" / "tuning")
    assert (r.workloads, r.records) == (0, 0)
    assert (tmp_path / "new" / "tuning" / WORKLOADS).read_text() == ""


def test_check_reports_a_torn_database_without_writing(tmp_path: Path) -> None:
    d = _db(tmp_path, 2, [0, 1])
    with (d / RECORDS).open("a") as f:
        f.write('[1, ["rec-half')
    before = (d / RECORDS).read_bytes(), (d / WORKLOADS).read_bytes()
    r = check(d)
    assert (r.records, r.dropped_records, r.changed) == (2, 1, True)
    assert ((d / RECORDS).read_bytes(), (d / WORKLOADS).read_bytes()) == before
    assert check(tmp_path / "absent").changed is False
    assert not (tmp_path / "absent").exists()
