"""A latency model for a new device from a few measurements, by transfer from a fitted one.

A source model (a profile's :class:`~voxfit.cost_models.CostModel`, fitted on hundreds of
candidates) already knows how each task's time grows with its shapes, bits and adapters. On
another device the same tasks take other times, but mostly by a factor per *kind* of kernel:
a conv with float weights, one that unpacks 4- or 8-bit weights, an int8 one, the stem and
the head (other vector widths, no FMA, one core instead of two...). So the new device's model is

    ms = c0 + sum_g s_g * P_g

where ``P_g`` sums the source model's per-task predictions over the tasks of group ``g``
(plus its overhead term as a group of its own), fitted on whole-model times measured on the
device (``n_shot`` of them, ~20). The scales are pulled towards one common scale (a ridge
whose strength is chosen by leave-one-out on the samples), so a group the samples barely
show keeps the common factor instead of a wild one. Errors are weighted relative to the
time (a 10% miss counts the same for a small and a large candidate).

From scratch on the same samples (:func:`fit_scratch`) the same data fits a linear FLOPs
model and gradient-boosted trees on whole-model features; onboarding reports both, so the
transfer has to earn its place (``benchmarks/onboard.py``).

Files: ``card.yaml`` only (the coefficients are a few numbers): ``kind: transfer``, the
source model's folder and sha256 (checked on load), groups, coefficients, the samples it
saw, the held-out figures, the host it was fitted on.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxfit.cost_models._features import FEATURES, Task
from voxfit.cost_models._model import (
    CARD_FILE,
    CardHost,
    CostModel,
    Prediction,
    hardware_key,
    metrics,
)
from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile, HostInfo, describe_host

TRANSFER_KIND = "transfer"
OVERHEAD = "overhead"
#: ridge strengths tried (relative to the mean squared relative feature), picked by LOO
LAMBDAS = (1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def task_group(t: Task) -> str:
    """The kernel kind a task's time scales with from one device to another: the segment
    kind and how its weights and activations are held: ``int8`` compute, else the weight
    bits (``w4`` and ``w8`` are packed and unpacked in the kernel, at different costs;
    ``w16`` float16, ``w32`` float32). Measured on the no-AVX device: splitting the packed
    kinds by bits took the leave-one-out error of 20 samples from 13.7% to 11.2%."""
    w, a = int(t.features["w_bits_min"]), int(t.features["a_bits_min"])
    return f"{t.kind}/int8" if a <= 8 else f"{t.kind}/w{w}"


def source_groups(source: CostModel, tasks: Sequence[Task]) -> tuple[dict[str, float], Prediction]:
    """``P_g``: the source model's predicted ms summed per group (and its overhead)."""
    p = source.predict_tasks(tasks)
    out: dict[str, float] = {OVERHEAD: float(p.overhead_ms)}
    for t in tasks:
        g = task_group(t)
        out[g] = out.get(g, 0.0) + p.tasks[t.name]
    return out, p


def _design(groups: Sequence[str], rows: Sequence[dict[str, float]]) -> np.ndarray:
    return np.asarray([[1.0] + [r.get(g, 0.0) for g in groups] for r in rows], dtype=float)


