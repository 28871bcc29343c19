"""Latency cost models per profile: gradient-boosted trees per task, a roofline baseline.

The learned model predicts each task's ms with xgboost (trained on log ms, so errors are
relative) and adds a per-model overhead (a least-squares line over the number of adapters,
fitted on the time no task owns). Labels are latencies at one reference speed: a candidate
timed in rounds alternating with the uncompressed base gets ``relative`` x the base's
typical ms (``card.reference_ms``), so the host's drift does not enter the labels, and each
task's label is its share of the instrumented kernel time scaled to that. Files, no
pickle: ``model.json`` (xgboost's JSON) and ``card.yaml`` (features, the training ranges,
the task kinds seen, the overhead, metrics, provenance). A card is bound to one profile: a
model trained on one refuses to predict for another. It also records the host it was fitted
on (``host``, :class:`~voxfit.hw_profiles.HostInfo` as a dict; cards from before have none):
the same profile on another kind of CPU is another device for latency
(:meth:`CostModel.host_check`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from torch import nn

from voxfit.cost_models._features import FEATURES, MIXING, Task, decompose, feature_rows
from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile, HostInfo, check_recorded_host, describe_host

if TYPE_CHECKING:
    from voxfit.cost_models._transfer import TransferModel

CARD_SCHEMA_VERSION = 1
MODEL_FILE = "model.json"
CARD_FILE = "card.yaml"
_XGB_PARAMS = {
    "n_estimators": 400,
    "max_depth": 5,
    "learning_rate": 0.05,
    "subsample": 0.9,
    "colsample_bytree": 0.9,
    "min_child_weight": 1.0,
}


def model_dir(profile: HardwareProfile, cost_models_dir: str | Path = "cost_models") -> Path:
    """The profile's shipped model (read-only at run time)."""
    return Path(cost_models_dir) / profile.name / "model"


def fitted_model_dir(profile: HardwareProfile, work: str | Path = "work") -> Path:
    """Where ``voxfit cost-model fit`` saves a model by default: ``<work>/cost_models/<profile>/
    model``, out of the repository; :func:`load_for` reads it when given this folder."""
    return Path(work) / "cost_models" / profile.name / "model"


def _overhead_x(tasks: pd.DataFrame | Sequence[Task]) -> list[float]:
    """Overhead terms: a constant (VM dispatch, allocation, input layout) and one per adapter
    (its extra kernels' launches are partly outside the segment times)."""
    if isinstance(tasks, pd.DataFrame):
        adapters = float((tasks["adapter_kind"] > 0).sum())
    else:
        adapters = float(sum(t.features["adapter_kind"] > 0 for t in tasks))
    return [1.0, adapters]


@dataclass(frozen=True)
class Prediction:
    """A predicted latency: total ms, per task ms, and whether to trust it."""

    ms: float
    tasks: dict[str, float]
    overhead_ms: float
    low_confidence: bool = False
    reasons: tuple[str, ...] = ()


def roofline_ms(tasks: Sequence[Task], profile: HardwareProfile) -> float:
    """Analytic baseline: per task max(FLOPs / peak, bytes / bandwidth), summed."""
    if not profile.peak_gflops or not profile.memory_bandwidth_gbs:
        raise ConfigError(
            f"{profile.source or profile.name}: peak_gflops and memory_bandwidth_gbs are needed "
            "for the roofline baseline"
        )
    total = 0.0
    for t in tasks:
        compute = t.features["mflops"] * 1e6 / (profile.peak_gflops * 1e9)
        memory = (
            (t.features["weight_kb"] + t.features["act_kb"])
            * 1e3
            / (profile.memory_bandwidth_gbs * 1e9)
        )
        total += max(compute, memory) * 1e3
    return total


def metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """RMSE (ms), MAPE, share within +-10% / +-5%, Spearman and Kendall rank correlation."""
    from scipy import stats

    p = np.asarray(predicted, dtype=float)
    m = np.asarray(measured, dtype=float)
    rel = np.abs(p - m) / m
    return {
        "rmse_ms": float(np.sqrt(np.mean((p - m) ** 2))),
        "mape": float(np.mean(rel)),
        "within_10pct": float(np.mean(rel <= 0.10)),
        "within_5pct": float(np.mean(rel <= 0.05)),
        "spearman": float(stats.spearmanr(p, m).statistic) if len(p) > 2 else float("nan"),
        "kendall": float(stats.kendalltau(p, m).statistic) if len(p) > 2 else float("nan"),
        "n": float(len(p)),
    }


