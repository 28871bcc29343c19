"""The ``voxfit`` command line (typer). User errors print one line and exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from voxfit.cli import (
    _devices,  # noqa: F401 - registers `voxfit profile` / `cost-model`
    _onboard,  # noqa: F401 - registers `voxfit device onboard`
    _qemu,  # noqa: F401 - registers `voxfit device qemu-server`
    _serve,  # noqa: F401 - registers `voxfit serve` (the job API)
    _trust,  # noqa: F401 - registers `voxfit keygen` / `audit`
    _workers,  # noqa: F401 - registers `voxfit worker` / `farm`
)
from voxfit.cli._common import (
    CostDir,
    Preset,
    Verbose,
    app,
    console,
    data_app,
    err,
)
from voxfit.cli._common import setup_logging as _setup_logging
from voxfit.errors import ConfigError, VoxfitError

if TYPE_CHECKING:
    from voxfit.data import Manifest
    from voxfit.hw_profiles import HardwareProfile
    from voxfit.train import FoundationReport

__all__ = ["app", "main", "print_report"]


@data_app.command("make")
def data_make(
    preset: Preset = "default",
    out: Annotated[
        Path, typer.Option(help="Folder for corpora (one subfolder per settings hash).")
    ] = Path("work/corpus"),
    seed: Annotated[int, typer.Option(help="Corpus seed.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Parallel synthesis processes.")] = 2,
    verbose: Verbose = False,
) -> None:
    """Synthesize the multi-speaker corpus (cached by a hash of its settings; resumable)."""
    from voxfit.data import load_manifest, make_corpus
    from voxfit.data import preset as corpus_preset

    _setup_logging(verbose)
    manifest_path = make_corpus(corpus_preset(preset, seed), out, workers=workers)
    _print_corpus(load_manifest(manifest_path))
    console.print(f"manifest: {manifest_path}")


def _print_corpus(manifest: Manifest) -> None:
    from voxfit.data import SPLITS

    t = Table(title=f"corpus {manifest.source.parent.name}")
    for col in ("split", "speakers", "utterances", "hours"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for s in SPLITS:
        utts = manifest.split(s)
        hours = sum(u.duration_s for u in utts) / 3600
        t.add_row(s, str(len(manifest.speakers(s))), str(len(utts)), f"{hours:.2f}")
    console.print(t)


def _resolve_manifest(manifest: Path | None, preset: str, corpus_dir: Path) -> Path:
    from voxfit.data import make_corpus
    from voxfit.data import preset as corpus_preset

    if manifest is not None:
        return manifest
    return make_corpus(corpus_preset(preset), corpus_dir)


@app.command()
def train(
    preset: Preset = "default",
    model: Annotated[
        str,
        typer.Option(help="Model: tdnn, conformer, or your factory package.module:function."),
    ] = "tdnn",
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="Your own corpus manifest (JSONL); default: the preset's synthesized corpus."
        ),
    ] = None,
    corpus_dir: Annotated[Path, typer.Option(help="Where `voxfit data make` put corpora.")] = Path(
        "work/corpus"
    ),
    out: Annotated[Path, typer.Option(help="Folder for models and feature caches.")] = Path(
        "work/models"
    ),
    max_minutes: Annotated[float | None, typer.Option(help="Cap on training wall time.")] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Override the preset's epochs.")
    ] = None,
    elastic: Annotated[
        bool,
        typer.Option(
            "--elastic",
            help="Then train it into an elastic (once-for-all) supernet over the widths of "
            "--space: a search's candidates inherit its weights, no distillation.",
        ),
    ] = False,
    space: Annotated[
        str | None,
        typer.Option(
            help="Space whose widths the elastic model learns (with --elastic); default: "
            "<model>-default."
        ),
    ] = None,
    elastic_minutes: Annotated[
        float | None, typer.Option(help="Cap on the elastic phase's wall time.")
    ] = None,
    elastic_epochs: Annotated[
        int | None, typer.Option(min=1, help="Override the elastic phase's epochs.")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Train the base model (cached), then report dev PER and per-speaker adaptation gain;
    with --elastic, also the elastic supernet (cached), reported at its full width."""
    from dataclasses import replace

    from voxfit.data import load_manifest
    from voxfit.train import (
        adapt_preset,
        evaluate_cached,
        feature_store,
        load_checkpoint,
        train_cached,
        train_preset,
    )

    _setup_logging(verbose)
    from voxfit.models import check_model_ref

    try:
        check_model_ref(model)
    except ConfigError as e:
        raise typer.BadParameter(str(e).split(": ", 1)[-1], param_hint="--model") from None
    man = load_manifest(_resolve_manifest(manifest, preset, corpus_dir))
    store = feature_store(man, out / "features", model, preset)
    cfg = train_preset(preset)
    if max_minutes is not None:
        cfg = replace(cfg, max_minutes=max_minutes)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    path = train_cached(man, store, model, preset, cfg, out)
    console.print(f"checkpoint: {path}")
    if elastic:
        from voxfit.compress import elastic_for_space
        from voxfit.spaces import find_space

        structure = load_checkpoint(path).model.structure()  # type: ignore[operator]
        bound = find_space(space or f"{model}-default").bind(structure)
        path = elastic_for_space(
            path, man, store, bound, preset, max_minutes=elastic_minutes, epochs=elastic_epochs
        )
        console.print(f"elastic checkpoint: {path}")
    report = evaluate_cached(load_checkpoint(path), man, store, adapt_preset(preset))
    print_report(report)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt written by `voxfit train`.")],
    manifest: Annotated[Path, typer.Option(help="Corpus manifest with dev/adapt/eval splits.")],
    preset: Annotated[str, typer.Option(help="Adaptation preset: tiny or default.")] = "default",
    out: Annotated[Path, typer.Option(help="Folder for the feature cache.")] = Path("work/models"),
    verbose: Verbose = False,
) -> None:
    """Dev PER and per held-out speaker PER before/after adapter-only adaptation."""
    from voxfit.data import load_manifest
    from voxfit.train import adapt_preset, evaluate_cached, feature_store, load_checkpoint

    _setup_logging(verbose)
    man = load_manifest(manifest)
    ckpt = load_checkpoint(checkpoint)
    store = feature_store(man, out / "features", ckpt.model, preset)
    report = evaluate_cached(ckpt, man, store, adapt_preset(preset))
    print_report(report)


