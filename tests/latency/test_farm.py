"""The device farm: several RPC servers under one tracker key, for real on 127.0.0.1.

A server killed mid-measurement costs a retry on another server of the key, not a failed
measurement; ``voxfit farm status`` shows the tracker's keys, queue and servers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from tests._cli import run_voxfit
from tests._tiny import tiny_tdnn
from voxfit.compile import TvmWorker, compile_model
from voxfit.hw_profiles import HardwareProfile, RpcSpec, pick_local_profile
from voxfit.latency import TvmRpcEstimator
from voxfit.latency._farm import Farm, local_farm

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
KEY = "voxfit-farm"


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    with local_farm(KEY, servers=2, log_dir=tmp_path_factory.mktemp("farm")) as f:
        yield f


def _profile(farm: Farm, tmp: Path, *, repeats: int, min_repeat_ms: int) -> HardwareProfile:
    """The local profile measured through ``farm`` (untuned: the farm is what is tested)."""
    p = pick_local_profile(ROOT / "hw_profiles")
    rpc = RpcSpec(farm.host, farm.tracker_port, farm.key, connect_timeout_s=60)
    return replace(
        p,
        cores=1,
        inputs=p.inputs[:1],
        measurement=replace(
            p.measurement, method="rpc", rpc=rpc, repeats=repeats, min_repeat_ms=min_repeat_ms,
            warmup=1,
        ),
        tuning=replace(p.tuning, trials_per_task=0, database_dir=str(tmp / "none")),
    )  # fmt: skip


def test_farm_status_shows_keys_queue_and_servers(
    farm: Farm, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = f"{farm.host}:{farm.tracker_port}"
    code, out, err = run_voxfit(["farm", "status", "--tracker", tracker], capsys, monkeypatch)
    assert code == 0, err
    assert f"RPC tracker {tracker}" in out
    (row,) = [x for x in out.splitlines() if KEY in x]
    assert row.split("│")[2].strip() == "2"  # free
    assert row.split("│")[3].strip() == "0"  # pending requests
    assert row.count("127.0.0.1:") == 2  # both servers listed
    code, _, err = run_voxfit(
        ["farm", "status", "--tracker", tracker, "--key", "nope"], capsys, monkeypatch
    )
    assert code == 2
    assert f"RPC tracker {tracker} has no device with key 'nope'" in err
    assert KEY in err


def test_farm_status_of_an_unreachable_tracker_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["farm", "status", "--tracker", "127.0.0.1:1", "--key", "phones"]
    code, _, err = run_voxfit(args, capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "RPC tracker 127.0.0.1:1 unreachable" in err
    assert "'phones'" in err
    code, _, err = run_voxfit(["farm", "status", "--tracker", "nowhere"], capsys, monkeypatch)
    assert code == 2
    assert "HOST:PORT" in err


def test_a_server_killed_mid_measurement_costs_a_retry_on_another(
    farm: Farm, tmp_path: Path
) -> None:
    """Two measurements at once use both servers; the server of one is killed while it
    measures: that measurement is retried on a server of the key and succeeds."""
    # ~4 s of timing per measurement: a wide window to kill in
    p = _profile(farm, tmp_path, repeats=40, min_repeat_ms=100)
    assert p.measurement.rpc is not None
    m = tiny_tdnn()
    results: dict[str, Any] = {}
    with TvmWorker(1) as w1, TvmWorker(1) as w2:
        # b: a library built up front, measured through the worker op (torch.export is not
        # for two threads at once); a: the estimator's whole path (export, build, measure)
        (c,) = compile_model(m, p, w2, tmp_path / "b", tuning_dir=tmp_path / "tuning")
        assert c.ok, c.error
        est = TvmRpcEstimator(p, tmp_path / "a", worker=w1, tuning_dir=tmp_path / "tuning")
        rpc = {**asdict(p.measurement.rpc), "attempts": 3}
        measurement = {"warmup": 1, "repeats": 40, "min_repeat_ms": 100}

        def run_a() -> None:
            (results["a"],) = est.estimate(m)

        def run_b() -> None:
            results["b"] = w2.call(
                "measure_rpc", timeout_s=300, lib=str(c.lib), frames=c.frames,
                measurement=measurement, device="cpu", rpc=rpc,
            )  # fmt: skip

        threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
        for t in threads:
            t.start()
        deadline, serving = time.monotonic() + 180, ()
        while not serving and time.monotonic() < deadline:
            serving = farm.serving()
            time.sleep(0.2)
        assert serving, "no server ever served a session"
        time.sleep(1.0)  # inside time_evaluator by now
        replace(farm, pids=serving[:1]).kill()
        for t in threads:
            t.join(300)
    a, b = results["a"], results["b"]
    assert a.ok, a.error  # no failed measurement
    assert "error" not in b, b["error"]
    assert a.median_ms > 0
    assert b["median_ms"] > 0
    # exactly one of the two lost its server mid-measurement and was measured on another
    attempts = sorted([int(a.note.startswith("measured on attempt 2")) + 1, b["attempts"]])
    assert attempts == [1, 2], (a.note, b["device_errors"])