def metrics_table(title: str, m: dict[str, Any]) -> Any:
    """A rich table of :func:`evaluate`'s figures: the learned model and the roofline."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("model", "within 10%", "within 5%", "MAPE", "RMSE ms", "Spearman", "Kendall"):
        t.add_column(col)
    rows = [("xgboost", m), ("roofline", m["roofline"])]
    if "raw" in m:
        rows.append(("xgboost vs raw ms", m["raw"]))
    for name, row in rows:
        t.add_row(
            name,
            f"{row['within_10pct']:.0%}",
            f"{row['within_5pct']:.0%}",
            f"{row['mape']:.1%}",
            f"{row['rmse_ms']:.3f}",
            f"{row['spearman']:.3f}",
            f"{row['kendall']:.3f}",
        )
    return t


def hardware_key(profile: HardwareProfile) -> str:
    """What a cost model is bound to: the profile's name and what decides the compiled code
    and where it runs (target, host, cores, cross compiler, tuning budget) -- not budgets or
    measurement settings."""
    blob = json.dumps(
        {
            "target": profile.target,
            "host": profile.host_target,
            "cores": profile.cores,
            "cross": profile.cross_compiler,
            "trials_per_task": profile.tuning.trials_per_task,
        },
        sort_keys=True,
    )
    return f"{profile.name}@{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class CardHost:
    """The host a fitted model's card records (shared by every kind of latency model)."""

    card: dict[str, Any]

    @property
    def host(self) -> HostInfo | None:
        """The host the model was fitted on; None for a card that predates recording it."""
        h = self.card.get("host")
        return HostInfo.from_dict(h) if isinstance(h, dict) else None

    def host_check(self, current: HostInfo | None = None) -> tuple[bool, str]:
        """Whether this machine (or ``current``) is the kind of host the model was fitted on,
        and a sentence naming both (:func:`~voxfit.hw_profiles.check_recorded_host`).

        (False, why) only when the card records a host and it differs in kind; a card
        without a host is (True, "host unknown: ...").
        """
        return check_recorded_host(self.card.get("host"), current)


