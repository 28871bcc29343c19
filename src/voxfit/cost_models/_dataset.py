"""A profile's latency dataset: what one measured candidate adds, and how to collect many.

A measurement gives one ``models`` row per candidate and input (whole-model median, kernel
sum, compile facts, provenance) and one ``tasks`` row per task (features of
:mod:`voxfit.cost_models._features` and the measured ms): :func:`rows_of`. :func:`collect`
adds each candidate to a :class:`~voxfit.cost_models.MeasurementStore` under the work folder
as soon as it is measured, so an interrupted collection keeps every candidate it finished,
and a repeated collection skips candidates the shipped dataset or the store already hold.
Where the rows live and how they are merged: :mod:`voxfit.cost_models._store`.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from voxfit._progress import progress_bar
from voxfit.cost_models._features import FEATURES, MIXING, attribute_calls, decompose
from voxfit.cost_models._store import MeasurementStore, dataset_dir, load_dataset
from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile, InputSpec
from voxfit.latency import LatencyResult
from voxfit.models import n_mels_of
from voxfit.plan import Candidate
from voxfit.spaces import BoundSpace, sample


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {"tvm_version": md.version("apache-tvm"), "voxfit_version": md.version("voxfit")}


def reference_key(model: nn.Module) -> str:
    """Names a reference model by what its latency depends on: class and parameter count."""
    from voxfit.models import count_parameters

    return f"{type(model).__name__}-{count_parameters(model)}"


def rows_of(
    model: nn.Module,
    candidate: Candidate,
    result: LatencyResult,
    profile: HardwareProfile,
    source: str,
    reference: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dataset rows of one measured candidate (whole model, and per task if profiled);
    ``reference``: :func:`reference_key` of the model timed alongside, if one was.

    Raises:
        ModelError: the kernels do not line up with the model's tasks.
    """
    tasks = decompose(model, result.frames)
    per_task: dict[str, float] = {}
    loose = 0.0
    if result.calls:
        per_task, loose = attribute_calls(result.calls, tasks)
    cand = candidate.stable_hash()
    c = result.compile
    row = {
        "cand": cand,
        "input": result.input,
        "frames": result.frames,
        "plan": json.dumps(candidate.to_dict(), sort_keys=True),
        "measured_ms": result.median_ms,
        "iqr_ms": result.iqr_ms,
        "reference_ms": result.reference_ms,
        "relative": result.relative,
        "relative_iqr": result.relative_iqr,
        "reference": reference if result.relative is not None else None,
        "kernels_ms": sum(ms for _, ms in result.calls) if result.calls else None,
        "loose_ms": loose if result.calls else None,
        "n_kernels": len(result.calls),
        "n_tvm_tasks": c.n_tasks if c else None,
        "new_tasks": c.new_tasks if c else None,
        # tasks run with another profile's schedules (``tuning.seed_from``), not tuned on
        # this device: a device being onboarded measures a mix a latency model cannot see
        "seeded_tasks": len(c.details.get("seeded_tasks") or ()) if c else None,
        # the TVM tasks as the tuning database keys them ([name, key, weight, FLOPs]): the
        # device's own record of each can be looked up (kernel-sum latency models)
        "task_keys": json.dumps(c.details["task_keys"])
        if c and "task_keys" in c.details
        else None,
        "tune_s": c.tune_s if c else None,
        "compile_s": c.total_s if c else None,
        # how the library held the plan's low-bit weights (packed since stage 2)
        "lowering": c.lowering if c else None,
        "peak_memory_mb": result.peak_memory_mb,
        "method": result.method,
        "repeats": result.repeats,
        "profile": profile.name,
        "profile_hash": profile.stable_hash(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": source,
        **_versions(),
    }
    task_rows = [
        {
            "cand": cand,
            "input": result.input,
            "task": t.name,
            **{f: t.features[f] for f in FEATURES},
            "ms": per_task.get(t.name),
        }
        for t in tasks
    ]
    return row, task_rows


#: instrumented runs whose per-kernel medians split a candidate's time over its tasks. The
#: same library timed twice splits its blocks' shares a median 5% apart (21% at the 90th
#: percentile) with 5 runs and 6.5% (19.5%) with 25 (tdnn-default on the shared 2-core
#: host), so more runs do not steady the split: 5
PROFILE_CALLS = 5


def reference_models(keys: Collection[str], n_outputs: int = 55) -> dict[str, nn.Module]:
    """The built-in models (every family and size preset, ``n_outputs`` output units) whose
    :func:`reference_key` is among ``keys``: the shapes a stored row was measured with."""
    from voxfit.models import FAMILIES, build_model, default_config

    out: dict[str, nn.Module] = {}
    for family in FAMILIES:
        for preset in ("default", "tiny"):
            m = build_model(default_config(family, n_outputs, preset)).eval()  # type: ignore[arg-type]
            if reference_key(m) in keys:
                out[reference_key(m)] = m
    return out


def lacks_mixing(tasks: Any) -> bool:
    """Whether any of the task rows lacks a mixing feature (stored before they existed)."""
    return not tasks.empty and not all(f in tasks and tasks[f].notna().all() for f in MIXING)


def refeaturize(models: Any, tasks: Any, profile: HardwareProfile) -> Any:
    """``tasks`` with every current feature: rows collected before the int8/float mixing
    features existed get them recomputed from their candidate's plan, applied to the
    built-in model their reference names (the shapes are the base's; the weights do not
    matter). Rows of a model that is not built in are dropped, with a warning.

    Returns:
        The task rows (a new frame; ``tasks`` is not changed).
    """
    import logging

    import pandas as pd

    from voxfit.compress import apply

    if not lacks_mixing(tasks):
        return tasks
    out = tasks.copy()
    for f in MIXING:
        if f not in out:
            out[f] = float("nan")
    stale = out[list(MIXING)].isna().any(axis=1)
    keys = set(zip(out.loc[stale, "cand"], out.loc[stale, "input"], strict=True))
    rows = models.drop_duplicates(["cand", "input"], keep="last").set_index(["cand", "input"])
    bases = reference_models({str(rows.loc[k, "reference"]) for k in keys if k in rows.index})
    drop: list[Any] = []
    for cand, inp in sorted(keys):
        sel = stale & (out["cand"] == cand) & (out["input"] == inp)
        row: Any = rows.loc[(cand, inp)] if (cand, inp) in rows.index else None
        base = bases.get(str(row["reference"])) if row is not None else None
        if base is None:
            drop.extend(out.index[sel])
            continue
        plan = Candidate.from_dict(json.loads(row["plan"]))
        calib = random_calibration(int(row["frames"]), 0, n_mels_of(base))
        model = apply(base, plan, channel_multiple=profile.channel_multiple, calibration=calib)
        by_task = {t.name: t.features for t in decompose(model, int(row["frames"]))}
        for i in out.index[sel]:
            feats = by_task.get(str(out.at[i, "task"]))
            if feats is None:
                drop.append(i)
                continue
            for k in MIXING:
                out.at[i, k] = feats[k]
    if drop:
        logging.getLogger(__name__).warning(
            "%d task rows of models that are not built in lack the mixing features: left out",
            len(drop),
        )
    return pd.DataFrame(out.drop(index=drop))


def random_calibration(frames: int, seed: int, n_mels: int = 80) -> list[Any]:
    """Calibration batches for measuring latency: random frames (latency does not depend on
    the calibration values; 8-bit activation layers need some)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, frames, n_mels, generator=g), torch.full((2,), frames))]


class _Seeded:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:  # noqa: ARG002
        return self.r.choice(choices)


class _Levelled(_Seeded):
    """Numeric choices of one kind drawn near one shared level per candidate.

    Each :meth:`candidate` gives every kind of choice (the name's prefix: ``keep``,
    ``wbits``, ``adapter`` ...) its own level in [0, 1], and a choice among ``k`` sorted
    numbers is the one at index ``level * (k - 1)`` plus Gaussian jitter (sd 0.75 index). So
    one candidate keeps most blocks narrow and another most wide. Uniform per-layer draws
    average many independent choices and cluster around the space's centre; these reach its
    corners, where a search's Pareto front lies. Non-numeric choices stay uniform.
    """

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.levels: dict[str, float] = {}

    def candidate(self, space: BoundSpace) -> Candidate:
        self.levels = {}
        return sample(space, self)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        if not all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices):
            return super().suggest_categorical(name, choices)
        level = self.levels.setdefault(name.split(":")[0], self.r.random())
        ordered = sorted(choices)
        i = round(level * (len(ordered) - 1) + self.r.gauss(0.0, 0.75))
        return ordered[min(max(i, 0), len(ordered) - 1)]


def sample_candidates(space: BoundSpace, n: int, seed: int, levelled: int = 0) -> list[Candidate]:
    """``n`` distinct candidates drawn uniformly from ``space``, then ``levelled`` more.

    The ``levelled`` ones (distinct from the first ``n``) draw each kind of numeric choice
    near one per-candidate level (:class:`_Levelled`), so a dataset covers the light and
    heavy corners of the space as well as its centre. Deterministic per seed; the first
    ``n`` do not depend on ``levelled``. Recovery steps are dropped: distillation changes
    weights, not the compiled graph.
    """
    out: dict[str, Candidate] = {}

    def fill(count: int, draw: Callable[[], Candidate]) -> None:
        want = len(out) + count
        for _ in range(count * 50):  # a small space may hold fewer distinct candidates
            if len(out) == want:
                return
            c = replace(draw(), recovery_steps=0)
            out.setdefault(c.stable_hash(), c)

    rng, lev = _Seeded(seed), _Levelled(seed + 7919)
    fill(n, lambda: sample(space, rng))
    fill(levelled, lambda: lev.candidate(space))
    return list(out.values())


def collect(
    base: nn.Module,
    space: BoundSpace,
    profile: HardwareProfile,
    n: int,
    *,
    work_dir: str | Path,
    store: str | Path | MeasurementStore,
    cost_models_dir: str | Path = "cost_models",
    tuning_dir: str | Path | None = None,
    inputs: tuple[InputSpec, ...] | None = None,
    seed: int = 0,
    calibration: Any = None,
    on_result: Callable[[Candidate, LatencyResult], None] | None = None,
    reference: bool = True,
    levelled: int = 0,
    remeasure: Collection[tuple[str, str]] = frozenset(),
) -> dict[str, Any]:
    """Compile (tuning new tasks) and measure ``n`` sampled candidates; add each to ``store``.

    ``levelled`` more candidates are drawn to reach the space's light and heavy corners
    (:func:`sample_candidates`). A candidate and input already in the profile's shipped
    dataset (under ``cost_models_dir``) or in ``store`` is skipped, unless its
    ``(cand, input)`` is in ``remeasure`` (e.g. :func:`~voxfit.cost_models.noisy_keys`):
    the new measurement then replaces the old one when the dataset is loaded. Nothing is
    written outside ``work_dir`` (builds), ``store`` and ``tuning_dir`` (the user's tuning
    database; default: under ``work_dir``).

    Only local measurement gives per-task times (the VM is instrumented in-process); an
    RPC profile records whole-model times only. With ``reference`` the uncompressed
    ``base`` is timed in rounds alternating with every candidate, so each row also has the
    candidate's drift-free latency relative to the base (``relative``); rows without it
    are measured again. Failed candidates are counted, not stored. Returns counts, the wall
    time and the store's folder (``dataset``).

    Raises:
        ConfigError: the profile does not measure locally.
    """
    if profile.measurement.method != "local":
        raise ConfigError(
            f"{profile.source or profile.name}: measurement.method: collecting per-task "
            f"times needs local measurement (this profile says {profile.measurement.method})"
        )
    out_store = store if isinstance(store, MeasurementStore) else MeasurementStore(store)
    models, _ = load_dataset(dataset_dir(profile, cost_models_dir), out_store.directory)
    inputs = inputs or (profile.primary_input,)
    done = set()
    if not models.empty:
        if reference and "relative" in models:
            models = models[models["relative"].notna()]  # rows without it are measured again
        elif reference:
            models = models.iloc[:0]
        done = set(zip(models["cand"], models["input"], strict=True)) - set(remeasure)
    todo = [
        c
        for c in sample_candidates(space, n, seed, levelled)
        if any((c.stable_hash(), i.name) not in done for i in inputs)
    ]
    t0 = time.monotonic()
    stored = failed = 0
    if todo:  # nothing to measure: no TVM worker to start
        stored, failed = _measure_into(
            out_store,
            base,
            todo,
            profile,
            inputs,
            work_dir=work_dir,
            cost_models_dir=cost_models_dir,
            tuning_dir=tuning_dir,
            seed=seed,
            calibration=calibration,
            on_result=on_result,
            reference=reference,
        )
    return {
        "stored": stored,
        "failed": failed,
        "skipped": n + levelled - len(todo),
        "minutes": (time.monotonic() - t0) / 60,
        "dataset": str(out_store.directory),
    }


def _measure_into(
    store: MeasurementStore,
    base: nn.Module,
    todo: list[Candidate],
    profile: HardwareProfile,
    inputs: tuple[InputSpec, ...],
    *,
    work_dir: str | Path,
    cost_models_dir: str | Path,
    tuning_dir: str | Path | None,
    seed: int,
    calibration: Any,
    on_result: Callable[[Candidate, LatencyResult], None] | None,
    reference: bool,
) -> tuple[int, int]:
    """:func:`collect`'s measuring loop; returns (stored, failed)."""
    from voxfit.compress import apply
    from voxfit.latency import TvmLocalEstimator

    if calibration is None:
        calibration = random_calibration(inputs[0].frames, seed, n_mels_of(base))
    stored = failed = 0
    ref_key = reference_key(base) if reference else None
    with (
        TvmLocalEstimator(
            profile,
            work_dir,
            cost_models_dir=cost_models_dir,
            tuning_dir=tuning_dir,
            profile_calls=PROFILE_CALLS,
            reference=base if reference else None,
        ) as est,
        progress_bar(info=True) as bar,
    ):
        task = bar.add_task(f"collect {profile.name}", total=len(todo), info="")
        for cand in todo:
            t_cand = time.monotonic()
            model = apply(
                base, cand, channel_multiple=profile.channel_multiple, calibration=calibration
            )
            for r in est.estimate(model, inputs):
                if not r.ok:
                    failed += 1
                    bar.console.print(f"[red]{cand.stable_hash()} {r.input}: {r.error}")
                    continue
                row, task_rows = rows_of(model, cand, r, profile, "collect", ref_key)
                row["collect_s"] = time.monotonic() - t_cand  # build, tune, measure
                store.add(row, task_rows)
                stored += 1
                if on_result:
                    on_result(cand, r)
                c = r.compile
                bar.update(
                    task,
                    info=f"{r.median_ms:.2f} ms, {c.new_tasks if c else 0} new tasks",
                )
            bar.advance(task)
    return stored, failed
