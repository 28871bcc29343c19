"""The composable latency stack: predict, then promote to a measurement by a rule.

``PredictedEstimator`` wraps a learned :class:`LatencyPredictor` (the profile's cost model,
injected: this package does not import ``voxfit.cost_models``); ``PromotingEstimator``
composes a predictor and a measurer (``TvmLocalEstimator`` / ``TvmRpcEstimator``) and
decides per candidate, through a promotion rule, whether the prediction is enough. Like
every estimator, both return one :class:`LatencyResult` per input and never raise for a
candidate: a model the predictor cannot featurize is a failed prediction, which the
promoting estimator measures instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from torch import nn

from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile, InputSpec
from voxfit.latency._estimators import (
    LatencyEstimator,
    LatencyResult,
    Method,
    TvmLocalEstimator,
    TvmRpcEstimator,
)
from voxfit.metrics import packed_size_bytes

log = logging.getLogger(__name__)

Basis = Literal["raw", "reference"]
PromotionRule = Callable[[LatencyResult], bool]


@dataclass(frozen=True, slots=True)
class PredictedLatency:
    """What a predictor says of one model and input length (ms at the predictor's basis)."""

    ms: float
    activation_bytes: int = 0
    low_confidence: bool = False
    reasons: tuple[str, ...] = ()


class LatencyPredictor(Protocol):
    """A learned latency model for one profile (``voxfit.cost_models.CostModelPredictor``).

    ``basis`` is the machine speed its milliseconds are at: ``reference`` for a model
    fitted on drift-free labels (the reference model's typical speed), ``raw`` otherwise.
    ``card`` describes the fitted model (for provenance).
    """

    basis: Basis

    @property
    def card(self) -> Mapping[str, Any]: ...

    def predict(self, model: nn.Module, frames: int) -> PredictedLatency:
        """Raises VoxfitError (e.g. ModelError) for a model it cannot featurize."""
        ...

    def reference_ms(self, input_name: str, reference: nn.Module) -> float | None:
        """The typical time of ``reference`` on ``input_name`` at the predictor's basis,
        or None when the predictor never saw that reference timed."""
        ...


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere (all minimized)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def should_measure(
    predicted: Sequence[float],
    front: Sequence[Sequence[float]],
    margin: float = 0.10,
    *,
    latency_index: int = 0,
    low_confidence: bool = False,
) -> bool:
    """Promotion rule: measure for real when the candidate could be on the front.

    ``predicted`` are its objectives (minimized) with the predicted latency at
    ``latency_index``; it is promoted when, with that latency ``margin`` better than
    predicted, no point of the current ``front`` dominates it -- i.e. it is predicted within
    ``margin`` of the front -- or when the prediction is low-confidence.
    """
    if low_confidence or not front:
        return True
    optimistic = list(predicted)
    optimistic[latency_index] *= 1.0 - margin
    return not any(dominates(f, optimistic) for f in front)


def front_rule(
    quality: Sequence[float], front: Sequence[Sequence[float]], margin: float = 0.10
) -> PromotionRule:
    """:func:`should_measure` for a candidate whose other objectives are ``quality``
    (latency first, then ``quality``, as the front's points are)."""

    def rule(p: LatencyResult) -> bool:
        return should_measure(
            (p.median_ms or 0.0, *quality), front, margin, low_confidence=p.low_confidence
        )

    return rule


def low_confidence_rule(p: LatencyResult) -> bool:
    """The default rule: measure what the predictor does not trust."""
    return p.low_confidence


def always(_p: LatencyResult) -> bool:
    return True


def _close_predictor(predictor: LatencyPredictor | None) -> None:
    """A predictor that holds a process (the kernel model's TVM worker) lets it go."""
    close = getattr(predictor, "close", None)
    if callable(close):
        close()


class PredictedEstimator:
    """Predicts instead of measuring. A model the predictor cannot featurize gets a
    result with ``error`` set (``cannot predict: ...``), never an exception."""

    method = "predicted"

    def __init__(self, profile: HardwareProfile, predictor: LatencyPredictor) -> None:
        self.profile = profile
        self.predictor = predictor

    def __enter__(self) -> PredictedEstimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _close_predictor(self.predictor)

    def estimate(
        self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
    ) -> list[LatencyResult]:
        weights = packed_size_bytes(model)
        out = []
        for spec in inputs or self.profile.inputs:
            t0 = time.monotonic()
            base: dict[str, Any] = dict(
                profile=self.profile.name,
                input=spec.name,
                frames=spec.frames,
                method="predicted",
                weight_bytes=weights,
                basis=self.predictor.basis,
            )
            try:
                p = self.predictor.predict(model, spec.frames)
            except Exception as e:  # noqa: BLE001 - any model it cannot featurize is measured
                log.debug("prediction failed for %s", type(model).__name__, exc_info=True)
                out.append(
                    LatencyResult(
                        **base, measure_s=time.monotonic() - t0, error=f"cannot predict: {e}"
                    )
                )
                continue
            out.append(
                LatencyResult(
                    **base,
                    median_ms=p.ms,
                    activation_bytes=p.activation_bytes,
                    measure_s=time.monotonic() - t0,
                    low_confidence=p.low_confidence,
                    note="; ".join(p.reasons[:3]) if p.low_confidence else "",
                )
            )
        return out


class PromotingEstimator:
    """Predict every candidate; measure those the rule promotes, and those the predictor
    cannot handle.

    Either part may be absent: without a predictor every candidate is measured; without
    a measurer (a ``predicted`` profile) every result is a prediction, failed ones
    included. A measured result carries the prediction it was promoted from
    (``predicted``) and, when it timed ``reference`` alongside and the predictor knows
    that reference's typical time, its latency at the predictor's reference speed
    (``at_reference_ms``, ``basis='reference'``): predicted and measured candidates then
    share one scale however the host's speed drifts. Without a predictor, a measurement
    with a reference timed alongside is put on the quietest reference time seen so far
    (``basis='base'``): measured candidates share one scale too.

    Lifecycle: construct once per search, :meth:`estimate` per candidate, :meth:`close`.
    """

    def __init__(
        self,
        profile: HardwareProfile,
        predictor: PredictedEstimator | None,
        measurer: LatencyEstimator | None,
        *,
        rule: PromotionRule = low_confidence_rule,
        reference: nn.Module | None = None,
    ) -> None:
        if predictor is None and measurer is None:
            raise ValueError("PromotingEstimator needs a predictor, a measurer or both")
        self.profile = profile
        self.predictor = predictor
        self.measurer = measurer
        self.rule = rule
        self.reference = reference
        self._quietest: dict[str, float] = {}  # per input: the quietest base time (ms)

    @property
    def method(self) -> str:
        return "predicted" if self.measurer is None else self.measurer.profile.measurement.method

    def __enter__(self) -> PromotingEstimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.measurer is not None:
            self.measurer.close()
        if self.predictor is not None:
            self.predictor.close()

    def _on_reference(self, r: LatencyResult) -> LatencyResult:
        if r.relative is None:
            return r
        if self.predictor is None:
            return self._on_quietest_base(r)
        if self.reference is None:
            return r
        ref = self.predictor.predictor.reference_ms(r.input, self.reference)
        if ref is None:
            return r
        return replace(r, at_reference_ms=r.relative * ref, basis="reference")

    def seed_quietest(self, input_name: str, base_ms: float) -> None:
        """Start the ``base`` scale of ``input_name`` no higher than ``base_ms`` (a resumed
        search: the quietest base time its earlier trials recorded, so they and the new ones
        share one scale)."""
        if base_ms > 0:
            self._quietest[input_name] = min(self._quietest.get(input_name, base_ms), base_ms)

    def _on_quietest_base(self, r: LatencyResult) -> LatencyResult:
        """Without a predictor: the time relative to the base model timed alongside, put on
        the quietest base time this estimator has seen for the input (``basis='base'``), so
        a burst of load from other tenants does not move a candidate on the search's scale
        (the raw median would: a base timed during a slow minute looked 1.4x slower)."""
        if r.relative is None or r.reference_ms is None or not r.reference_ms > 0:
            return r
        self.seed_quietest(r.input, r.reference_ms)
        return replace(r, at_reference_ms=r.relative * self._quietest[r.input], basis="base")

    def predict(
        self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
    ) -> list[LatencyResult] | None:
        """The predictions alone, one per input (None: this stack has no predictor)."""
        if self.predictor is None:
            return None
        return list(self.predictor.estimate(model, tuple(inputs or self.profile.inputs)))

    def estimate(
        self,
        model: nn.Module,
        inputs: tuple[InputSpec, ...] | None = None,
        *,
        promote: PromotionRule | None = None,
        predicted: Sequence[LatencyResult] | None = None,
    ) -> list[LatencyResult]:
        """One result per input: the prediction, or a measurement promoted from it.

        ``promote`` replaces the constructor's rule for this call (e.g. :func:`front_rule`
        of the current front, or :func:`always` for a baseline); ``predicted``: what
        :meth:`predict` already returned for these inputs (not predicted again).
        """
        specs = tuple(inputs or self.profile.inputs)
        if self.predictor is None:
            preds: list[LatencyResult | None] = [None] * len(specs)
        elif predicted is not None and len(predicted) == len(specs):
            preds = list(predicted)
        else:
            preds = list(self.predictor.estimate(model, specs))
        if self.measurer is None:
            return [p for p in preds if p is not None]
        rule = promote or self.rule
        todo = [i for i, p in enumerate(preds) if p is None or not p.ok or rule(p)]
        out: list[LatencyResult] = [p for p in preds if p is not None]
        if not todo:
            return out
        measured = self.measurer.estimate(model, tuple(specs[i] for i in todo))
        full = list(preds)
        for i, m in zip(todo, measured, strict=True):
            full[i] = r = self._on_reference(replace(m, predicted=preds[i]))
            self._observe(model, r)
        return [r for r in full if r is not None]

    def _observe(self, model: nn.Module, r: LatencyResult) -> None:
        """Hand a measurement at the predictor's reference speed to a predictor that learns
        from them (``observe(model, frames, ms_at_reference)``: a host calibration)."""
        hook = getattr(self.predictor.predictor, "observe", None) if self.predictor else None
        if hook is not None and r.ok and r.at_reference_ms is not None:
            hook(model, r.frames, r.at_reference_ms)


def make_estimator(
    profile: HardwareProfile,
    work_dir: str | Path,
    method: Method | None = None,
    *,
    predictor: LatencyPredictor | None = None,
    rule: PromotionRule = low_confidence_rule,
    reference: nn.Module | None = None,
    **measurer_kw: Any,
) -> PromotingEstimator:
    """The whole latency stack for ``profile``: predict with ``predictor`` (when given),
    promote by ``rule`` to the measurer that ``method`` names (default: the profile's
    ``measurement.method``; ``predicted`` has none).

    ``reference``: a model the measurer times in rounds alternating with each candidate,
    on the same device (drift-free relative latencies, put on the predictor's reference
    speed; a predictor with ``observe`` learns from them, e.g. a host calibration).
    ``measurer_kw`` go to the measurer (``cost_models_dir``, ``tuning_dir``,
    ``profile_calls``, ``tune``, ``worker``, ...).

    Raises:
        ConfigError: ``predicted`` without a predictor; an unknown method; a local
            measurer for a profile this CPU cannot run; an RPC profile without
            ``measurement.rpc``.
    """
    predicted = None if predictor is None else PredictedEstimator(profile, predictor)
    measurer: LatencyEstimator | None
    match method or profile.measurement.method:
        case "local":
            measurer = TvmLocalEstimator(profile, work_dir, reference=reference, **measurer_kw)
        case "rpc":
            measurer = TvmRpcEstimator(profile, work_dir, reference=reference, **measurer_kw)
        case "predicted":
            if predicted is None:
                raise ConfigError(
                    f"{profile.source or profile.name}: measurement.method 'predicted' needs a "
                    f"fitted cost model for {profile.name} (voxfit cost-model fit)"
                )
            measurer = None
        case other:
            raise ConfigError(f"unknown measurement method {other!r}")
    return PromotingEstimator(profile, predicted, measurer, rule=rule, reference=reference)