@dataclass
class CostModel(CardHost):
    """A fitted per-profile cost model (see the module doc)."""

    booster: Any
    card: dict[str, Any]
    directory: Path | None = None
    _ranges: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._ranges = {k: (float(v[0]), float(v[1])) for k, v in self.card["ranges"].items()}

    # -- prediction ----------------------------------------------------------------------
    def check_profile(self, profile: HardwareProfile) -> None:
        """Raises ConfigError when this model was trained for another profile."""
        key = hardware_key(profile)
        if key != self.card["hardware_key"]:
            raise ConfigError(
                f"cost model {self.directory or ''} was trained for {self.card['hardware_key']}, "
                f"not {key}: collect and fit for this profile (voxfit cost-model collect/fit)"
            )

    def predict_tasks(self, tasks: Sequence[Task]) -> Prediction:
        import xgboost as xgb

        names = list(self.card["features"])  # a model fitted before newer features: its own
        x = np.asarray(feature_rows(tasks, names), dtype=np.float32)
        per = np.exp(self.booster.predict(xgb.DMatrix(x, feature_names=names)))
        coef = self.card["overhead"]["coef"]
        overhead = float(np.dot(coef, _overhead_x(tasks)))
        reasons = []
        seen = {tuple(k) for k in self.card["seen_kinds"]}
        seen_int8 = self.card.get("seen_int8_kinds")
        packed = self.card.get("library_weights") == "packed"
        for t in tasks:
            kind = (int(t.features["kind"]), int(t.features["adapter_kind"]))
            if kind not in seen:
                reasons.append(f"{t.name}: task kind {kind} never seen in training")
            w, a = int(t.features["w_bits_min"]), int(t.features["a_bits_min"])
            if seen_int8 is not None and a <= 8 and kind[0] not in seen_int8:
                reasons.append(f"{t.name}: task kind {kind[0]} never seen with int8 compute")
            if not packed and w < 32 and (w, a) != (8, 8):
                # libraries now keep these weights packed and unpack them in the kernel
                # (1.4x the float32 time for w8 on AVX2: benchmarks/results/artifacts.json)
                reasons.append(
                    f"{t.name}: {w}-bit weights run packed, but this model learned from "
                    "float32-weight libraries (refit: voxfit cost-model collect/fit)"
                )
            # a_bits_min: 8-bit activations run tensorized int8 kernels, their own kind of
            # task (2-3x faster per conv than float32 on AVX2: benchmarks/results/int8.json)
            for f in ("c_in", "hidden", "c_out", "t_in", "adapter_dim", "mflops", "a_bits_min"):
                lo, hi = self._ranges[f]
                v = t.features[f]
                if v < lo * 0.95 or v > hi * 1.05:
                    reasons.append(
                        f"{t.name}: {f}={v:g} outside the training range [{lo:g}, {hi:g}]"
                    )
        return Prediction(
            ms=float(per.sum()) + overhead,
            tasks={t.name: float(v) for t, v in zip(tasks, per, strict=True)},
            overhead_ms=overhead,
            low_confidence=bool(reasons),
            reasons=tuple(reasons),
        )

    def predict(self, model: nn.Module, profile: HardwareProfile, frames: int) -> Prediction:
        """Predict ``model``'s latency on ``profile`` for ``frames`` input frames.

        Raises:
            ConfigError: the model was trained for another profile.
        """
        self.check_profile(profile)
        return self.predict_tasks(decompose(model, frames))

    # -- files ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        import yaml

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # unique temporaries: two fits saving into one folder never write one file together
        unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = d / f".model-{unique}.json"  # the extension picks xgboost's JSON format
        tmp_card = d / f".{CARD_FILE}-{unique}.tmp"
        try:
            self.booster.save_model(str(tmp))
            blob = tmp.read_bytes()
            card = dict(self.card)
            card["model_sha256"] = hashlib.sha256(blob).hexdigest()
            tmp_card.write_text(yaml.safe_dump(card, sort_keys=False))
            os.replace(tmp, d / MODEL_FILE)
            os.replace(tmp_card, d / CARD_FILE)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_card.unlink(missing_ok=True)
        self.card = card
        self.directory = d
        return d

    @classmethod
    def load(cls, directory: str | Path) -> CostModel:
        """Read a saved model; raises ConfigError for missing or mismatched files."""
        import xgboost as xgb
        import yaml

        d = Path(directory)
        if not (d / CARD_FILE).exists() or not (d / MODEL_FILE).exists():
            raise ConfigError(f"{d}: no cost model here (run: voxfit cost-model fit)")
        card = yaml.safe_load((d / CARD_FILE).read_text())
        if not isinstance(card, dict) or card.get("schema_version") != CARD_SCHEMA_VERSION:
            raise ConfigError(f"{d / CARD_FILE}: schema_version: expected {CARD_SCHEMA_VERSION}")
        digest = hashlib.sha256((d / MODEL_FILE).read_bytes()).hexdigest()
        if digest != card.get("model_sha256"):
            raise ConfigError(f"{d / MODEL_FILE}: sha256 does not match {CARD_FILE}")
        unknown = sorted(set(card["features"]) - set(FEATURES))
        if unknown:
            raise ConfigError(f"{d / CARD_FILE}: features: trained on unknown features {unknown}")
        booster = xgb.Booster()
        booster.load_model(str(d / MODEL_FILE))
        return cls(booster, card, d)


def load_for(
    profile: HardwareProfile,
    cost_models_dir: str | Path = "cost_models",
    directory: str | Path | None = None,
) -> CostModel | TransferModel:
    """The profile's cost model, checked to be this profile's: the one saved in
    ``directory`` (e.g. :func:`fitted_model_dir`, or ``voxfit cost-model fit --out``) if
    given, else the shipped one under ``cost_models_dir`` (:func:`model_dir`).

    Raises:
        ConfigError: no model there, its files do not match, or it was trained for another
            profile.
    """
    d = Path(model_dir(profile, cost_models_dir) if directory is None else directory)
    cm = load_model(d)
    cm.check_profile(profile)
    return cm


