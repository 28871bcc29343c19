"""An aarch64 device this machine hosts: TVM's RPC server under qemu-aarch64, for real.

The shipped ``arm-aarch64-qemu`` profile tunes the tiny model on the emulated device
(cross-compiled here, measured there over a loopback tracker), the records land in the
profile's database, and the compiled model's output on the device equals torch's. Needs the
environment ``make qemu-aarch64`` sets up (the test never installs); skipped without it.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests._cli import run_voxfit
from tests._tiny import tiny_tdnn
from voxfit.compile import TvmWorker, compile_model
from voxfit.compile._database import RECORDS, WORKLOADS
from voxfit.hw_profiles import HardwareProfile, load_profile
from voxfit.latency._farm import local_farm
from voxfit.latency._qemu import (
    QemuEnv,
    QemuSetupError,
    qemu_rpc_server,
    setup_qemu_aarch64,
    wait_registered,
)

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qemu_env() -> QemuEnv:
    try:
        return setup_qemu_aarch64(install=False)
    except QemuSetupError as e:
        pytest.skip(f"no aarch64 device under qemu here: {e}")


def test_setup_only_checks_without_install(tmp_path: Path, qemu_env: QemuEnv) -> None:
    with pytest.raises(QemuSetupError, match="no aarch64 Python in .* make qemu-aarch64"):
        setup_qemu_aarch64(tmp_path / "empty", install=False)
    assert not (tmp_path / "empty").exists()


def test_qemu_server_without_its_environment_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["device", "qemu-server", "--cache-dir", str(tmp_path / "empty")]
    code, _, err = run_voxfit(args, capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "qemu-aarch64" in err or "aarch64-linux-gnu-g++" in err


def _killpg(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _line_reader(stream: Any) -> Any:
    """``next_line(timeout_s)``: the stream's next line, or a test failure after the timeout
    (a bare ``readline`` on a server that never prints would hang the whole run)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put("")  # end of stream

    threading.Thread(target=pump, daemon=True).start()

    def next_line(timeout_s: float) -> str:
        try:
            return lines.get(timeout=timeout_s)
        except queue.Empty:
            pytest.fail(f"no output from the qemu-server command in {timeout_s:.0f} s")

    return next_line


def test_qemu_server_command_registers_and_stops_on_ctrl_c(
    tmp_path: Path, qemu_env: QemuEnv, request: pytest.FixtureRequest
) -> None:
    with local_farm("voxfit-qemu-cli", servers=0, log_dir=tmp_path / "farm") as farm:
        cmd = [
            sys.executable, "-m", "voxfit.cli", "device", "qemu-server",
            "--tracker-port", str(farm.tracker_port), "--key", farm.key,
            "--cache-dir", str(qemu_env.root), "--log", str(tmp_path / "qemu.log"),
        ]  # fmt: skip
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, start_new_session=True
        ) as cli:
            assert cli.stdout is not None
            request.addfinalizer(lambda: _killpg(cli.pid))
            next_line = _line_reader(cli.stdout)
            first, server = "", 0
            try:
                first = next_line(120)  # qemu starting Python on a loaded host
                assert "started the qemu-aarch64 RPC server" in first
                assert f"tracker 127.0.0.1:{farm.tracker_port}" in first
                server = int(first.split("(pid ")[1].split(",")[0])
                assert "registered" in next_line(120)
                # the command said so; the tracker agrees (a TVM worker's start: seconds)
                wait_registered(cli, farm.host, farm.tracker_port, farm.key, 60)
                os.killpg(cli.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's group
                assert cli.wait(30) == 0
                rest = iter(lambda: next_line(10), "")
                assert any("stopping" in line for line in rest)
            except BaseException:
                # Popen's exit waits for the command, which waits for its server (a session
                # of its own): stop both first, or a failure here hangs the whole run
                # (seen: a 10 s registration check timed out on a loaded host)
                _killpg(cli.pid)
                if server:
                    _killpg(server)
                raise
        # the server's whole process group is gone (killed ones are reaped a moment later)
        deadline = time.monotonic() + 15
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server)


def _run_on_device(w: TvmWorker, lib: Path, x: torch.Tensor, farm: Any, rpc: Any) -> Any:
    """The library's output for ``x`` on the device the farm's tracker leases."""
    return w.call(
        "run_rpc",
        timeout_s=600,
        lib=str(lib),
        input=x.numpy(),
        rpc={
            "tracker_host": farm.host,
            "tracker_port": farm.tracker_port,
            "device_key": rpc.device_key,
            "connect_timeout_s": rpc.connect_timeout_s,
            "session_timeout_s": 300.0,
        },
    )


def _on_farm(
    shipped: HardwareProfile, farm: Any, tmp_path: Path, **target: Any
) -> HardwareProfile:
    """The shipped qemu profile on the farm's tracker, 2 trials per task, nothing shipped."""
    assert shipped.measurement.rpc is not None
    rpc = replace(shipped.measurement.rpc, tracker_port=farm.tracker_port)
    return replace(
        shipped,
        target={**shipped.target, **target},
        measurement=replace(shipped.measurement, rpc=rpc),
        tuning=replace(
            shipped.tuning,
            trials_per_task=2,
            trials_per_iter=2,
            database_dir=str(tmp_path / "nothing-shipped"),
        ),
    )


