"""``voxfit device qemu-server``: an aarch64 TVM RPC server under qemu-user, a device this
machine can host."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from voxfit.cli._common import Verbose, console, device_app
from voxfit.cli._common import setup_logging as _setup_logging
from voxfit.errors import VoxfitError


@device_app.command("qemu-server")
def device_qemu_server(
    tracker_host: Annotated[str, typer.Option(help="The RPC tracker's host.")] = "127.0.0.1",
    tracker_port: Annotated[
        int, typer.Option(min=1, max=65535, help="The RPC tracker's port.")
    ] = 9193,
    key: Annotated[str, typer.Option(help="Device key to register under.")] = "qemu-aarch64",
    host: Annotated[
        str, typer.Option(help="Address the server listens on (0.0.0.0: other hosts).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="First port to try; the next 100 follow.")
    ] = 9090,
    threads: Annotated[int, typer.Option(min=1, help="TVM threads on the device.")] = 1,
    setup: Annotated[
        bool,
        typer.Option("--setup", help="Install what is missing first (qemu-user, python, wheels)."),
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="The aarch64 environment's folder "
            "(default: $VOXFIT_QEMU_AARCH64 or ~/.cache/voxfit/qemu-aarch64)."
        ),
    ] = None,
    log: Annotated[
        Path | None, typer.Option(help="The server's log file (default: this terminal).")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Host an emulated aarch64 device: TVM's RPC server under qemu-aarch64, registered with
    the tracker under --key, until Ctrl-C. Timings on it are not latency (emulation)."""
    from voxfit.latency._qemu import (
        setup_qemu_aarch64,
        start_qemu_rpc_server,
        stop_server,
        wait_registered,
    )

    _setup_logging(verbose)
    env = setup_qemu_aarch64(cache_dir, install=setup)
    proc = start_qemu_rpc_server(
        env, tracker_host, tracker_port, key, host=host, port=port, port_end=port + 100,
        threads=threads, log_file=log,
    )  # fmt: skip
    console.print(
        f"started the qemu-aarch64 RPC server (pid {proc.pid}, python {env.python}): key "
        f"{key!r}, tracker {tracker_host}:{tracker_port}, listening on {host}:{port}+"
        + (f", log {log}" if log else ""),
        highlight=False,
        soft_wrap=True,
    )
    try:
        wait_registered(proc, tracker_host, tracker_port, key)
        console.print(
            f"registered with tracker {tracker_host}:{tracker_port}; Ctrl-C stops it",
            highlight=False,
            soft_wrap=True,
        )
        code = proc.wait()
    except KeyboardInterrupt:
        console.print("stopping the qemu-aarch64 RPC server")
        return
    finally:
        stop_server(proc)
    raise VoxfitError(f"the qemu-aarch64 RPC server exited with {code}")