def _solve(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Weighted (1/y) least squares for [c0, s_g...] with the scales pulled towards one
    common scale (itself fitted first without the pull)."""
    w = 1.0 / y
    xw, yw = x * w[:, None], y * w
    common = np.c_[xw[:, :1], xw[:, 1:].sum(axis=1)]
    (c0, s), *_ = np.linalg.lstsq(common, yw, rcond=None)
    k = x.shape[1] - 1
    # lam relative to the size of the features: the same pull for any ms scale
    size = float(np.mean(xw[:, 1:] ** 2)) or 1.0
    pen = math.sqrt(lam * size * len(y))
    a = np.vstack([xw, np.c_[np.zeros((k, 1)), pen * np.eye(k)]])
    b = np.r_[yw, np.full(k, pen * s)]
    beta, *_ = np.linalg.lstsq(a, b, rcond=None)
    return np.asarray(beta, dtype=float)


def _loo_rel_error(x: np.ndarray, y: np.ndarray, lam: float) -> float:
    errs = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        beta = _solve(x[keep], y[keep], lam)
        errs.append(abs(float(x[i] @ beta) - y[i]) / y[i])
    return float(np.mean(errs))


@dataclass
class TransferModel(CardHost):
    """A device's latency model: a source :class:`CostModel` and per-group scales.

    Duck-compatible with :class:`CostModel` where the latency stack uses one (``card``,
    ``directory``, ``host``, ``host_check``, ``check_profile``, ``predict_tasks``)."""

    source: CostModel
    card: dict[str, Any]
    directory: Path | None = None

    @property
    def groups(self) -> list[str]:
        return list(self.card["groups"])

    def check_profile(self, profile: HardwareProfile) -> None:
        key = hardware_key(profile)
        if key != self.card["hardware_key"]:
            raise ConfigError(
                f"latency model {self.directory or ''} was fitted for "
                f"{self.card['hardware_key']}, not {key}: onboard this profile "
                "(voxfit device onboard)"
            )

    def predict_tasks(self, tasks: Sequence[Task]) -> Prediction:
        sums, src = source_groups(self.source, tasks)
        coef = self.card["coef"]
        seen = set(self.card["seen_groups"])
        ms = float(coef["c0"])
        per: dict[str, float] = {}
        for t in tasks:
            g = task_group(t)
            per[t.name] = src.tasks[t.name] * float(coef.get(g, coef["common"]))
        ms += sum(per.values()) + sums[OVERHEAD] * float(coef.get(OVERHEAD, coef["common"]))
        reasons = [
            r
            for r in src.reasons
            # the scales learned how this device runs packed and int8 kernels
            if "run packed" not in r
        ]
        for g in sorted({task_group(t) for t in tasks} - seen):
            reasons.append(f"{g}: no task of this kind among the {self.card['n_shot']} samples")
        return Prediction(
            ms=max(ms, 1e-3),
            tasks=per,
            overhead_ms=ms - sum(per.values()),
            low_confidence=bool(reasons),
            reasons=tuple(reasons),
        )

    # -- files ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        import yaml

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{CARD_FILE}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        if self.source.directory is not None:
            # relative to this folder: the pair moves together (a work folder, a bundle)
            src = os.path.relpath(Path(self.source.directory).resolve(), d.resolve())
            self.card["source"]["directory"] = src
        try:
            tmp.write_text(yaml.safe_dump(self.card, sort_keys=False))
            os.replace(tmp, d / CARD_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        self.directory = d
        return d

    @classmethod
    def load(cls, directory: str | Path, card: dict[str, Any] | None = None) -> TransferModel:
        """Read a saved transfer model and its source model (checked by sha256).

        Raises:
            ConfigError: missing files, or a source model that changed since the fit.
        """
        import yaml

        d = Path(directory)
        if card is None:
            if not (d / CARD_FILE).exists():
                raise ConfigError(f"{d}: no latency model here (run: voxfit device onboard)")
            card = yaml.safe_load((d / CARD_FILE).read_text())
        if not isinstance(card, dict) or card.get("kind") != TRANSFER_KIND:
            raise ConfigError(f"{d / CARD_FILE}: kind: expected {TRANSFER_KIND}")
        src_dir = Path(card["source"]["directory"])
        if not src_dir.is_absolute():
            src_dir = (d / src_dir).resolve()
        source = CostModel.load(src_dir)
        if source.card.get("model_sha256") != card["source"]["model_sha256"]:
            raise ConfigError(
                f"{d / CARD_FILE}: source: the model in {src_dir} changed since this one was "
                "fitted on it (onboard again)"
            )
        return cls(source, card, d)


def fit_transfer(
    source: CostModel,
    samples: Sequence[tuple[Sequence[Task], float]],
    profile: HardwareProfile,
    *,
    reference_ms: dict[str, float] | None = None,
    host: HostInfo | None = None,
) -> TransferModel:
    """Fit a device's model on ``samples`` (each: a candidate's tasks, its measured ms at
    the device's reference speed) from ``source``'s per-task predictions.

    Raises:
        ConfigError: fewer than 3 samples, or a non-positive or non-finite time.
    """
    if len(samples) < 3:
        raise ConfigError(f"transfer fit: {len(samples)} samples; measure at least 3")
    ys = np.asarray([float(y) for _, y in samples], dtype=float)
    if not np.all(np.isfinite(ys)) or np.any(ys <= 0):
        raise ConfigError("transfer fit: every measured time must be a positive number")
    rows = [source_groups(source, tasks)[0] for tasks, _ in samples]
    seen = sorted({g for r in rows for g, v in r.items() if v > 0 and g != OVERHEAD})
    groups = [*seen, OVERHEAD]
    x = _design(groups, rows)
    loo = {lam: _loo_rel_error(x, ys, lam) for lam in LAMBDAS}
    lam = min(loo, key=lambda k: loo[k])
    beta = _solve(x, ys, lam)
    w = 1.0 / ys
    xw = x * w[:, None]
    common_fit, *_ = np.linalg.lstsq(np.c_[xw[:, :1], xw[:, 1:].sum(axis=1)], ys * w, rcond=None)
    coef = {"c0": float(beta[0]), "common": float(common_fit[1])}
    coef.update({g: float(b) for g, b in zip(groups, beta[1:], strict=True)})
    fitted = x @ beta
    card: dict[str, Any] = {
        "schema_version": 1,
        "kind": TRANSFER_KIND,
        "profile": profile.name,
        "hardware_key": hardware_key(profile),
        "target": json.dumps(profile.target, sort_keys=True),
        "trained": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": (describe_host() if host is None else host).as_dict(),
        "source": {
            "profile": source.card["profile"],
            "hardware_key": source.card["hardware_key"],
            "directory": str(source.directory or ""),
            "model_sha256": source.card.get("model_sha256"),
            "n_candidates": source.card.get("n_candidates"),
        },
        "n_shot": len(samples),
        "groups": groups,
        "seen_groups": seen,
        "coef": coef,
        "ridge": {"lambda": lam, "loo_mape": loo},
        "features": list(FEATURES),
        "reference_ms": dict(reference_ms or {}),
        "fit_metrics": metrics(fitted.tolist(), ys.tolist()),
        "metrics": {},
    }
    return TransferModel(source, card)


# -- from scratch, on the same samples (what the transfer must beat) ------------------------
def candidate_features(tasks: Sequence[Task]) -> dict[str, float]:
    """Whole-model features of a candidate: per segment kind and in all, MFLOPs, weight and
    activation kB, low-bit and adapter counts."""
    out: dict[str, float] = {}
    for t in tasks:
        for f in ("mflops", "weight_kb", "act_kb"):
            out[f] = out.get(f, 0.0) + t.features[f]
            k = f"{t.kind}_{f}"
            out[k] = out.get(k, 0.0) + t.features[f]
        out["n_lowbit"] = out.get("n_lowbit", 0.0) + float(t.features["w_bits_min"] <= 8)
        out["n_adapters"] = out.get("n_adapters", 0.0) + float(t.features["adapter_kind"] > 0)
        out["packed_mflops"] = out.get("packed_mflops", 0.0) + (
            t.features["mflops"] if t.features["w_bits_min"] <= 8 else 0.0
        )
    return out


Predictor = Callable[[Sequence[Task]], float]


def fit_scratch(samples: Sequence[tuple[Sequence[Task], float]]) -> dict[str, Predictor]:
    """Models of the device from ``samples`` alone: ``linear_flops`` (ms = c0 + a * MFLOPs
    of float-weight tasks + b * MFLOPs of low-bit ones, relative least squares) and
    ``xgboost`` (shallow trees on :func:`candidate_features`, log ms)."""
    import xgboost as xgb

    feats = [candidate_features(t) for t, _ in samples]
    ys = np.asarray([y for _, y in samples], dtype=float)
    names = sorted({k for f in feats for k in f})

    def lin_x(f: dict[str, float]) -> list[float]:
        return [
            1.0,
            f.get("mflops", 0.0) - f.get("packed_mflops", 0.0),
            f.get("packed_mflops", 0.0),
        ]

    w = 1.0 / ys
    a = np.asarray([lin_x(f) for f in feats]) * w[:, None]
    beta, *_ = np.linalg.lstsq(a, ys * w, rcond=None)

    x = np.asarray([[f.get(k, 0.0) for k in names] for f in feats], dtype=np.float32)
    booster = xgb.train(
        {"objective": "reg:squarederror", "max_depth": 2, "eta": 0.1, "nthread": 2, "seed": 0},
        xgb.DMatrix(x, label=np.log(ys), feature_names=names),
        num_boost_round=150,
    )

    def linear(tasks: Sequence[Task]) -> float:
        return float(np.dot(beta, lin_x(candidate_features(tasks))))

    def trees(tasks: Sequence[Task]) -> float:
        f = candidate_features(tasks)
        row = np.asarray([[f.get(k, 0.0) for k in names]], dtype=np.float32)
        return float(np.exp(booster.predict(xgb.DMatrix(row, feature_names=names))[0]))

    return {"linear_flops": linear, "xgboost": trees}


def scratch_loo_mape(samples: Sequence[tuple[Sequence[Task], float]]) -> dict[str, float]:
    """Leave-one-out relative error of each from-scratch model on ``samples`` (to compare
    with the transfer's own, ``card["ridge"]["loo_mape"]``, on the same samples)."""
    errs: dict[str, list[float]] = {}
    for i, (tasks, y) in enumerate(samples):
        rest = [s for j, s in enumerate(samples) if j != i]
        for name, f in fit_scratch(rest).items():
            errs.setdefault(name, []).append(abs(f(tasks) - y) / y)
    return {k: float(np.mean(v)) for k, v in errs.items()}
