"""Where a profile's latency dataset lives: shipped parquet (read-only) and measurement stores.

Two kinds of folder hold rows of the same two tables (``models``: one row per measured
candidate and input; ``tasks``: one row per task of it, see :mod:`voxfit.cost_models._dataset`):

- the **shipped dataset**, ``cost_models/<profile>/dataset/{models,tasks}.parquet``, which the
  repository ships and nothing writes at run time (a maintainer refreshes it on purpose, with
  ``voxfit cost-model fit --dataset-out``);
- **measurement stores**, ``<work>/measurements/<profile>/``, where collections and searches
  add what they measure: one JSON file per candidate measurement, written under a unique
  temporary name in the same folder and renamed into place. There is no lock and no
  read-modify-write, so any number of processes may add to one store at once and none loses
  a row; a reader sees a whole file or none of it.

:func:`load_dataset` merges any of these folders into one pair of frames. A candidate and
input measured more than once keep its latest measurement (by ``date``, then by the order of
the folders given), so identical rows copied into two folders count once, and a measurement
repeated because the first was noisy replaces it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import tempfile
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile

log = logging.getLogger(__name__)

MODELS = "models.parquet"
TASKS = "tasks.parquet"
STORE_SCHEMA_VERSION = 1
_KEY = ["cand", "input"]
_ID = "_measurement"  # which measurement a row came from, while merging
_SRC, _FILE = "_src", "_file"  # the folder's position and the file's name, for ties


def dataset_dir(profile: HardwareProfile, cost_models_dir: str | Path = "cost_models") -> Path:
    """The profile's shipped dataset (read-only at run time)."""
    return Path(cost_models_dir) / profile.name / "dataset"


def measurements_dir(profile: HardwareProfile, work: str | Path = "work") -> Path:
    """The profile's measurement store under a work folder: ``<work>/measurements/<profile>``."""
    return Path(work) / "measurements" / profile.name