def test_the_qemu_profile_tunes_on_the_emulated_device_and_matches_torch(
    tmp_path: Path, qemu_env: QemuEnv
) -> None:
    shipped = load_profile(ROOT / "hw_profiles" / "arm-aarch64-qemu.yaml")
    assert shipped.target["mtriple"] == "aarch64-linux-gnu"
    assert shipped.measurement.rpc is not None
    key = shipped.measurement.rpc.device_key
    db = tmp_path / "tuning"
    m = tiny_tdnn()
    # a tracker only (no x86 server); the device is the emulated one
    with local_farm(key, servers=0, log_dir=tmp_path / "farm") as farm:
        t0 = time.monotonic()
        with (
            qemu_rpc_server(
                qemu_env, farm.host, farm.tracker_port, key, log_file=tmp_path / "qemu.log"
            ),
            TvmWorker(1) as w,
        ):
            up_s = time.monotonic() - t0
            p = _on_farm(shipped, farm, tmp_path)
            t0 = time.monotonic()
            (res,) = compile_model(m, p, w, tmp_path / "out", tuning_dir=db)
            tune_s = time.monotonic() - t0
            assert res.ok, res.error
            assert res.details["tuner"] == "rpc"
            assert res.n_tasks > 0
            assert res.tuned_trials == 2 * res.n_tasks
            assert res.lib is not None

            x = torch.randn(1, res.frames, 80, generator=torch.Generator().manual_seed(1))
            t0 = time.monotonic()
            out = _run_on_device(w, res.lib, x, farm, p.measurement.rpc)
            run_s = time.monotonic() - t0
    assert "error" not in out, out.get("error")
    assert out["device_key"] == key
    with torch.no_grad():
        ref = m(x, torch.tensor([res.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)

    # every task measured on the emulated device, into this profile's database
    rows = [json.loads(r) for r in (db / RECORDS).read_text().splitlines() if r.strip()]
    measured = {int(i) for i, rec in rows if min(float(s) for s in rec[1]) < 1e9}
    assert measured == set(range(res.n_tasks))
    assert len((db / WORKLOADS).read_text().splitlines()) == res.n_tasks
    assert all(math.isfinite(float(s)) for _, rec in rows for s in rec[1])
    assert not (tmp_path / "nothing-shipped").exists()
    print(
        f"qemu aarch64: server up {up_s:.1f} s, {res.n_tasks} tasks tuned in {tune_s:.1f} s "
        f"(tune {res.tune_s:.1f} s), run on device {run_s:.1f} s"
    )


def test_int8_compute_with_sdot_on_the_emulated_device_equals_the_model(
    tmp_path: Path, qemu_env: QemuEnv
) -> None:
    """A tiny Conformer with every Linear and the stem at 8-bit weights and activations,
    built for an aarch64 target with the dot-product extension: its int8 kernels are tuned on
    the emulated device with ``sdot`` schedules, and their output there equals the
    fake-quantized torch model's (``sdot`` accumulates exactly in int32, so the model needs
    no saturation emulation on this target)."""
    from voxfit.compile import int8_layers, saturates_int8_pairs
    from voxfit.compile._int8 import SDOT_INTRIN
    from voxfit.compress import apply
    from voxfit.models import build_model, default_config
    from voxfit.plan import Candidate, LayerPlan

    shipped = load_profile(ROOT / "hw_profiles" / "arm-aarch64-qemu.yaml")
    assert shipped.measurement.rpc is not None
    key = shipped.measurement.rpc.device_key
    torch.manual_seed(0)
    conf = build_model(default_config("conformer", 12, "tiny")).eval()
    layers = tuple(
        LayerPlan(n, 8, 32 if n.endswith(".dw") else 8) for n in conf.structure().quantizable
    )
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64])) for _ in range(2)]
    q = apply(conf, Candidate(layers=layers), calibration=cal, channel_multiple=4)
    db = tmp_path / "tuning"
    with (
        local_farm(key, servers=0, log_dir=tmp_path / "farm") as farm,
        qemu_rpc_server(
            qemu_env, farm.host, farm.tracker_port, key, log_file=tmp_path / "qemu.log"
        ),
        TvmWorker(1) as w,
    ):
        p = _on_farm(shipped, farm, tmp_path, mattr=["+neon", "+dotprod"])
        assert not saturates_int8_pairs(p)
        (res,) = compile_model(q, p, w, tmp_path / "out", tuning_dir=db)
        assert res.ok, res.error
        x = torch.randn(1, res.frames, 80, generator=torch.Generator().manual_seed(1))
        assert res.lib is not None
        out = _run_on_device(w, res.lib, x, farm, p.measurement.rpc)
    assert "error" not in out, out.get("error")
    n = len(int8_layers(q))
    assert res.lowering.startswith(f"{n} layers int8 compute (s8 x s8 -> s32; "), res.lowering
    assert any("matmul_u8s8" in t for t in res.task_names), res.task_names
    # the tuned int8 kernels run the Arm dot-product intrinsic
    records = (db / RECORDS).read_text()
    assert SDOT_INTRIN in records
    with torch.no_grad():
        ref = q(x, torch.tensor([res.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)