def load_model(directory: str | Path) -> CostModel | TransferModel:
    """The latency model saved in ``directory``: a fitted :class:`CostModel`, or a device's
    transfer model (``kind: transfer`` on its card, :mod:`voxfit.cost_models._transfer`),
    which stands in for one wherever a cost model is used.

    Raises:
        ConfigError: no model there, or its files do not match.
    """
    import yaml

    d = Path(directory)
    card = None
    if (d / CARD_FILE).exists() and not (d / MODEL_FILE).exists():
        try:
            card = yaml.safe_load((d / CARD_FILE).read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{d / CARD_FILE}: not YAML: {str(e).splitlines()[0]}") from None
    if isinstance(card, dict) and card.get("kind") == "transfer":
        from voxfit.cost_models._transfer import TransferModel

        return TransferModel.load(d, card)
    return CostModel.load(d)


def _ref_keys(models: pd.DataFrame) -> pd.Series:
    return models["input"].astype(str) + "@" + models["reference"].astype(str)


def reference_ms(models: pd.DataFrame) -> dict[str, float]:
    """Per input and reference model (``input@reference``), the reference's median time
    over the rows that timed it."""
    if "relative" not in models or models["relative"].isna().all():
        return {}
    timed = models.dropna(subset=["relative", "reference_ms", "reference"])
    return {str(k): float(g["reference_ms"].median()) for k, g in timed.groupby(_ref_keys(timed))}


def normalized_ms(models: pd.DataFrame, reference: dict[str, float]) -> pd.Series:
    """Each row's latency at the reference speed: ``relative`` x the reference model's
    typical ms for that input where the row timed the reference, else the raw median.

    The host's speed drifts (1.5-2x over hours on a shared machine), the ratio to a model
    timed in alternating rounds does not; this is the label the cost model learns.
    """
    out = models["measured_ms"].astype(float).copy()
    if "relative" in models and "reference" in models and reference:
        ref = _ref_keys(models).map(reference)
        ok = models["relative"].notna() & ref.notna()
        out[ok] = models.loc[ok, "relative"].astype(float) * ref[ok].astype(float)
    return out


def _task_labels(
    models: pd.DataFrame, labelled: pd.DataFrame, reference: dict[str, float]
) -> tuple[pd.Series, dict[tuple[str, str], float]]:
    """Per-task labels that add up to the candidate's normalized whole-model time.

    The instrumented run gives each task's share of the kernel time (its absolute ms carry
    the instrument's per-call cost and the moment's machine speed); the shares are scaled to
    the whole-model time, and the unattributed share (input layout) becomes the overhead.
    Returns (label per task row, overhead ms per (cand, input)).
    """
    whole = normalized_ms(models, reference)
    scale: dict[tuple[str, str], float] = {}
    loose: dict[tuple[str, str], float] = {}
    for i, m in models.iterrows():
        key = (m["cand"], m["input"])
        kernels = m.get("kernels_ms")
        if kernels is None or not np.isfinite(kernels) or kernels <= 0:
            continue
        scale[key] = float(whole[i]) / float(kernels)
        loose[key] = float(m.get("loose_ms") or 0.0) * scale[key]
    keys = list(zip(labelled["cand"], labelled["input"], strict=True))
    factor = np.array([scale.get(k, np.nan) for k in keys])
    return labelled["ms"].astype(float) * factor, loose


def fit(
    models: pd.DataFrame,
    tasks: pd.DataFrame,
    profile: HardwareProfile,
    *,
    seed: int = 0,
    host: HostInfo | None = None,
    features: Sequence[str] = FEATURES,
) -> CostModel:
    """Fit on every candidate in ``models`` that has per-task times.

    ``features``: the task features it learns from (default all; a subset reproduces a
    model fitted before later ones existed).

    ``host`` is recorded on the card as the host the labels hold on; default this machine.
    Measurement rows do not record their host, so a dataset collected elsewhere should be
    fitted with that host named (or on it).

    Raises:
        ConfigError: no usable rows, or rows from another profile.
    """
    import xgboost as xgb

    if models.empty:
        raise ConfigError("cost-model fit: the dataset has no measured candidates")
    other = sorted(set(models["profile_hash"]) - {profile.stable_hash()})
    if other:
        raise ConfigError(
            f"cost-model fit: dataset rows from other profile versions ({', '.join(other)}); "
            f"{profile.name} is {profile.stable_hash()}"
        )
    from voxfit.cost_models._dataset import refeaturize

    if set(features) & set(MIXING):
        tasks = refeaturize(models, tasks, profile)
    reference = reference_ms(models)
    labelled = tasks.dropna(subset=["ms"])
    labels, loose = _task_labels(models, labelled, reference)
    labelled = labelled.assign(label=labels).dropna(subset=["label"])
    keys = set(zip(labelled["cand"], labelled["input"], strict=True))
    used = models[[k in keys for k in zip(models["cand"], models["input"], strict=True)]]
    if used.empty:
        raise ConfigError("cost-model fit: no candidate has per-task times (collect locally)")
    names = list(features)
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise ConfigError(f"cost-model fit: unknown features {unknown}")
    x = labelled[names].to_numpy(dtype=np.float32)
    y = np.log(np.maximum(labelled["label"].to_numpy(dtype=float), 1e-4))
    params = {
        "objective": "reg:squarederror",
        "seed": seed,
        "nthread": 2,
        "eta": 0.05,
        "max_depth": _XGB_PARAMS["max_depth"],
        "subsample": _XGB_PARAMS["subsample"],
        "colsample_bytree": _XGB_PARAMS["colsample_bytree"],
    }
    booster = xgb.train(
        params,
        xgb.DMatrix(x, label=y, feature_names=names),
        num_boost_round=int(_XGB_PARAMS["n_estimators"]),
    )
    # overhead: the share of the whole-model time no task owns
    rows_x, rows_y = [], []
    by_key = {k: g for k, g in labelled.groupby(["cand", "input"])}
    for _, m in used.iterrows():
        key = (m["cand"], m["input"])
        rows_x.append(_overhead_x(by_key[key]))
        rows_y.append(loose[key])
    coef, *_ = np.linalg.lstsq(np.asarray(rows_x), np.asarray(rows_y), rcond=None)
    ranges = {f: [float(labelled[f].min()), float(labelled[f].max())] for f in names}
    seen = sorted(
        {(int(k), int(a)) for k, a in zip(labelled["kind"], labelled["adapter_kind"], strict=True)}
    )
    int8 = labelled["a_bits_min"] <= 8
    seen_int8 = sorted({int(k) for k in labelled.loc[int8, "kind"]})
    card = {
        "schema_version": CARD_SCHEMA_VERSION,
        "profile": profile.name,
        "hardware_key": hardware_key(profile),
        "target": json.dumps(profile.target, sort_keys=True),
        "trained": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "n_candidates": len(used),
        "n_task_rows": len(labelled),
        "inputs": sorted(set(used["input"])),
        "tvm_version": sorted(set(used["tvm_version"])),
        # where the labels' speed holds: another kind of CPU is another device for latency
        "host": (describe_host() if host is None else host).as_dict(),
        "features": names,
        "ranges": ranges,
        "seen_kinds": [list(k) for k in seen],
        # task kinds it saw with int8 compute: a TDNN conv's int8 time says nothing of a
        # Conformer linear's (absent from older cards: not checked)
        "seen_int8_kinds": seen_int8,
        "overhead": {"terms": ["1", "n_adapters"], "coef": [float(c) for c in coef]},
        # labels are latencies at the speed where the reference model takes these ms
        "reference_ms": reference,
        # the libraries it learned from: low-bit weights packed and unpacked in the kernel
        # (rows that record their lowering, i.e. collected since packing), or float32 weights
        "library_weights": (
            "packed" if "lowering" in used and bool(used["lowering"].notna().all()) else "float32"
        ),
        "xgboost": {**_XGB_PARAMS, "target": "log(ms) per task", "seed": seed},
        "metrics": {},
    }
    return CostModel(booster, card)


def evaluate(
    cm: CostModel, models: pd.DataFrame, tasks: pd.DataFrame, profile: HardwareProfile
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Whole-model metrics of ``cm`` and of the roofline on the given (held-out) candidates.

    Returns (metrics with a ``roofline`` entry, per-candidate frame of predictions).
    """
    from voxfit.cost_models._dataset import refeaturize
    from voxfit.cost_models._features import Task

    names = list(cm.card["features"])
    if set(names) & set(MIXING):  # rows stored before them get them (the rest as they are)
        tasks = refeaturize(models, tasks, profile)
    rows = []
    by_key = {k: g for k, g in tasks.groupby(["cand", "input"])}
    measured = normalized_ms(models, cm.card.get("reference_ms") or {})
    for i, m in models.iterrows():
        if (m["cand"], m["input"]) not in by_key:
            continue  # its task rows were left out (a model that is not built in)
        g = by_key[(m["cand"], m["input"])]
        ts = [Task(r["task"], {f: float(r[f]) for f in names}) for _, r in g.iterrows()]
        p = cm.predict_tasks(ts)
        rows.append(
            {
                "cand": m["cand"],
                "input": m["input"],
                "measured_ms": float(measured[i]),
                "raw_ms": float(m["measured_ms"]),
                "predicted_ms": p.ms,
                "roofline_ms": roofline_ms(ts, profile),
                "low_confidence": p.low_confidence,
            }
        )
    frame = pd.DataFrame(rows)
    out: dict[str, Any] = metrics(frame["predicted_ms"], frame["measured_ms"])
    out["roofline"] = metrics(frame["roofline_ms"], frame["measured_ms"])
    # the same predictions against the raw medians (the machine's speed at that moment)
    out["raw"] = metrics(frame["predicted_ms"], frame["raw_ms"])
    out["low_confidence"] = int(frame["low_confidence"].sum())
    return out, frame


def split(models: pd.DataFrame, test_frac: float, seed: int = 0) -> tuple[set[str], set[str]]:
    """Candidate ids for (train, test), split by candidate so no plan is in both."""
    cands = sorted(set(models["cand"]))
    rng = np.random.default_rng(seed)
    rng.shuffle(cands)
    n_test = int(math.floor(len(cands) * test_frac))
    return set(cands[n_test:]), set(cands[:n_test])
