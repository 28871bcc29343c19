"""``voxfit device onboard``: a new target device from nothing (tuning on the device, a few
measurements, a transferred latency model, validated)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from voxfit.cli._common import CostDir, Preset, Verbose, console, device_app
from voxfit.cli._common import setup_logging as _setup_logging
from voxfit.cli._devices import _base_model
from voxfit.errors import ConfigError


@device_app.command("onboard")
def device_onboard(
    profile: Annotated[str, typer.Argument(help="The new device's profile (name or YAML).")],
    source: Annotated[
        str | None,
        typer.Option(help="Profile whose fitted latency model transfers (default: seed_from)."),
    ] = None,
    source_model: Annotated[
        Path | None, typer.Option(help="The source's model folder (default: the shipped one).")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=3, help="Candidates measured to fit on.")] = 20,
    validate: Annotated[
        int, typer.Option(min=0, help="Further candidates measured to validate the model.")
    ] = 10,
    tune_minutes: Annotated[
        float, typer.Option(min=0.0, help="Tuning budget on the device (minutes).")
    ] = 10.0,
    tune_models: Annotated[
        int, typer.Option(min=0, help="Candidates tuned on the device, after the base.")
    ] = 4,
    kernel_models: Annotated[
        int,
        typer.Option(
            min=0,
            help="More candidates whose kernels are tuned on the device (not timed whole): "
            "the kernel model's table.",
        ),
    ] = 20,
    space: Annotated[str, typer.Option(help="Space name or YAML path.")] = "tdnn-default",
    preset: Preset = "default",
    outputs: Annotated[int, typer.Option(help="Output units (phones + blank).")] = 55,
    checkpoint: Annotated[Path | None, typer.Option(help="Use this model's shapes.")] = None,
    serve_locally: Annotated[
        bool,
        typer.Option(
            "--serve-locally",
            help="Host the RPC device here: a tracker and a server on 127.0.0.1.",
        ),
    ] = False,
    tune_seeded: Annotated[
        bool,
        typer.Option(
            "--tune-seeded",
            help="Also tune on the device the tasks the seed profile's schedules serve.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    work: Annotated[Path, typer.Option(help="Work folder.")] = Path("work"),
    out: Annotated[
        Path | None,
        typer.Option(help="Model folder (default <work>/cost_models/<profile>/model)."),
    ] = None,
    cost_models: CostDir = Path("cost_models"),
    verbose: Verbose = False,
) -> None:
    """Onboard a device: tune on it, measure --n candidates, fit a latency model that
    transfers the source profile's, validate it on --validate more. Resumable."""
    from voxfit.cost_models._onboard import onboard
    from voxfit.hw_profiles import find_profile, load_profile
    from voxfit.spaces import find_space

    _setup_logging(verbose)
    prof = load_profile(find_profile(profile))
    src_name = source or prof.tuning.seed_from
    if not src_name:
        raise ConfigError(f"{prof.source}: no --source and no tuning.seed_from to transfer from")
    src = load_profile(find_profile(src_name))
    sp = find_space(space)
    base = _base_model(sp.model, preset, outputs, checkpoint)
    bound = sp.bind(base.structure())
    with ExitStack() as stack:
        if serve_locally:
            from voxfit.latency import hosted

            prof = stack.enter_context(hosted(prof, work / "devices" / prof.name))
            assert prof.measurement.rpc is not None
            rpc = prof.measurement.rpc
            console.print(
                f"hosting {rpc.device_key!r}: tracker {rpc.tracker_host}:{rpc.tracker_port}, "
                f"logs in {work / 'devices' / prof.name}"
            )
        report = onboard(
            base, bound, prof, work=work, cost_models_dir=cost_models, source=src,
            source_model=source_model, n_shot=n, validate=validate,
            tune_budget_s=tune_minutes * 60, tune_models=tune_models, seed=seed, out=out,
            tune_seeded=tune_seeded, kernel_models=kernel_models,
        )  # fmt: skip
    t = Table(title=f"onboarded {prof.name} from {src.name}'s model")
    for col in ("model", "within 10%", "MAPE", "Spearman", "n"):
        t.add_column(col)
    rows = [
        ("transfer", report.heldout),
        ("kernels", report.heldout_kernels),
        *report.scratch.items(),
    ]
    for name, m in rows:
        if m:
            t.add_row(
                name if name in ("transfer", "kernels") else f"scratch: {name}",
                f"{m['within_10pct']:.0%}", f"{m['mape']:.1%}", f"{m['spearman']:.3f}",
                f"{int(m['n'])}",
            )  # fmt: skip
    console.print(t)
    spent = ", ".join(f"{k} {v / 60:.1f}" for k, v in report.seconds.items())
    console.print(
        f"spent {report.minutes:.1f} min ({spent}); tuned {report.tuned_tasks} tasks of "
        f"{report.tuned_candidates} models on the device; {report.n_shot} samples fitted, "
        f"{report.n_validate} validated, {report.failed} failed -> {report.model_dir}"
    )
    console.print(
        f"search it: voxfit search --profile {profile} --cost-model {report.model_dir} ..."
    )


