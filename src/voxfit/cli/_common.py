"""What every ``voxfit`` command shares: the typer apps, consoles, logging, option types."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

HELP = (
    "voxfit: hardware-aware compression search for personalizable speech models, one target "
    "device at a time. User errors print one line and exit 2."
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
data_app = typer.Typer(no_args_is_help=True, help="Make or inspect the speech corpus.")
app.add_typer(data_app, name="data")
profile_app = typer.Typer(no_args_is_help=True, help="Inspect hardware profiles.")
app.add_typer(profile_app, name="profile")
cost_app = typer.Typer(no_args_is_help=True, help="Collect latency data and fit cost models.")
app.add_typer(cost_app, name="cost-model")
device_app = typer.Typer(
    no_args_is_help=True, help="Bring up a new target device: onboard it, host emulated ones."
)
app.add_typer(device_app, name="device")
console = Console()
err = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
        force=True,
    )


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
Preset = Annotated[str, typer.Option(help="Size preset: tiny (tests) or default.")]
ProfileOpt = Annotated[str, typer.Option("--profile", help="Profile name or YAML path.")]
CostDir = Annotated[Path, typer.Option("--cost-models", help="Cost-model root.")]
