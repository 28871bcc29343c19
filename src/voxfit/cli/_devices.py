"""``voxfit profile ...`` and ``voxfit cost-model ...``: a device's profile and its latency
model (collect measurements into the work folder's store, fit)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from voxfit.cli._common import (
    CostDir,
    Preset,
    ProfileOpt,
    Verbose,
    console,
    cost_app,
    profile_app,
)
from voxfit.cli._common import setup_logging as _setup_logging
from voxfit.errors import ConfigError


@profile_app.command("check")
def profile_check(
    file: Annotated[Path, typer.Argument(help="Profile YAML (or a name in hw_profiles/).")],
    tvm: Annotated[
        bool, typer.Option("--tvm/--no-tvm", help="Also let TVM parse the target (~10 s).")
    ] = True,
) -> None:
    """Validate a hardware profile and explain what voxfit will do with it."""
    from voxfit.hw_profiles import explain, find_profile, host_runs, load_profile

    profile = load_profile(find_profile(file))
    t = Table(title=f"{profile.source}: valid", show_header=False)
    t.add_column("setting", style="bold")
    t.add_column("meaning")
    for k, v in explain(profile):
        t.add_row(k, v)
    ok, why = host_runs(profile)
    t.add_row("this machine", ("runs this target: " if ok else "cannot run this target: ") + why)
    if tvm:
        from voxfit.compile import TvmWorker

        with TvmWorker(1) as w:
            r = w.call("check_target", timeout_s=120, profile=profile.to_dict())
        if "error" in r:
            raise ConfigError(f"{profile.source}: target: TVM rejects it: {r['error']}")
        t.add_row("TVM target", r["target"])
    console.print(t)


@profile_app.command("publish-tuning")
def profile_publish_tuning(
    profile: Annotated[str, typer.Argument(help="Profile name or YAML.")],
    work: Annotated[
        Path, typer.Option(help="Work folder whose tuning/<profile> database to publish.")
    ] = Path("work"),
    into: Annotated[
        Path | None,
        typer.Option(help="Target database folder; default the profile's shipped one."),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Best records kept per task.")] = 4,
    from_dir: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Publish this tuning database folder instead of the work folder's "
            "(e.g. a benchmark's longer tuning).",
        ),
    ] = None,
    improve: Annotated[
        bool,
        typer.Option(
            "--improve",
            help="Also add records faster than the best of tasks the target already has.",
        ),
    ] = False,
    cost_models: CostDir = Path("cost_models"),
) -> None:
    """Copy the best records of the tasks your work folder tuned into the profile's shipped
    database (cost_models/<profile>/tuning), so a fresh checkout compiles them warm; tasks
    it has records of are left as they are (--improve: given the faster records)."""
    from voxfit.compile import default_tuning_dir, publish
    from voxfit.hw_profiles import find_profile, load_profile

    prof = load_profile(find_profile(profile))
    src = from_dir or default_tuning_dir(work, prof)
    if not (src / "database_workload.json").is_file():
        raise ConfigError(f"{src}: no tuning database here (run a search or a collection)")
    dst = into or prof.database_dir(cost_models)
    try:
        r = publish(src, dst, top_k, improve=improve)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kept = (
        f"{r.improved} of the {r.already_there} tasks it had records of given faster ones"
        if improve
        else f"{r.already_there} tasks it had records of left as they were"
    )
    console.print(
        f"{dst}: {r.workloads_added} tasks added with {r.records_added} records (best "
        f"{top_k} each); {kept}"
    )


def _base_model(space_kind: str, preset: str, outputs: int, checkpoint: Path | None):  # type: ignore[no-untyped-def]
    from voxfit.models import build_model, default_config
    from voxfit.train import load_checkpoint

    if checkpoint is not None:
        return load_checkpoint(checkpoint).model.eval()
    if preset not in ("tiny", "default"):
        raise ConfigError(f"--preset: {preset!r} is not tiny or default")
    return build_model(default_config(space_kind, outputs, preset)).eval()  # type: ignore[arg-type]


@cost_app.command("collect")
def cost_collect(
    profile: ProfileOpt,
    n: Annotated[int, typer.Option("--n", min=1, help="Candidates to sample.")] = 50,
    levelled: Annotated[
        int,
        typer.Option(
            min=0, help="More candidates with per-candidate levels (the space's corners)."
        ),
    ] = 0,
    space: Annotated[str, typer.Option(help="Space name or YAML path.")] = "tdnn-default",
    preset: Preset = "default",
    outputs: Annotated[int, typer.Option(help="Output units (phones + blank).")] = 55,
    checkpoint: Annotated[Path | None, typer.Option(help="Use this model's shapes.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    all_inputs: Annotated[
        bool, typer.Option("--all-inputs", help="Every input of the profile, not the first.")
    ] = False,
    work: Annotated[
        Path, typer.Option(help="Work folder: builds, and the measurements under measurements/.")
    ] = Path("work"),
    cost_models: CostDir = Path("cost_models"),
    verbose: Verbose = False,
) -> None:
    """Compile and measure sampled candidates into <work>/measurements/<profile>/ (the
    shipped dataset is only read, to skip what it already holds)."""
    from voxfit.compile import default_tuning_dir
    from voxfit.cost_models import collect, measurements_dir
    from voxfit.hw_profiles import find_profile, load_profile
    from voxfit.spaces import find_space

    _setup_logging(verbose)
    prof = load_profile(find_profile(profile))
    sp = find_space(space)
    base = _base_model(sp.model, preset, outputs, checkpoint)
    bound = sp.bind(base.structure())
    store = measurements_dir(prof, work)
    out = collect(
        base,
        bound,
        prof,
        n,
        work_dir=work / "cost-collect" / prof.name,
        store=store,
        cost_models_dir=cost_models,
        tuning_dir=default_tuning_dir(work, prof),
        inputs=prof.inputs if all_inputs else None,
        seed=seed,
        levelled=levelled,
    )
    console.print(
        f"stored {out['stored']} measurements ({out['failed']} failed, {out['skipped']} "
        f"already measured) in {out['minutes']:.1f} min -> {store}; "
        f"fit with: voxfit cost-model fit --profile {profile} --extra {store}"
    )


def _extra_folders(extra: list[Path]) -> list[Path]:
    """``--extra`` folders, each checked to hold measurements."""
    from voxfit.cost_models import MeasurementStore

    for d in extra:
        if not d.is_dir():
            raise ConfigError(f"--extra {d}: no such folder")
        if not (d / "models.parquet").exists() and not MeasurementStore(d).files():
            raise ConfigError(
                f"--extra {d}: no measurements here (expected the files of cost-model "
                "collect or a search, <work>/measurements/<profile>/, or a models.parquet)"
            )
    return extra


@cost_app.command("fit")
def cost_fit(
    profile: ProfileOpt,
    test_frac: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Candidates held out for validation.")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Split and xgboost seed.")] = 0,
    cost_models: CostDir = Path("cost_models"),
    extra: Annotated[
        list[Path] | None,
        typer.Option(
            "--extra",
            help="More measurements (e.g. <work>/measurements/<profile>); repeatable.",
        ),
    ] = None,
    work: Annotated[Path, typer.Option(help="Work folder (default model location).")] = Path(
        "work"
    ),
    out: Annotated[
        Path | None,
        typer.Option(help="Save the model here; default <work>/cost_models/<profile>/model."),
    ] = None,
    dataset_out: Annotated[
        Path | None,
        typer.Option(help="Also write the merged dataset here as parquet (to refresh one)."),
    ] = None,
    shipped: Annotated[
        bool,
        typer.Option(
            "--shipped/--no-shipped",
            help="Include the shipped dataset (--no-shipped: only --extra, e.g. measurements "
            "of libraries the shipped rows predate).",
        ),
    ] = True,
) -> None:
    """Fit the profile's cost model (xgboost + roofline baseline) on the shipped dataset plus
    any --extra measurements, and save it (never into the shipped tree unless --out says so)."""
    from voxfit.cost_models import (
        MeasurementStore,
        dataset_dir,
        evaluate,
        fit,
        fitted_model_dir,
        load_dataset,
        measurements_dir,
        metrics_table,
        split,
        write_dataset,
    )
    from voxfit.hw_profiles import find_profile, load_profile

    prof = load_profile(find_profile(profile))
    shipped_dir = dataset_dir(prof, cost_models)
    extras = _extra_folders(extra or [])
    if not shipped and not extras:
        raise ConfigError("--no-shipped: name the measurements to fit on with --extra")
    models, tasks = load_dataset(*([shipped_dir] if shipped else []), *extras)
    if models.empty:
        raise ConfigError(
            f"{shipped_dir}: no dataset, and no --extra measurements (run cost-model collect)"
        )
    mine = measurements_dir(prof, work)
    if mine.resolve() not in {e.resolve() for e in extras} and MeasurementStore(mine).files():
        console.print(f"note: {mine} holds measurements not used here (add --extra {mine})")
    train_ids, test_ids = split(models, test_frac, seed)
    tr = models[models["cand"].isin(train_ids)]
    cm = fit(tr, tasks[tasks["cand"].isin(train_ids)], prof, seed=seed)
    if test_ids:
        te = models[models["cand"].isin(test_ids)]
        m, _ = evaluate(cm, te, tasks[tasks["cand"].isin(test_ids)], prof)
        cm.card["metrics"] = {"held_out": m, "n_test": len(te)}
        title = f"cost model {prof.name}: {len(tr)} train, {len(test_ids)} held out"
        console.print(metrics_table(title, m))
    # the saved model is refitted on every candidate; its card keeps the held-out figures
    full = fit(models, tasks, prof, seed=seed)
    full.card["metrics"] = cm.card["metrics"]
    d = full.save(out or fitted_model_dir(prof, work))
    console.print(f"saved {d}/model.json and card.yaml ({len(models)} candidates)")
    if dataset_out is not None:
        console.print(f"wrote the merged dataset to {write_dataset(models, tasks, dataset_out)}")