@device_app.command("time-kernels")
def device_time_kernels(
    profile: Annotated[str, typer.Argument(help="A local profile (name or YAML).")],
    work: Annotated[Path, typer.Option(help="Work folder (its tuning/<profile> too).")] = Path(
        "work"
    ),
    cost_models: CostDir = Path("cost_models"),
    verbose: Verbose = False,
) -> None:
    """Time on this host the schedules a local profile's tuning databases pick for each of
    their kernels (a few minutes, resumable), so that a search here calibrates the profile's
    latency model (fitted on another host) by kernels: each candidate predicted as the sum of
    its kernels' times here, scaled on the first few measurements."""
    from voxfit.cost_models._host_kernels import time_kernels_here
    from voxfit.hw_profiles import describe_host, find_profile, load_profile

    _setup_logging(verbose)
    prof = load_profile(find_profile(profile))
    r = time_kernels_here(prof, work=work, cost_models_dir=cost_models)
    console.print(
        f"{prof.name} on {describe_host().label}: {r.timed} kernels timed now, {r.skipped} "
        f"before, {len(r.errors)} not timed, of {r.total}, in {r.seconds / 60:.1f} min "
        f"-> {r.directory}"
    )
    for e in r.errors[:5]:
        console.print(f"[yellow]not timed: {e}")


@device_app.command("host")
def device_host(
    profile: Annotated[str, typer.Argument(help="An RPC profile (name or YAML).")],
    servers: Annotated[int, typer.Option(min=1, help="RPC servers under the key.")] = 1,
    work: Annotated[Path, typer.Option(help="Work folder (logs under devices/).")] = Path("work"),
) -> None:
    """Host an RPC profile's device on this machine: a TVM tracker on the profile's port
    and RPC servers under its key, on 127.0.0.1, until Ctrl-C (for a search or onboarding
    in another terminal)."""
    import time

    from voxfit.hw_profiles import find_profile, load_profile
    from voxfit.latency import local_farm

    prof = load_profile(find_profile(profile))
    rpc = prof.measurement.rpc
    if prof.measurement.method != "rpc" or rpc is None:
        raise ConfigError(f"{prof.source}: measurement.method: device host is for RPC profiles")
    if rpc.tracker_host not in ("127.0.0.1", "localhost"):
        raise ConfigError(
            f"{prof.source}: measurement.rpc.tracker_host: {rpc.tracker_host} is not this "
            "machine (127.0.0.1)"
        )
    logs = work / "devices" / prof.name
    with local_farm(
        rpc.device_key, servers=servers, threads=prof.cores, log_dir=logs, port=rpc.tracker_port
    ):
        console.print(
            f"hosting {rpc.device_key!r} ({servers} server(s)): tracker 127.0.0.1:"
            f"{rpc.tracker_port}, logs in {logs}; Ctrl-C stops"
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopped")
