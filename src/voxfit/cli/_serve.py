"""``voxfit serve``: the job API over HTTP, and the job runners that execute its jobs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from voxfit.cli._common import CostDir, Verbose, app, err, setup_logging


@app.command("serve")
def serve_cmd(
    host: Annotated[
        str, typer.Option(help="Address to listen on (plain HTTP: keep it local).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port (0: any free one; see WORK/service/url).")
    ] = 8765,
    work: Annotated[
        Path, typer.Option(help="Work folder: WORK/service/ holds token, key, jobs, studies.")
    ] = Path("work"),
    runners: Annotated[
        int, typer.Option(min=0, help="Runner processes started beside the API (0: none).")
    ] = 1,
    run_jobs: Annotated[
        bool,
        typer.Option(
            "--run-jobs", help="Be a job runner only (no API): claim and run queued jobs."
        ),
    ] = False,
    until_empty: Annotated[
        bool, typer.Option("--until-empty", help="With --run-jobs: stop when the queue is empty.")
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            envvar="VOXFIT_SERVICE_STORAGE",
            help="Optuna storage of the jobs' studies; default WORK/service/studies.db "
            "(a URL with a password: better in $VOXFIT_SERVICE_STORAGE than on a command line).",
        ),
    ] = None,
    cost_models: CostDir = Path("cost_models"),
    verbose: Verbose = False,
) -> None:
    """Run the job API (token in WORK/service/token, made 0600 at first start) with RUNNERS
    job runners; or, with --run-jobs, one runner for a service on the same WORK folder."""
    from voxfit.service import RunnerSettings, ServicePaths, serve
    from voxfit.service import run_jobs as runner_loop

    setup_logging(verbose)
    paths = ServicePaths(work.resolve())
    url = storage or paths.default_storage()
    if run_jobs:
        n = runner_loop(RunnerSettings(paths, url, cost_models.resolve()), until_empty=until_empty)
        err.print(f"runner done: {n} job(s)", highlight=False)
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(
            f"[yellow]warning:[/] listening on {host}: the token crosses the network in plain "
            "HTTP; put a TLS proxy in front",
            highlight=False,
        )
    command = [
        sys.executable, "-m", "voxfit.cli", "serve", "--run-jobs",
        "--work", str(paths.work), "--cost-models", str(cost_models.resolve()),
    ] + (["--verbose"] if verbose else [])  # fmt: skip
    # the storage URL (maybe with a password) goes by environment, not in `ps` output
    env = {"VOXFIT_SERVICE_STORAGE": url}
    serve(paths, host=host, port=port, runners=runners, runner_command=command, runner_env=env)
