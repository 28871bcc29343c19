"""How many of a tuning database's int8 records are tensorized, and whether each int8
workload's best one is.

An int8 record is one whose trace marks a block for a dot-product intrinsic (the
``meta_schedule.auto_tensorize`` annotation of ``MultiLevelTilingWithIntrin``); it is
tensorized when the trace tensorizes every marked block with it
(``voxfit.compile._int8.tensorize_counts``). Databases tuned before the int8 design
space dropped fallen-back samples (``_int8.require_tensorized``) hold scalar ones too; the
build always takes a workload's fastest record, so ``best_scalar`` must be 0.

    python benchmarks/int8_tensorized.py [--trials 128 | --database DIR]

Writes ``benchmarks/results/int8_tensorized.json``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from _common import parser, provenance, resolve_profile, write_result

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8 import tuning_dir  # noqa: E402


def audit(db_dir: Path) -> dict[str, Any]:
    """Per int8 workload of the JSON database in ``db_dir``: its valid records, how many are
    tensorized, and the fastest of each kind (mean run seconds)."""
    from tvm.s_tir import meta_schedule as ms

    from voxfit.compile._int8 import tensorize_counts

    db = ms.database.JSONDatabase(
        path_workload=str(db_dir / "database_workload.json"),
        path_tuning_record=str(db_dir / "database_tuning_record.json"),
        allow_missing=False,
    )
    by_workload: dict[int, list[tuple[float, bool]]] = {}
    for rec in db.get_all_tuning_records():
        marked, tensorized = tensorize_counts(rec.trace)
        secs = [float(s) for s in (rec.run_secs or [])]
        if not marked or not secs or max(secs) >= 1e9:  # not int8, or failed to run
            continue
        done = all(tensorized[m] >= n for m, n in marked.items())
        key = hash(rec.workload.mod.script())  # one workload, one script
        by_workload.setdefault(key, []).append((statistics.fmean(secs), done))
    rows = []
    for recs in by_workload.values():
        recs.sort()
        fast_t = next((s for s, t in recs if t), None)
        fast_s = next((s for s, t in recs if not t), None)
        rows.append(
            {
                "records": len(recs),
                "tensorized": sum(t for _, t in recs),
                "best_is_tensorized": recs[0][1],
                "best_tensorized_us": None if fast_t is None else fast_t * 1e6,
                "best_scalar_us": None if fast_s is None else fast_s * 1e6,
            }
        )
    rows.sort(key=lambda r: r["best_tensorized_us"] or 0.0)
    return {
        "workloads": len(rows),
        "records": sum(r["records"] for r in rows),
        "tensorized": sum(r["tensorized"] for r in rows),
        "best_scalar": sum(not r["best_is_tensorized"] for r in rows),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = parser("int8_tensorized", __doc__, profile=True)
    ap.add_argument("--trials", type=int, default=128, help="the int8 benchmarks' database at N")
    ap.add_argument("--database", type=Path, default=None, help="another tuning database")
    args = ap.parse_args(argv)
    from voxfit.compile._import import make_target
    from voxfit.compile._int8 import load_cpu_tensor_intrins, register

    profile = resolve_profile(args.profile or "x86-avx2-2core")
    db_dir = args.database or tuning_dir(args.work, profile.name, args.trials)
    if not (db_dir / "database_tuning_record.json").is_file():
        raise SystemExit(f"{db_dir}: no tuning database (database_tuning_record.json)")
    target = make_target(profile.to_dict())
    register()
    load_cpu_tensor_intrins(str(target.attrs.get("mtriple", "")))
    result = {"profile": profile.name, "database": str(db_dir), **audit(db_dir)}
    result["provenance"] = provenance()
    write_result(args.out, result)
    Console().print(
        f"{db_dir}: {result['workloads']} int8 workloads, {result['tensorized']} of "
        f"{result['records']} records tensorized, best scalar in {result['best_scalar']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
