"""A device's latency from its own kernels: the tuning database's run times, summed.

Tuning on the device leaves, for every TVM task (kernel) it tuned or whose seed schedules it
timed, the best run time measured there (:mod:`voxfit.compile._tune`). A compiled model runs
those very schedules, so its time is close to the sum of its kernels' record times, weighted
by how often each runs, plus what runs between them (nn-Meter's kernel sum, on the device's
own records instead of a separate profiling pass). So

    ms = c0 + s * sum_k w_k * t_k

with ``t_k`` the device's record of kernel ``k`` and ``c0``, ``s`` fitted on the whole-model
times onboarding measures anyway (relative errors, as the transfer model). Measured on the
no-AVX RPC device (``benchmarks/results/onboard.json``): from 20 samples, 88% of 50
held-out candidates within +-10%, Spearman 0.956, where the transfer model of the same
samples put 34% within +-10% (Spearman 0.80): the per-kernel tuning luck of a new device
(16 trials a task) is in the records and in no feature.

A kernel the table lacks (a shape no onboarding model had) is estimated from the table's
kernels of the same fused pattern (its name without numbers): a least-squares line of time
on FLOPs over them, or their time per FLOP with one such kernel. A kernel of a pattern the
table never saw cannot be estimated: :meth:`KernelModel.predict_keys` says so and the caller
falls back to the transfer model.

File: ``kernels.json`` beside the card: the table (a snapshot of the device's database when
the model was fitted, so later tuning cannot change a fitted model's predictions), each
kernel's pattern and FLOPs, the coefficients and the fit's figures.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxfit.errors import ConfigError, DataError

KERNELS_FILE = "kernels.json"
#: [task name, workload key, weight, FLOPs or None], as a build reports them (task_keys)
TaskKey = Sequence[Any]


def pattern(task_name: str) -> str:
    """A task's fused pattern: its name without the numbers TVM appends per shape."""
    return re.sub(r"\d+", "", task_name)


def database_kernels(db_dir: str | Path, *, median: bool = False) -> dict[str, float]:
    """The best mean run time (ms) of each workload of a tuning database folder, by its
    workload key (the structural hash MetaSchedule keys workloads with); records with a
    failed run are not times. ``median``: a record's median repeat instead of its mean (a
    table timed with repeats, where one disturbed repeat must not count).

    Raises:
        DataError: a line of either file is not a complete record (a write was killed;
            the next run that writes the database repairs it under its lock).
    """
    from voxfit.compile._database import RECORDS, WORKLOADS, _complete_lines, _mean_secs

    d = Path(db_dir)
    lines = {}
    for name in (WORKLOADS, RECORDS):
        lines[name], dropped = _complete_lines(d / name)
        if dropped:
            raise DataError(
                f"{d / name}: line {len(lines[name]) + 1}: not a complete record (a killed "
                "write; the next run that writes this database repairs it)"
            )
    keys = [str(json.loads(w)[0]) for w in lines[WORKLOADS]]
    best: dict[str, float] = {}
    for line in lines[RECORDS]:
        w, secs = int(json.loads(line)[0]), _mean_secs(line)
        if median and secs != math.inf:
            secs = float(np.median(json.loads(line)[1][1]))
        if secs == math.inf or not 0 <= w < len(keys):
            continue
        best[keys[w]] = min(best.get(keys[w], 1e3 * secs), 1e3 * secs)
    return best


@dataclass
class KernelModel:
    """``c0 + scale * sum of the kernels' times`` over a snapshot of a device's records."""

    table: dict[str, float]
    info: dict[str, tuple[str, float | None]]  # key -> (pattern, FLOPs) of table kernels
    c0: float = 0.0
    scale: float = 1.0
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by: dict[str, list[tuple[float | None, float]]] = {}
        for k, ms in self.table.items():
            p, f = self.info.get(k, ("", None))
            by.setdefault(p, []).append((f, ms))
        self._lines = {p: _line(xs) for p, xs in by.items() if p}

    def kernel_ms(self, key: TaskKey) -> tuple[float | None, bool]:
        """(ms, estimated) of one kernel: the table's record, or the estimate from its
        pattern's kernels (None: a pattern the table never saw)."""
        name, wkey, _, flops = key
        if str(wkey) in self.table:
            return self.table[str(wkey)], False
        line = self._lines.get(pattern(str(name)))
        if line is None:
            return None, True
        a, b = line
        return (max(a + b * float(flops or 0.0), 0.0) if flops else max(a, 0.0)), True

    def kernel_sum(self, keys: Sequence[TaskKey]) -> tuple[float | None, int]:
        """(weighted sum of the kernels' ms or None if one cannot be estimated, how many
        were estimated rather than looked up)."""
        total, est = 0.0, 0
        for k in keys:
            ms, guessed = self.kernel_ms(k)
            if ms is None:
                return None, est + 1
            total += int(k[2]) * ms
            est += guessed
        return total, est

    def predict_keys(self, keys: Sequence[TaskKey]) -> tuple[float | None, int]:
        """(predicted ms at the reference speed or None, kernels estimated)."""
        s, est = self.kernel_sum(keys)
        return (None if s is None else self.c0 + self.scale * s), est

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = d / KERNELS_FILE
        tmp = out.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "schema_version": 1,
                    "c0": self.c0,
                    "scale": self.scale,
                    "card": self.card,
                    "kernels": {
                        k: [ms, *self.info.get(k, ("", None))] for k, ms in self.table.items()
                    },
                },
                indent=1,
            )
        )
        tmp.replace(out)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> KernelModel:
        """Raises ConfigError: no ``kernels.json`` there, or not one this voxfit reads."""
        f = Path(directory) / KERNELS_FILE
        try:
            raw = json.loads(f.read_text())
            kernels = raw["kernels"]
            return cls(
                table={k: float(v[0]) for k, v in kernels.items()},
                info={k: (str(v[1]), v[2]) for k, v in kernels.items()},
                c0=float(raw["c0"]),
                scale=float(raw["scale"]),
                card=dict(raw.get("card") or {}),
            )
        except FileNotFoundError:
            raise ConfigError(f"{f}: no kernel model here (run: voxfit device onboard)") from None
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ConfigError(f"{f}: not a kernel model ({type(e).__name__}: {e})") from None