def _plain(value: Any) -> Any:
    """A JSON-ready value: numpy scalars as Python ones, NaN and infinities as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)[:64] or "_"


class MeasurementStore:
    """A folder of candidate measurements, one file each, safe for concurrent writers.

    Lifecycle: :meth:`add` once per measured candidate and input, from any number of
    processes; :meth:`load` whenever the rows are needed (it reads every file each time).
    A file is ``<cand>-<input>-<UTC time>-<pid>-<random>.json`` holding
    ``{"schema_version", "model": row, "tasks": [rows]}``. Temporary files (``.*.tmp``) that a
    killed writer left behind are ignored; a measurement file that does not parse (a broken
    disk, a hand edit) is skipped with a warning naming it.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"MeasurementStore({str(self.directory)!r})"

    def add(self, model_row: dict[str, Any], task_rows: list[dict[str, Any]]) -> Path:
        """Write one candidate measurement (its model row and its task rows) atomically.

        Returns:
            The new file.

        Raises:
            ValueError: ``model_row`` lacks a string ``cand`` or ``input``, or a task row
                names another candidate or input.
            OSError: the folder cannot be created or written.
        """
        cand, inp = model_row.get("cand"), model_row.get("input")
        if not isinstance(cand, str) or not isinstance(inp, str):
            raise ValueError(f"a measurement needs string cand and input, got {cand!r}, {inp!r}")
        for t in task_rows:
            if (t.get("cand"), t.get("input")) != (cand, inp):
                raise ValueError(
                    f"task row of {t.get('cand')!r}/{t.get('input')!r} in a measurement of "
                    f"{cand}/{inp}"
                )
        record = {
            "schema_version": STORE_SCHEMA_VERSION,
            "model": {k: _plain(v) for k, v in model_row.items()},
            "tasks": [{k: _plain(v) for k, v in t.items()} for t in task_rows],
        }
        text = json.dumps(record, allow_nan=False)
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{_slug(cand)}-{_slug(inp)}-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the store is a shared folder
            os.replace(tmp, self.directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.directory / name

    def files(self) -> list[Path]:
        """The measurement files, in name order (temporaries excluded)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json") if not p.name.startswith("."))

    def _read(self, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("%s: not a readable measurement, skipped (%s)", path, e)
            return None
        if not isinstance(record, dict) or record.get("schema_version") != STORE_SCHEMA_VERSION:
            log.warning("%s: schema_version: expected %d, skipped", path, STORE_SCHEMA_VERSION)
            return None
        model, tasks = record.get("model"), record.get("tasks")
        if (
            not isinstance(model, dict)
            or not all(isinstance(model.get(k), str) for k in _KEY)
            or not isinstance(tasks, list)
            or not all(isinstance(t, dict) for t in tasks)
        ):
            log.warning("%s: model/tasks: not a measurement record, skipped", path)
            return None
        return model, tasks

    def load(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(models, tasks) frames of this store alone, latest measurement per candidate and
        input; empty frames for an empty or missing folder."""
        return load_dataset(self.directory)


def _read_table(path: Path) -> pd.DataFrame:
    """A parquet table with ``cand`` and ``input`` columns.

    Raises:
        ConfigError: unreadable (truncated, not parquet) or without those columns.
    """
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        why = " ".join(str(e).split())[:120]
        raise ConfigError(f"{path}: not a readable parquet table ({why})") from None
    if not frame.empty and not set(_KEY) <= set(frame.columns):
        raise ConfigError(f"{path}: cand/input: columns missing, not a latency dataset")
    return frame


def _frames_of(directory: Path, index: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every row in one folder (parquet and store files), tagged with its measurement."""
    models: list[pd.DataFrame] = []
    tasks: list[pd.DataFrame] = []
    if (directory / MODELS).exists():
        m = _read_table(directory / MODELS)
        t = _read_table(directory / TASKS) if (directory / TASKS).exists() else pd.DataFrame()
        if not m.empty:
            ids = f"{index}:parquet:" + m["cand"].astype(str) + ":" + m["input"].astype(str)
            models.append(m.assign(**{_ID: ids, _SRC: index, _FILE: ""}))
        if not t.empty:
            ids = f"{index}:parquet:" + t["cand"].astype(str) + ":" + t["input"].astype(str)
            tasks.append(t.assign(**{_ID: ids}))
    store = MeasurementStore(directory)
    rows, task_rows = [], []
    for path in store.files():
        got = store._read(path)
        if got is None:
            continue
        mid = f"{index}:{path.name}"
        rows.append({**got[0], _ID: mid, _SRC: index, _FILE: path.name})
        task_rows += [{**t, _ID: mid} for t in got[1]]
    if rows:
        models.append(pd.DataFrame(rows))
    if task_rows:
        tasks.append(pd.DataFrame(task_rows))
    return _concat(models), _concat(tasks)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame()
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def load_dataset(*directories: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (models, tasks) frames of every folder given, merged; empty frames when none
    holds a measurement.

    Each folder may hold a shipped dataset (``models.parquet`` and ``tasks.parquet``), a
    :class:`MeasurementStore`'s files, or both; a missing folder holds nothing. Where a
    candidate and input were measured more than once, the latest measurement (``date``; on
    a tie, the later folder, then the later file) gives the model row and all its task rows.
    Nothing is written.

    Raises:
        ConfigError: a parquet table is unreadable or is not a latency dataset. (A store
            file that does not parse is skipped with a warning instead: one damaged
            measurement should not stop a search or a fit.)
    """
    parts = [_frames_of(Path(d), i) for i, d in enumerate(directories)]
    # a column that is null in every store file is of object type: numbers where any are
    models = _concat([m for m, _ in parts]).infer_objects()
    tasks = _concat([t for _, t in parts]).infer_objects()
    if models.empty:
        return pd.DataFrame(), pd.DataFrame()
    date = models["date"].fillna("").astype(str) if "date" in models else ""
    order = models.assign(_date=date).sort_values(["_date", _SRC, _FILE], kind="stable")
    latest = order.drop_duplicates(_KEY, keep="last").sort_index()
    if not tasks.empty:
        tasks = tasks[tasks[_ID].isin(set(latest[_ID]))].drop(columns=[_ID])
        tasks = tasks.reset_index(drop=True)
    models = latest.drop(columns=[_ID, _SRC, _FILE, "_date"]).reset_index(drop=True)
    return models, tasks


def write_dataset(models: pd.DataFrame, tasks: pd.DataFrame, directory: str | Path) -> Path:
    """Write (models, tasks) as a parquet dataset folder (for refreshing a shipped dataset
    on purpose); each file goes through a unique temporary name and a rename, tasks first,
    so a reader never sees a model row without its tasks."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for frame, name in ((tasks, TASKS), (models, MODELS)):
        tmp = d / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, d / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return d


def noisy_keys(models: pd.DataFrame, max_rel_iqr: float = 0.25) -> set[tuple[str, str]]:
    """(cand, input) of the rows measured too noisily to learn from.

    Noisy: the IQR of the per-round ratios to the reference exceeds ``max_rel_iqr`` of
    their median (rows timed with a reference: load both runs of a round share cancels),
    else the whole-model IQR exceeds ``max_rel_iqr`` of the median. Measure them again with
    ``collect(..., remeasure=keys)``; the newer measurement replaces the noisy one.
    """
    if models.empty:
        return set()
    noisy = models["iqr_ms"] > max_rel_iqr * models["measured_ms"]
    if "relative_iqr" in models:
        paired = models["relative_iqr"].notna()
        noisy[paired] = models.loc[paired, "relative_iqr"] > (
            max_rel_iqr * models.loc[paired, "relative"]
        )
    return set(zip(models.loc[noisy, "cand"], models.loc[noisy, "input"], strict=True))


def drop_keys(
    models: pd.DataFrame, tasks: pd.DataFrame, keys: Collection[tuple[str, str]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The frames without the rows of the given (cand, input) pairs."""
    keys = set(keys)
    if not keys or models.empty:
        return models, tasks
    keep_m = [k not in keys for k in zip(models["cand"], models["input"], strict=True)]
    models = models[keep_m].reset_index(drop=True)
    if not tasks.empty:
        keep_t = [k not in keys for k in zip(tasks["cand"], tasks["input"], strict=True)]
        tasks = tasks[keep_t].reset_index(drop=True)
    return models, tasks
