"""Early stopping across objectives: a trial stops before its adaptation when even an
optimistic bound on its objectives is dominated by the study's current front.

Optuna's pruners judge one intermediate value per step (single objective); this is the
multi-objective counterpart, on Optuna's trial states. The objective gets the cheap
objectives first -- size, dev PER, the cost model's latency prediction and the PER of the
held-out speakers *before* adaptation -- and bounds the two it has not paid for:

- post-adaptation PER: at best the PER before adaptation less the largest *relative* gain
  (gain / PER before) any complete trial of the study made, plus ``gain_slack``;
- latency: the prediction, ``latency_margin`` better (as the promotion rule's margin), or
  ``low_confidence_margin`` better where the cost model does not trust its prediction.

A trial whose bound a front point dominates is PRUNED with its partial record (the
record's ``stopped`` says why): no adaptation, no TVM measurement. The bound is
optimistic, not a proof: ``benchmarks/early_stop.py`` measures how many stopped trials
would have reached the front had they run to the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from voxfit.errors import VoxfitError
from voxfit.latency import dominates
from voxfit.search._record import TrialRecord


@dataclass(frozen=True, slots=True)
class EarlyStop:
    """When a trial may stop before adaptation (see the module)."""

    gain_slack: float = 0.10  # added to the largest relative adaptation gain seen
    latency_margin: float = 0.10
    low_confidence_margin: float = 0.50
    min_complete: int = 4  # complete trials (their gains known) before any trial stops


class StoppedEarly(VoxfitError):
    """A trial's optimistic bound is dominated by a front point (the objective prunes it)."""

    def __init__(self, bound: Sequence[float], by: Sequence[float], pre_adapt_per: float):
        self.bound = tuple(bound)
        self.by = tuple(by)
        self.pre_adapt_per = pre_adapt_per
        fmt = ", ".join
        super().__init__(
            f"stopped before adaptation: its best case ({fmt(f'{v:.3g}' for v in bound)}) "
            f"is dominated by the front point ({fmt(f'{v:.3g}' for v in by)})"
        )


def largest_relative_gain(recs: Sequence[TrialRecord]) -> float | None:
    """The largest adaptation gain / PER before among complete trials (None: none known)."""
    gains = [
        r.accuracy.adapt_gain / r.accuracy.pre_adapt_per
        for r in recs
        if r.complete
        and r.accuracy.adapt_gain is not None
        and r.accuracy.pre_adapt_per is not None
        and r.accuracy.pre_adapt_per > 0
    ]
    return max(gains) if gains else None


def optimistic_bound(
    predicted_ms: float,
    low_confidence: bool,
    pre_adapt_per: float,
    dev_per: float,
    size_mb: float,
    relative_gain: float,
    cfg: EarlyStop,
) -> tuple[float, float, float, float]:
    """The best objectives (latency, post-adaptation PER, dev PER, size) the trial could
    still reach, given what it measured and the study's largest relative gain."""
    margin = cfg.low_confidence_margin if low_confidence else cfg.latency_margin
    keep = max(0.0, 1.0 - relative_gain - cfg.gain_slack)
    return (predicted_ms * (1.0 - margin), pre_adapt_per * keep, dev_per, size_mb)


def dominating_point(
    bound: Sequence[float], front: Sequence[Sequence[float]]
) -> tuple[float, ...] | None:
    """A front point that dominates ``bound`` (None: the trial may still reach the front)."""
    for f in front:
        if dominates(f, bound):
            return tuple(f)
    return None