def _line(xs: list[tuple[float | None, float]]) -> tuple[float, float]:
    """(a, b) of ms = a + b * FLOPs over one pattern's kernels: least squares with two
    distinct FLOP counts or more, through the origin with one, the mean time without."""
    pts = [(float(f), ms) for f, ms in xs if f]
    if len({f for f, _ in pts}) >= 2:
        f, m = np.asarray(pts).T
        b, a = np.polyfit(f, m, 1)
        if b > 0:
            return float(a), float(b)
    if pts:
        return 0.0, float(np.median([m / f for f, m in pts]))
    return float(np.mean([ms for _, ms in xs])), 0.0


def _least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(c0, s) minimizing the sum of squared relative errors ((c0 + s x_i) / y_i - 1)^2."""
    w = 1.0 / y
    beta, *_ = np.linalg.lstsq(np.c_[w, x * w], y * w, rcond=None)
    return float(beta[0]), float(beta[1])


def _least_absolute(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(c0, s >= 0) minimizing the sum of |(c0 + s x_i) / y_i - 1| (a linear program): a
    sample whose kernel sum is off (a kernel disturbed while it was timed) does not pull
    the line for every other sample the way a squared error does."""
    from scipy.optimize import linprog

    n = len(y)
    # variables: c0, s, e_1..e_n; minimize sum e_i with |(c0 + s x_i) / y_i - 1| <= e_i
    a = np.c_[1.0 / y, x / y]
    eye = np.eye(n)
    res = linprog(
        np.r_[0.0, 0.0, np.ones(n)],
        A_ub=np.r_[np.c_[a, -eye], np.c_[-a, -eye]],
        b_ub=np.r_[np.ones(n), -np.ones(n)],
        bounds=[(None, None), (0.0, None)] + [(0.0, None)] * n,
        method="highs",
    )
    if not res.success:  # not expected (feasible, bounded): squares instead
        return _least_squares(x, y)
    return float(res.x[0]), float(res.x[1])


#: the line fits :func:`fit_kernels` chooses from, by leave-one-out error on the samples
FITS = {"least_squares": _least_squares, "least_absolute": _least_absolute}


def _loo_mape(fit: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Mean |relative error| of each sample predicted by the line fitted without it."""
    errs = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        c0, s = fit(x[keep], y[keep])
        errs.append(abs((c0 + s * x[i]) / y[i] - 1.0))
    return float(np.mean(errs))


def fit_kernels(
    samples: Sequence[tuple[Sequence[TaskKey], float]],
    table: dict[str, float],
    *,
    info: dict[str, tuple[str, float | None]] | None = None,
) -> KernelModel:
    """Fit ``c0`` and the scale on ``samples`` (each: a measured model's task keys, its ms at
    the device's reference speed) over ``table`` (:func:`database_kernels`), by least
    squared or least absolute relative errors, whichever predicts the samples better left
    out one at a time (the card says which, ``fit``); ``info``: the
    pattern and FLOPs of table kernels beyond the samples' own (the samples' are taken
    from their keys).

    Raises:
        ConfigError: fewer than 3 samples whose kernels the table all has, or a
            non-positive or non-finite time.
    """
    meta = dict(info or {})
    for keys, _ in samples:
        for name, k, _, flops in keys:
            meta.setdefault(str(k), (pattern(str(name)), flops))
    model = KernelModel(dict(table), {k: meta[k] for k in table if k in meta})
    xs, ys = [], []
    for keys, y in samples:
        s, est = model.kernel_sum(keys)
        if s is None or est:
            continue
        if not (math.isfinite(y) and y > 0):
            raise ConfigError("kernel fit: every measured time must be a positive number")
        xs.append(s)
        ys.append(float(y))
    if len(ys) < 3:
        raise ConfigError(
            f"kernel fit: {len(ys)} of {len(samples)} samples have every kernel in the "
            "device's database; measure at least 3"
        )
    x, yy = np.asarray(xs), np.asarray(ys)
    # which line: the one whose leave-one-out error on the samples is lower (measured: least
    # squares on the no-AVX RPC device's 20 samples, least absolute errors on the sibling
    # host's, where two samples 16% and 26% off pulled the squares' line; README)
    loo = {name: _loo_mape(f, x, yy) for name, f in FITS.items()} if len(yy) >= 4 else {}
    how = min(loo, key=lambda k: loo[k]) if loo else "least_squares"
    c0, scale = FITS[how](x, yy)
    if scale <= 0:  # a degenerate sample set: a pure scale instead
        c0, scale = 0.0, float(np.median(yy / x))
    model.c0, model.scale = float(c0), float(scale)
    from voxfit.cost_models._model import metrics

    model.card = {
        "n_samples": len(ys),
        "n_kernels": len(table),
        "coef": {"c0": model.c0, "scale": model.scale},
        "fit": how,
        "loo_mape": loo,
        "fit_metrics": metrics((model.c0 + model.scale * x).tolist(), ys),
    }
    return model