@app.command("sensitivity")
def sensitivity_cmd(
    preset: Preset = "default",
    model: Annotated[str, typer.Option(help="Model family member: tdnn or conformer.")] = "tdnn",
    corpus_dir: Annotated[Path, typer.Option(help="Where `voxfit data make` put corpora.")] = Path(
        "work/corpus"
    ),
    out: Annotated[Path, typer.Option(help="Folder for models and feature caches.")] = Path(
        "work/models"
    ),
    report_dir: Annotated[Path, typer.Option(help="Where the table and heatmap go.")] = Path(
        "work/sensitivity"
    ),
    keep_ratios: Annotated[
        str, typer.Option(help="Comma-separated keep ratios.")
    ] = "0.75,0.5,0.25",
    weight_bits: Annotated[str, typer.Option(help="Comma-separated weight bit-widths.")] = "8,4",
    channel_multiple: Annotated[int, typer.Option(min=1)] = 8,
    full: Annotated[bool, typer.Option(help="Full adaptation measurement (slow).")] = False,
    verbose: Verbose = False,
) -> None:
    """Per layer/group: dev PER and post-adaptation PER when only it is compressed."""
    from voxfit.compress import SensitivityConfig, save_sensitivity, sensitivity
    from voxfit.data import load_manifest
    from voxfit.train import (
        adapt_preset,
        feature_store,
        load_checkpoint,
        train_cached,
        train_preset,
    )

    _setup_logging(verbose)
    try:
        ratios = tuple(float(x) for x in keep_ratios.split(","))
        bits = tuple(int(x) for x in weight_bits.split(","))
    except ValueError:
        raise typer.BadParameter("expected comma-separated numbers") from None
    man = load_manifest(_resolve_manifest(None, preset, corpus_dir))
    store = feature_store(man, out / "features", model, preset)
    ckpt = load_checkpoint(train_cached(man, store, model, preset, train_preset(preset), out))
    table = sensitivity(
        ckpt.model,
        man,
        store,
        ckpt.inventory,
        adapt_preset(preset),
        SensitivityConfig(ratios, bits, channel_multiple, full),
    )
    for p in save_sensitivity(table, report_dir):
        console.print(f"wrote {p}")
    worst = table.sort_values("post_adapt_per_delta", ascending=False).head(8)
    t = Table(title="most sensitive for personalization (post-adaptation PER change)")
    for col in ("layer/group", "setting", "dev PER +", "post-adapt PER +"):
        t.add_column(
            col, justify="left" if col != "dev PER +" and col != "post-adapt PER +" else "right"
        )
    for r in worst.itertuples():
        t.add_row(
            str(r.name),
            str(r.setting),
            f"{r.dev_per_delta:+.2f}",
            f"{r.post_adapt_per_delta:+.2f}",
        )
    console.print(t)


