"""Tuning on the device: an RPC profile tunes through a loopback TVM tracker for real.

The device is this machine behind ``local_farm`` (a tracker and one RPC server on
127.0.0.1), so MetaSchedule's RPC runner leases it, uploads every candidate and times it
there; the records go to the profile's user database. A farm killed mid-tuning must end the
run with a one-line error in bounded time and leave a database the next run resumes.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._tiny import tiny_tdnn
from voxfit.compile import TvmWorker, compile_model
from voxfit.compile._database import RECORDS, WORKLOADS, check, repair
from voxfit.hw_profiles import HardwareProfile, RpcSpec, pick_local_profile
from voxfit.latency import TvmRpcEstimator
from voxfit.latency._farm import Farm, local_farm

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _rpc_profile(
    farm: Farm, shipped: Path, *, trials: int, per_iter: int = 2, runner_timeout_s: float = 30
) -> HardwareProfile:
    """The local profile, small, measured and tuned through ``farm`` (nothing shipped)."""
    p = pick_local_profile(ROOT / "hw_profiles")
    rpc = RpcSpec(farm.host, farm.tracker_port, farm.key, connect_timeout_s=30)
    return replace(
        p,
        cores=1,
        inputs=p.inputs[:1],
        measurement=replace(
            p.measurement, method="rpc", rpc=rpc, repeats=5, min_repeat_ms=5, warmup=1
        ),
        tuning=replace(
            p.tuning,
            trials_per_task=trials,
            trials_per_iter=per_iter,
            runner_timeout_s=runner_timeout_s,
            database_dir=str(shipped),
        ),
    )


def _run_secs(db: Path) -> list[tuple[int, float]]:
    """(workload index, best run seconds) of every record; MetaSchedule stores a failed
    measurement as 1e10 s."""
    rows = [json.loads(x) for x in (db / RECORDS).read_text().splitlines() if x.strip()]
    return [(int(i), min(float(s) for s in rec[1])) for i, rec in rows]


def _measured(db: Path) -> set[int]:
    """Workloads with at least one successful measurement."""
    return {i for i, s in _run_secs(db) if math.isfinite(s) and s < 1e9}


def test_an_rpc_profile_tunes_through_its_tracker_into_its_database(tmp_path: Path) -> None:
    db, shipped = tmp_path / "tuning", tmp_path / "nothing-shipped"
    m = tiny_tdnn()
    with local_farm("voxfit-tune", log_dir=tmp_path / "farm") as farm, TvmWorker(1) as w:
        p = _rpc_profile(farm, shipped, trials=2)
        t0 = time.monotonic()
        (cold,) = compile_model(m, p, w, tmp_path / "cold", tuning_dir=db)
        cold_s = time.monotonic() - t0
        assert cold.ok, cold.error
        assert cold.details["tuner"] == "rpc"
        assert cold.n_tasks > 0
        assert cold.new_tasks == cold.n_tasks
        assert cold.tuned_trials == 2 * cold.n_tasks
        # every task was measured on the server: finite times, one upload per measurement
        assert _measured(db) == set(range(cold.n_tasks))
        assert len((db / WORKLOADS).read_text().splitlines()) == cold.n_tasks
        # (a record of a candidate that failed to build has no upload, and the server's log
        # may lag its last upload by a moment: a clean-clone run once counted 13 for 14)
        ok = [s for _, s in _run_secs(db) if s < 1e9]
        log_file = tmp_path / "farm" / "rpc_server.log"
        deadline = time.monotonic() + 10
        while (uploads := log_file.read_text().count("load_module")) < len(ok):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert uploads >= len(ok) >= cold.n_tasks
        assert not shipped.exists()  # nothing is written to the shipped database
        print(f"RPC tuning: {cold.n_tasks} tasks, tune {cold.tune_s:.1f} s, total {cold_s:.1f} s")

        (warm,) = compile_model(m, p, w, tmp_path / "warm", tuning_dir=db)
        assert warm.ok, warm.error
        assert (warm.new_tasks, warm.tuned_trials) == (0, 0)

        with TvmRpcEstimator(p, tmp_path / "rpc", tuning_dir=db, worker=w) as est:
            (lat,) = est.estimate(m)
        assert lat.ok, lat.error
        assert lat.compile is not None
        assert lat.compile.new_tasks == 0
        assert lat.median_ms is not None
        assert lat.median_ms > 0

        assert warm.lib is not None
        x = torch.randn(1, warm.frames, 80, generator=torch.Generator().manual_seed(1))
        rpc = {
            "tracker_host": farm.host,
            "tracker_port": farm.tracker_port,
            "device_key": farm.key,
            "connect_timeout_s": 30.0,
            "session_timeout_s": 60.0,
        }
        out = w.call("run_rpc", timeout_s=120, lib=str(warm.lib), input=x.numpy(), rpc=rpc)
    assert "error" not in out, out.get("error")
    assert out["device_key"] == farm.key
    with torch.no_grad():
        ref = m(x, torch.tensor([warm.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)


def _kill_when_measured(farm: Farm, db: Path, records: int, when: dict[str, float]) -> None:
    """Kill the whole farm once ``records`` measurements are in the database (or after
    120 s): the device goes away mid-tuning, with tuning well under way."""
    f, deadline = db / RECORDS, time.monotonic() + 120
    while time.monotonic() < deadline:
        if f.exists() and len(f.read_text().splitlines()) >= records:
            break
        time.sleep(0.25)
    farm.kill()
    when["killed"] = time.monotonic()


def test_a_tracker_that_dies_mid_tuning_leaves_a_database_the_next_run_resumes(
    tmp_path: Path,
) -> None:
    db, shipped = tmp_path / "tuning", tmp_path / "nothing-shipped"
    m = tiny_tdnn()
    when: dict[str, float] = {}
    with local_farm("voxfit-drop", log_dir=tmp_path / "farm1") as farm, TvmWorker(1) as w:
        # 64 trials a task would take many minutes: the kill comes long before the end
        p = _rpc_profile(farm, shipped, trials=64, per_iter=4, runner_timeout_s=20)
        killer = threading.Thread(target=_kill_when_measured, args=(farm, db, 4, when))
        killer.start()
        (first,) = compile_model(m, p, w, tmp_path / "a", tuning_dir=db, timeout_s=300)
        returned = time.monotonic()
        killer.join()
    assert not first.ok
    assert first.error is not None
    assert "\n" not in first.error
    assert f"RPC tracker {farm.host}:{farm.tracker_port}" in first.error
    assert "during tuning" in first.error
    assert str(db) in first.error
    # the run noticed within about one batch, not after its budget or the worker timeout
    assert returned - when["killed"] < 60, first.error
    print(f"device lost: the run ended {returned - when['killed']:.1f} s after the kill")

    # the database is whole (nothing to repair) and holds what was measured before the kill
    assert not check(db).changed
    assert not repair(db).changed
    measured = _measured(db)
    assert measured

    with local_farm("voxfit-drop", log_dir=tmp_path / "farm2") as farm2, TvmWorker(1) as w:
        p2 = _rpc_profile(farm2, shipped, trials=2)
        (again,) = compile_model(m, p2, w, tmp_path / "b", tuning_dir=db)
    assert again.ok, again.error
    assert again.details["tuner"] == "rpc"
    # only the tasks with no successful measurement are tuned again
    assert again.new_tasks == again.n_tasks - len(measured)
    assert again.new_tasks < again.n_tasks
    assert _measured(db) == set(range(again.n_tasks))


def test_the_device_watch_tells_a_gone_device_from_a_busy_one(tmp_path: Path) -> None:
    """What the watch asks after a failed batch: None while the device is registered, the
    key once its server is gone, and the tracker once that is gone too; each in bounded
    time. (Runs in this process: TVM's tracker client only, no TVM threads.)"""
    from voxfit.compile._tune import device_gone

    with local_farm("voxfit-watch", log_dir=tmp_path / "farm") as farm:
        host, port = farm.host, farm.tracker_port
        assert device_gone(host, port, farm.key, 5.0) is None
        assert "'other'" in (device_gone(host, port, "other", 5.0) or "")
        server = replace(farm, pids=farm.pids[1:])
        server.kill()
        deadline = time.monotonic() + 30
        why = None
        while why is None and time.monotonic() < deadline:
            why = device_gone(host, port, farm.key, 5.0)
            time.sleep(0.5)
        assert why == f"RPC tracker {host}:{port} has no device with key 'voxfit-watch' any more"
        farm.kill()
        t0 = time.monotonic()
        why = device_gone(host, port, farm.key, 5.0)
        assert why is not None
        # refused, or reset while the killed tracker's socket is still closing
        assert why.startswith(f"RPC tracker {host}:{port} ")
        assert "unreachable" in why or "does not answer" in why
        assert time.monotonic() - t0 < 5
