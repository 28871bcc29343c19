"""``voxfit worker`` and ``voxfit farm ...``: search workers sharing one study, the device farm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from voxfit.cli._common import CostDir, Verbose, app, console
from voxfit.cli._common import setup_logging as _setup_logging
from voxfit.errors import ConfigError

farm_app = typer.Typer(no_args_is_help=True, help="Inspect the device farm (TVM RPC tracker).")
app.add_typer(farm_app, name="farm")


@app.command()
def worker(
    study: Annotated[str, typer.Option("--study", help="The study to join (made by search).")],
    storage: Annotated[
        str,
        typer.Option(help="Optuna storage URL shared by the workers, e.g. postgresql://..."),
    ],
    trials: Annotated[
        int | None,
        typer.Option(min=1, help="The study's trial budget (default: the one it records)."),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Stop starting trials after SECONDS.")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads of this worker.")] = 1,
    work: Annotated[Path, typer.Option(help="This worker's builds, tuning, measurements.")] = Path(
        "work"
    ),
    cost_models: CostDir = Path("cost_models"),
    cost_model: Annotated[
        Path | None, typer.Option(help="A fitted cost model folder to predict with.")
    ] = None,
    margin: Annotated[
        float | None, typer.Option(help="Promotion margin (default: the study's).")
    ] = None,
    grace: Annotated[
        int, typer.Option(min=2, help="Seconds without a heartbeat before a trial is retried.")
    ] = 90,
    heartbeat: Annotated[int, typer.Option(min=1, help="Heartbeat interval, seconds.")] = 30,
    verbose: Verbose = False,
) -> None:
    """Join a study and run its trials until its budget is met (any number of workers, on
    any hosts sharing the storage; a killed worker's trial is retried once by another)."""
    from voxfit.search import run_worker

    _setup_logging(verbose)
    if grace <= heartbeat:
        raise ConfigError(f"--grace ({grace} s) must be longer than --heartbeat ({heartbeat} s)")

    def line(_st: Any, t: Any) -> None:  # an Optuna FrozenTrial (only search imports optuna)
        vals = ", ".join(f"{v:.3g}" for v in t.values) if t.values else ""
        console.print(f"trial {t.number} {t.state.name.lower()} {vals}", highlight=False)

    r = run_worker(
        storage,
        study,
        work=work,
        cost_models_dir=cost_models,
        cost_model=cost_model,
        n_trials=trials,
        margin=margin,
        timeout_s=timeout,
        threads=threads,
        grace_s=grace,
        heartbeat_s=heartbeat,
        on_trial=line,
    )
    f = r.final
    total = f"{f.done}/{f.budget} done, {f.running} running" if f else ""
    console.print(
        f"worker {r.worker}: ran {r.ran} trials ({len(r.completed)} complete, "
        f"{len(r.stopped_early)} stopped early, {len(r.failed)} failed, "
        f"{len(r.retries_run)} retries); study {study}: {total} "
        f"({r.stopped})",
        highlight=False,
        soft_wrap=True,
    )


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r} is not HOST:PORT", param_hint="--tracker")
    return host, int(port)


@farm_app.command("status")
def farm_status(
    tracker: Annotated[str, typer.Option(help="The RPC tracker, HOST:PORT.")],
    key: Annotated[
        str | None, typer.Option(help="Only this device key (error when it has no device).")
    ] = None,
) -> None:
    """The tracker's device keys (free devices, queued requests) and its registered servers."""
    from voxfit.latency import tracker_state

    host, port = _host_port(tracker)
    r = tracker_state(host, port, key)
    queue = r.get("queue", {})
    t = Table(title=f"RPC tracker {host}:{port}")
    for col in ("key", "free", "pending requests", "servers"):
        t.add_column(col, justify="left" if col in ("key", "servers") else "right")
    for k in sorted(queue):
        if key is not None and k != key:
            continue
        servers = [s["addr"] for s in r.get("servers", []) if s.get("key") == k]
        t.add_row(k, str(queue[k]["free"]), str(queue[k]["pending"]), ", ".join(servers))
    console.print(t)
    if not queue:
        console.print("no device registered", highlight=False)