def print_report(report: FoundationReport) -> None:
    """The foundation figures as two tables: per speaker and summary."""
    t = Table(title="held-out speakers: PER (%) on their eval set")
    for col in ("speaker", "adapt utts", "eval utts", "before", "after", "relative gain"):
        t.add_column(col, justify="left" if col == "speaker" else "right")
    for r in report.speakers:
        gain = (r.per_before - r.per_after) / r.per_before if r.per_before else 0.0
        t.add_row(
            r.speaker,
            str(r.n_adapt),
            str(r.n_eval),
            f"{r.per_before:.2f}",
            f"{r.per_after:.2f}",
            f"{100 * gain:.1f}%",
        )
    console.print(t)
    s = Table(title="foundation summary")
    s.add_column("figure")
    s.add_column("value", justify="right")
    for name, value in (
        ("dev PER (%)", f"{report.dev_per:.2f}"),
        ("held-out PER before adaptation (%, mean)", f"{report.heldout_per_before:.2f}"),
        ("held-out PER after adaptation (%, mean)", f"{report.heldout_per_after:.2f}"),
        ("relative PER reduction", f"{100 * report.relative_reduction:.1f}%"),
        (
            "adapter params / base params",
            f"{report.adapter_params} / {report.n_params} "
            f"({100 * report.adapter_param_fraction:.2f}%)",
        ),
        ("train minutes", f"{report.train_minutes:.1f}"),
        ("adaptation seconds (all speakers)", f"{report.adapt_seconds:.0f}"),
        (
            "training / held-out speakers",
            f"{report.n_train_speakers} / {report.n_heldout_speakers}",
        ),
    ):
        s.add_row(name, value)
    console.print(s)


Storage = Annotated[
    str, typer.Option(help="Optuna storage URL (SQLite file by default; any RDB URL works).")
]
StudyName = Annotated[str | None, typer.Option("--study", help="Study name.")]
DEFAULT_STORAGE = "sqlite:///work/search/voxfit.db"


def _load_study(storage: str, study: str | None):  # type: ignore[no-untyped-def]
    from voxfit.search import load_study

    return load_study(storage, study)


def _duration(text: str | None) -> float | None:
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError as e:
        raise ConfigError(f"--timeout: {text!r} is not a duration like 90s, 20m or 1h") from e


