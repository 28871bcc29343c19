"""A device farm on loopback: a TVM RPC tracker plus RPC servers on 127.0.0.1.

The same processes a real farm runs (``python -m tvm.exec.rpc_tracker`` on a host,
``python -m tvm.exec.rpc_server --tracker ... --key K`` on each board), started here for
tests and demos so the RPC measurement path is exercised for real. Each process gets its
own process group and is killed with it: RPC servers fork children that otherwise keep
their ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from voxfit.compile import TvmWorker
from voxfit.errors import ConfigError, VoxfitError
from voxfit.hw_profiles import HardwareProfile


class FarmError(VoxfitError):
    """The loopback farm's tracker or servers did not come up."""


@dataclass(frozen=True, slots=True)
class Farm:
    """Where the loopback farm listens; ``pids`` are its processes (tracker first), each
    the leader of its own process group."""

    host: str
    tracker_port: int
    key: str
    pids: tuple[int, ...] = ()

    def kill(self) -> None:
        """SIGKILL every process group of the farm at once: a device farm that goes away
        mid-job (for tests of what survives it). Leaving ``local_farm`` still reaps them."""
        for pid in self.pids:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def serving(self) -> tuple[int, ...]:
        """The servers (their process-group pids) serving a session now: a process of the
        server holds an established connection on the port the server listens on."""
        import psutil

        out = []
        for pid in self.pids[1:]:
            try:
                top = psutil.Process(pid)
                procs = [top, *top.children(recursive=True)]
                conns = [c for p in procs for c in p.net_connections(kind="tcp")]
            except psutil.NoSuchProcess:
                continue
            ports = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
            if any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port in ports for c in conns):
                out.append(pid)
        return tuple(out)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    f = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: killed as a whole
        env=env,
    )


def _kill(p: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)


@contextmanager
def local_farm(
    key: str,
    *,
    servers: int = 1,
    threads: int = 1,
    log_dir: str | Path | None = None,
    ready_timeout_s: float = 120.0,
    port: int | None = None,
) -> Iterator[Farm]:
    """Run a tracker (on ``port``, default a free one) and ``servers`` RPC servers
    registered under ``key`` until exit.

    Raises:
        FarmError: the servers did not register within ``ready_timeout_s``.
    """
    logs = Path(log_dir or ".")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "TVM_BIND_THREADS": "0"}
    port = port or free_port()
    procs = [
        _spawn(
            [
                "tvm.exec.rpc_tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--port-end",
                str(port + 1),
                "--silent",
            ],
            logs / "rpc_tracker.log",
            env,
        )
    ]
    try:
        for _ in range(servers):
            sport = free_port()
            procs.append(
                _spawn(
                    [
                        "tvm.exec.rpc_server",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(sport),
                        "--port-end",
                        str(sport + 1),
                        "--tracker",
                        f"127.0.0.1:{port}",
                        "--key",
                        key,
                    ],
                    logs / "rpc_server.log",
                    env,
                )
            )
        with TvmWorker(1) as w:
            deadline = time.monotonic() + ready_timeout_s
            while True:
                r = w.call("tracker_summary", timeout_s=30, host="127.0.0.1", port=port)
                free = r.get("keys", {}).get(key, 0) if "error" not in r else 0
                if free >= servers:
                    break
                dead = [str(p.args[2]) for p in procs if p.poll() is not None]  # type: ignore[index]
                if dead or time.monotonic() > deadline:
                    why = (
                        f"{', '.join(dead)} exited"
                        if dead
                        else f"not ready after {ready_timeout_s:g} s"
                    )
                    raise FarmError(
                        f"loopback RPC farm (tracker 127.0.0.1:{port}, key {key!r}): {why}; "
                        f"see {logs}/rpc_*.log"
                    )
                time.sleep(1.0)
        yield Farm("127.0.0.1", port, key, tuple(p.pid for p in procs))
    finally:
        for p in reversed(procs):
            _kill(p)


@contextmanager
def hosted(profile: HardwareProfile, log_dir: str | Path) -> Iterator[HardwareProfile]:
    """An RPC profile's device hosted here for the block: a loopback farm under the
    profile's device key (its cores as threads), and the profile pointed at its tracker.

    Raises:
        ConfigError: the profile does not measure over RPC.
        FarmError: the farm did not come up.
    """
    rpc = profile.measurement.rpc
    if profile.measurement.method != "rpc" or rpc is None:
        raise ConfigError(
            f"{profile.source or profile.name}: hosting a device is for RPC profiles"
        )
    with local_farm(rpc.device_key, threads=profile.cores, log_dir=log_dir) as farm:
        rpc = replace(rpc, tracker_host=farm.host, tracker_port=farm.tracker_port)
        yield replace(profile, measurement=replace(profile.measurement, rpc=rpc))


def tracker_state(
    host: str, port: int, key: str | None = None, timeout_s: float = 60.0
) -> dict[str, Any]:
    """A tracker's device keys, queue and servers (the worker's ``tracker_summary``); with
    ``key``, that key must have a device registered.

    Raises:
        ConfigError: the tracker does not answer, or has no device under ``key`` (naming
            the keys it has).
    """
    with TvmWorker(1) as w:
        r = w.call("tracker_summary", timeout_s=timeout_s, host=host, port=port, key=key or "*")
    if "error" in r:
        raise ConfigError(str(r["error"]).split(": ", 1)[-1])
    queue = r.get("queue", {})
    if key is not None and key not in queue:
        raise ConfigError(
            f"RPC tracker {host}:{port} has no device with key {key!r} "
            f"(registered: {', '.join(sorted(queue)) or 'none'})"
        )
    return dict(r)
