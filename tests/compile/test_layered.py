"""The shipped database read by key: a compile parses only its own workloads of it, and
gets what MetaSchedule's JSON database of the whole folder would give for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from voxfit.compile._database import RECORDS, WORKLOADS
from voxfit.errors import DataError

pytestmark = [pytest.mark.tvm]
SHIPPED = Path(__file__).resolve().parents[2] / "cost_models" / "x86-avx2-2core" / "tuning"


def _copy(picked: list[int], lines: list[str], records: list[str], to: Path) -> None:
    """A database of the ``picked`` workload lines and their records (re-indexed)."""
    to.mkdir()
    where = {i: n for n, i in enumerate(picked)}
    (to / WORKLOADS).write_text("".join(lines[i] + "\n" for i in picked))
    kept = []
    for r in records:
        i, rec = json.loads(r)
        if i in where:
            kept.append(json.dumps([where[i], rec]) + "\n")
    (to / RECORDS).write_text("".join(kept))


def test_a_read_by_key_holds_exactly_the_keys_records(tmp_path: Path) -> None:
    from tvm.s_tir import meta_schedule as ms

    from voxfit.compile._int8 import load_cpu_tensor_intrins
    from voxfit.compile._layered import _open_shipped

    load_cpu_tensor_intrins("x86_64-linux-gnu")
    lines = (SHIPPED / WORKLOADS).read_text().splitlines()
    records = (SHIPPED / RECORDS).read_text().splitlines()
    with_records = sorted({json.loads(r)[0] for r in records})
    key_of = [json.loads(w)[0] for w in lines]
    # two keys, and every key that several lines share (equal workloads to MetaSchedule,
    # whose block names can differ: a record must be read against its own line's workload)
    shared = {k for k in key_of if key_of.count(k) > 1}
    assert shared  # the shipped database has such keys (else this test checks less)
    keys = [*({key_of[i] for i in with_records[:2]} - shared), *sorted(shared)]
    picked = [i for i, k in enumerate(key_of) if k in keys]
    other = next(i for i in with_records if key_of[i] not in keys)
    _copy(picked, lines, records, tmp_path / "picked")
    whole = ms.database.JSONDatabase(work_dir=str(tmp_path / "picked"), allow_missing=False)

    by_key = _open_shipped(SHIPPED, keys)
    assert len(by_key) == len(whole) > 3  # every record of the keys, nothing else parsed
    for i in picked:
        mod = ms.database.Workload.from_json(json.loads(lines[i])).mod
        assert by_key.has_workload(mod)
        mine = by_key.get_top_k(by_key.commit_workload(mod), 5)
        ref = whole.get_top_k(whole.commit_workload(mod), 5)
        assert [[float(s) for s in r.run_secs] for r in mine] == [
            [float(s) for s in r.run_secs] for r in ref
        ]
        assert [str(r.trace.as_json()) for r in mine] == [str(r.trace.as_json()) for r in ref]
    # a workload no key named was not read
    assert not by_key.has_workload(ms.database.Workload.from_json(json.loads(lines[other])).mod)
    # asking again for more keys adds to what was read; the file is not re-read
    more = _open_shipped(SHIPPED, [*keys, key_of[other]])
    assert more is by_key
    assert len(more) > len(whole)


def test_a_torn_read_only_database_is_refused_by_key_too(tmp_path: Path) -> None:
    from voxfit.compile._layered import _open_shipped

    d = tmp_path / "torn"
    d.mkdir()
    (d / WORKLOADS).write_text('["1", "QQ=="]\n')
    (d / RECORDS).write_text('[0, [["torn')
    with pytest.raises(DataError, match="shipped tuning database is torn"):
        _open_shipped(d, ["1"])