@app.command()
def search(
    space: Annotated[
        str | None,
        typer.Option(help="Space name (spaces/) or YAML path; default: <model>-default."),
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="Profile name or YAML; default: this CPU's local one.")
    ] = None,
    trials: Annotated[
        int, typer.Option(min=1, help="Finished trials the study should have.")
    ] = 30,
    timeout: Annotated[str | None, typer.Option(help="Stop after this long (e.g. 20m).")] = None,
    storage: Storage = DEFAULT_STORAGE,
    study: StudyName = None,
    sampler: Annotated[str, typer.Option(help="tpe (default), nsga2 or random.")] = "tpe",
    seed: Annotated[int, typer.Option(help="Sampler and recovery seed.")] = 0,
    margin: Annotated[
        float, typer.Option(help="Measure for real when predicted within this of the front.")
    ] = 0.10,
    preset: Preset = "default",
    model: Annotated[
        str | None,
        typer.Option(
            help="tdnn, conformer or a factory package.module:function; default: the "
            "space's model."
        ),
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Your own corpus manifest; default: the preset's.")
    ] = None,
    work: Annotated[Path, typer.Option(help="Corpus, models and builds.")] = Path("work"),
    cost_models: CostDir = Path("cost_models"),
    cost_model: Annotated[
        Path | None,
        typer.Option(help="A fitted cost model folder (`cost-model fit` output) to predict with."),
    ] = None,
    peer: Annotated[
        bool,
        typer.Option(
            "--peer/--no-peer",
            help="Time onnxruntime's static int8 of the base once per study (local "
            "profiles), so the front shows its speed-up over that peer.",
        ),
    ] = True,
    early_stop: Annotated[
        bool,
        typer.Option(
            "--early-stop/--no-early-stop",
            help="Stop a trial before adaptation when even its best case (cost-model "
            "latency, PER before adaptation less the study's largest gain) is dominated by "
            "the front (PRUNED; needs a cost model).",
        ),
    ] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Search this trained model (`voxfit train` output, plain or elastic) "
            "instead of the preset's base."
        ),
    ] = None,
    elastic: Annotated[
        bool,
        typer.Option(
            "--elastic",
            help="Search an elastic supernet of the base over the space's widths (trained "
            "once and cached): candidates inherit its weights instead of distilling.",
        ),
    ] = False,
    elastic_minutes: Annotated[
        float | None,
        typer.Option(help="Cap on training the elastic supernet (with --elastic)."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Run (or resume) a multi-objective search for one hardware profile."""
    from voxfit.compress import elastic_for_space, elastic_widths
    from voxfit.hw_profiles import find_profile, load_profile, pick_local_profile
    from voxfit.search import EarlyStop, SearchContext, SearchSettings, front_table, run_search
    from voxfit.spaces import find_space
    from voxfit.structure import is_factory

    _setup_logging(verbose)
    prof = load_profile(find_profile(profile)) if profile else pick_local_profile()
    if space is None and model is not None and is_factory(model):
        raise ConfigError(
            f"--space: {model} is your own model: name a space YAML over its declared groups"
        )
    sp = find_space(space or f"{model or 'tdnn'}-default")
    if model is not None and sp.model != model:
        raise ConfigError(f"{sp.source}: model: {sp.model} but --model is {model}")
    model = sp.model
    from voxfit.models import build_named

    if preset not in ("tiny", "default"):
        raise ConfigError(f"--preset: {preset!r} is not tiny or default")
    # fail fast on a space that names layers the model lacks (before corpus and training)
    sp.bind(build_named(model, 2, preset).structure())  # type: ignore[operator]
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(f"--checkpoint: {checkpoint} is not a file")
    if peer and prof.measurement.method == "local":  # before anything imports onnxruntime
        _peer_at_profile_isa(prof)
    ctx = SearchContext.prepare(
        preset=preset, model=model, work=work, manifest=manifest, checkpoint=checkpoint
    )
    bound = sp.bind(ctx.base.structure())  # type: ignore[operator]
    if elastic and elastic_widths(ctx.base) is None:
        path = elastic_for_space(
            ctx.checkpoint, ctx.manifest, ctx.store, bound, preset, max_minutes=elastic_minutes
        )
        console.print(f"elastic checkpoint: {path}")
        ctx = ctx.with_checkpoint(path)
    name = study or f"{prof.name}-{sp.name}-{preset}"
    settings = SearchSettings(
        profile=prof,
        space=bound,
        storage=storage,
        study_name=name,
        n_trials=trials,
        timeout_s=_duration(timeout),
        sampler=sampler,
        seed=seed,
        margin=margin,
        work=work,
        cost_models_dir=cost_models,
        cost_model=cost_model,
        measure_peer=peer,
        early_stop=EarlyStop() if early_stop else None,
    )
    st = run_search(settings, ctx)
    _print_front(front_table(st), f"Pareto front of {name} ({prof.name})")
    console.print(f"study {name} in {storage}; review: voxfit report --study {name}")


def _peer_at_profile_isa(prof: HardwareProfile) -> None:
    """Restrict this process's CPUID to the profile's mcpu before onnxruntime is imported,
    so the peer runs the kernels the profile's device would (on a VNNI host, an AVX2
    profile's peer runs AVX2 kernels, as TVM's code does). Where that cannot be done the
    search goes on and the peer records the ISA it ran at."""
    from voxfit.latency import restrict_cpuid

    try:
        hidden = restrict_cpuid(prof.target)
    except VoxfitError as e:
        console.print(f"[yellow]peer at the host's ISA, not {prof.name}'s: {e}")
        return
    if hidden:
        console.print(f"peer at {prof.name}'s ISA: CPUID hides {', '.join(hidden)}")


def _print_front(rows: list[dict], title: str) -> None:  # type: ignore[type-arg]
    t = Table(title=title)
    peer = any(r.get("vs_peer") for r in rows)
    cols = ("trial", "latency ms", "source", "dev PER", "post-adapt PER", "MB", "baseline")
    for col in (*cols, "x ORT int8 base") if peer else cols:
        t.add_column(col, justify="right")
    for r in rows:
        cells = [
            str(r["trial"]),
            f"{r['latency_ms']:.2f}",
            str(r.get("latency_source", "")),
            f"{r['dev_per']:.2f}",
            f"{r['post_adapt_per']:.2f}",
            f"{r['size_mb']:.2f}" if r.get("size_mb") is not None else "",
            str(r.get("baseline") or ""),
        ]
        if peer:
            cells.append(f"{r['vs_peer']:.2f}" if r.get("vs_peer") else "")
        t.add_row(*cells)
    console.print(t)
    if peer:
        console.print(
            "x ORT int8 base: the point's speed-up over onnxruntime's static int8 of the base "
            "model (timed back to back with the base's TVM library on this machine)",
            highlight=False,
        )


@app.command("export")
def export_cmd(
    study: StudyName = None,
    trial: Annotated[list[int] | None, typer.Option(help="Trial number(s) to export.")] = None,
    pareto: Annotated[bool, typer.Option("--pareto", help="Every front trial.")] = False,
    at_most: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --pareto: at most N front trials, evenly spaced along the front by "
            "latency (the fastest and the slowest included).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Bundles go under OUT/<study>/.")] = Path(
        "work/bundles"
    ),
    storage: Storage = DEFAULT_STORAGE,
    work: Annotated[Path, typer.Option(help="Corpus, models and builds.")] = Path("work"),
    cost_models: CostDir = Path("cost_models"),
    sign_key: Annotated[
        Path | None,
        typer.Option("--sign-key", help="Sign each bundle with this key (`voxfit keygen`)."),
    ] = None,
    polish_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="Elastic-base studies: fine-tune each inherited candidate this many "
            "distillation steps, exported if its dev PER improves (the report says).",
        ),
    ] = 0,
    verbose: Verbose = False,
) -> None:
    """Write deployable bundles (plan, ONNX, TVM library, adapters, report, manifest, and
    manifest.sig with --sign-key); each export is an entry of the study's audit log."""
    from voxfit.search import (
        AuditLog,
        SearchContext,
        export_bundle,
        front_table,
        load_private_key,
        profile_of,
        spread,
    )

    _setup_logging(verbose)
    if at_most is not None and not pareto:
        raise ConfigError("--at-most: only with --pareto")
    key = load_private_key(sign_key) if sign_key is not None else None  # before any work
    st = _load_study(storage, study)
    if not trial and not pareto:
        raise ConfigError("say which trials: --trial N (repeatable) or --pareto")
    numbers = list(trial or [])
    if pareto:
        rows = front_table(st)
        rows = spread(rows, at_most) if at_most is not None else rows
        numbers += [r["trial"] for r in rows if r["trial"] not in numbers]
    prof = profile_of(st)
    ctx = SearchContext.of_study(st, work)
    by_number = {t.number: t for t in st.get_trials(deepcopy=False)}
    from voxfit.compile import TvmWorker, default_tuning_dir

    with TvmWorker(prof.cores) as w:
        for n in numbers:
            if n not in by_number:
                raise ConfigError(f"--trial {n}: no such trial in {st.study_name}")
            b = export_bundle(
                ctx,
                st,
                by_number[n],
                prof,
                out / st.study_name,
                cost_models_dir=cost_models,
                tuning_dir=default_tuning_dir(work, prof),
                worker=w,
                audit=AuditLog.of_study(work, st.study_name),
                sign_key=key,
                polish_steps=polish_steps,
            )
            console.print(f"bundle {b}" + (" (signed)" if key is not None else ""))


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder.")],
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Public key (signing.pub) the bundle must be signed by."),
    ] = None,
) -> None:
    """Check a bundle's files against its manifest (sha256), its signature with --key, and
    rerun its conformance pair (front end, onnxruntime, and the TVM library when its target
    runs here)."""
    from voxfit.search import check_bundle, describe_signature, fingerprint, load_public_key

    checked = check_bundle(bundle, key=key)
    for c in checked.conformance:
        console.print(f"conformance {c.line()}", highlight=False)
    if checked.problems:
        raise ConfigError(f"{bundle}: " + "; ".join(checked.problems))
    if key is not None:
        fp = fingerprint(load_public_key(key))
        signed = f"signed by {key} ({fp})"
    else:
        signed = describe_signature(bundle)
    console.print(
        f"{bundle}: every file matches manifest.json; {signed}", highlight=False, soft_wrap=True
    )


@app.command()
def report(
    study: StudyName = None,
    storage: Storage = DEFAULT_STORAGE,
    out: Annotated[Path | None, typer.Option(help="HTML file.")] = None,
) -> None:
    """Write one static HTML review of a study (plotly)."""
    from voxfit.search import write_report

    st = _load_study(storage, study)
    path = write_report(st, out or Path("work") / "reports" / f"{st.study_name}.html")
    console.print(f"report {path}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except VoxfitError as e:
        # escaped: a message quoting the user's "[/x]" is text, not rich markup (which raised)
        text = escape(" ".join(str(e).splitlines()))
        err.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True)
        sys.exit(2)
