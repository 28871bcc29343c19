"""The promoting estimator's decisions, with a fake predictor and a fake measurer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from tests._tiny import tiny_tdnn
from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile, InputSpec, pick_local_profile
from voxfit.latency import (
    LatencyResult,
    PredictedEstimator,
    PredictedLatency,
    PromotingEstimator,
    always,
    dominates,
    front_rule,
    make_estimator,
    should_measure,
)

ROOT = Path(__file__).resolve().parents[2]


class _Predictor:
    basis = "reference"
    card: dict[str, Any] = {}

    def __init__(self, ms: float, low_confidence: bool = False, fail: bool = False) -> None:
        self.ms, self.low, self.fail = ms, low_confidence, fail

    def predict(self, model: nn.Module, frames: int) -> PredictedLatency:
        if self.fail:
            raise KeyError("no such task kind")  # not even a VoxfitError: still a result
        return PredictedLatency(ms=self.ms, low_confidence=self.low, reasons=("why",))

    def reference_ms(self, input_name: str, reference: nn.Module) -> float | None:
        return 4.0


class _Measurer:
    """Times at a host 2x slower than the predictor's reference speed."""

    def __init__(self, profile: HardwareProfile) -> None:
        self.profile = profile
        self.calls: list[tuple[str, ...]] = []
        self.closed = False

    def estimate(
        self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
    ) -> list[LatencyResult]:
        specs = inputs or self.profile.inputs
        self.calls.append(tuple(s.name for s in specs))
        return [
            LatencyResult(
                profile=self.profile.name,
                input=s.name,
                frames=s.frames,
                method="local",
                median_ms=4.0,
                reference_ms=16.0,
                relative=0.25,
            )
            for s in specs
        ]

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def profile() -> HardwareProfile:
    return pick_local_profile(ROOT / "hw_profiles")


def _stack(profile: HardwareProfile, pred: _Predictor, **kw: Any) -> PromotingEstimator:
    return PromotingEstimator(profile, PredictedEstimator(profile, pred), _Measurer(profile), **kw)


def test_a_trusted_prediction_is_not_measured(profile: HardwareProfile) -> None:
    est = _stack(profile, _Predictor(2.0))
    results = est.estimate(tiny_tdnn(varied_bn=False))
    assert [r.method for r in results] == ["predicted"] * len(profile.inputs)
    assert results[0].median_ms == 2.0
    assert results[0].basis == "reference"
    assert est.measurer.calls == []  # type: ignore[union-attr]


def test_low_confidence_and_failed_predictions_are_measured(profile: HardwareProfile) -> None:
    for pred in (_Predictor(2.0, low_confidence=True), _Predictor(2.0, fail=True)):
        est = _stack(profile, pred, reference=tiny_tdnn(varied_bn=False))
        results = est.estimate(tiny_tdnn(varied_bn=False))
        assert all(r.method == "local" for r in results)
        r = results[0]
        assert r.predicted is not None
        assert r.predicted.ok is (not pred.fail)
        # measured at 0.25 of the base, put on the predictor's speed (base: 4 ms there)
        assert r.basis == "reference"
        assert r.at_reference_ms == pytest.approx(1.0)
        assert r.value_ms == pytest.approx(1.0)
        assert r.median_ms == 4.0  # the raw median is kept


def test_the_call_rule_overrides_and_only_promoted_inputs_are_measured(
    profile: HardwareProfile,
) -> None:
    est = _stack(profile, _Predictor(2.0))
    first = profile.inputs[0].name
    results = est.estimate(tiny_tdnn(varied_bn=False), promote=lambda p: p.input == first)
    assert est.measurer.calls == [(first,)]  # type: ignore[union-attr]
    assert [r.input for r in results] == [s.name for s in profile.inputs]
    assert results[0].method == "local"
    assert all(r.method == "predicted" for r in results[1:])
    # without a reference timed alongside, a measurement stays on the raw scale
    assert results[0].basis == "raw"
    assert results[0].value_ms == 4.0


def test_without_a_predictor_everything_is_measured(profile: HardwareProfile) -> None:
    est = PromotingEstimator(profile, None, _Measurer(profile))
    assert all(
        r.method == "local" and r.predicted is None
        for r in est.estimate(tiny_tdnn(varied_bn=False))
    )
    est.close()
    assert est.measurer.closed  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="predictor, a measurer or both"):
        PromotingEstimator(profile, None, None)


def test_front_rule_promotes_near_the_front(profile: HardwareProfile) -> None:
    front = [(1.0, 20.0, 5.0), (2.0, 18.0, 4.6)]
    assert dominates((1.0, 19.0, 5.0), (1.0, 20.0, 5.0))
    assert not dominates((1.0, 20.0, 5.0), (1.0, 20.0, 5.0))
    assert not should_measure((3.0, 21.0, 6.0), front)  # dominated even 10% faster
    assert should_measure((1.05, 19.9, 5.0), front)  # within 10% of the front's latency
    assert should_measure((3.0, 21.0, 6.0), front, low_confidence=True)
    assert should_measure((3.0, 21.0, 6.0), [])
    slow = _stack(profile, _Predictor(3.0)).estimate(
        tiny_tdnn(varied_bn=False), promote=front_rule((21.0, 6.0), front)
    )
    assert slow[0].method == "predicted"
    near = _stack(profile, _Predictor(1.05)).estimate(
        tiny_tdnn(varied_bn=False), promote=front_rule((19.9, 5.0), front)
    )
    assert near[0].method == "local"
    assert always(slow[0])


def test_make_estimator_builds_the_stack_the_profile_names(
    profile: HardwareProfile, tmp_path: Path
) -> None:
    predicted = dataclasses.replace(
        profile, measurement=dataclasses.replace(profile.measurement, method="predicted")
    )
    with pytest.raises(ConfigError, match="needs a fitted cost model"):
        make_estimator(predicted, tmp_path)
    est = make_estimator(predicted, tmp_path, predictor=_Predictor(2.0))
    assert est.measurer is None
    assert est.method == "predicted"
    local = make_estimator(profile, tmp_path, predictor=_Predictor(2.0), tune=False)
    assert local.method == "local"
    assert local.predictor is not None
    local.close()
    rpc = dataclasses.replace(
        profile, measurement=dataclasses.replace(profile.measurement, method="rpc", rpc=None)
    )
    with pytest.raises(ConfigError, match="measurement.rpc is required"):
        make_estimator(rpc, tmp_path)


class _Learning(_Predictor):
    """A predictor that learns from measurements (a host calibration's hook)."""

    def __init__(self, ms: float) -> None:
        super().__init__(ms, low_confidence=True)
        self.seen: list[tuple[int, float]] = []

    def observe(self, model: nn.Module, frames: int, ms_at_reference: float) -> None:
        self.seen.append((frames, ms_at_reference))


def test_measurements_at_the_reference_speed_reach_a_learning_predictor(
    profile: HardwareProfile,
) -> None:
    pred = _Learning(3.0)
    stack = _stack(profile, pred, reference=nn.Identity())
    out = stack.estimate(nn.Identity(), profile.inputs[:1])
    assert out[0].at_reference_ms == pytest.approx(1.0)  # relative 0.25 x reference 4 ms
    assert pred.seen == [(profile.inputs[0].frames, pytest.approx(1.0))]
    # without a reference there is no drift-free time to learn from
    _stack(profile, pred).estimate(nn.Identity(), profile.inputs[:1])
    assert len(pred.seen) == 1


class _Drifting(_Measurer):
    """Times a candidate at a fixed 0.5 of the base while the host's speed swings."""

    def __init__(self, profile: HardwareProfile, base_ms: list[float]) -> None:
        super().__init__(profile)
        self.base_ms = list(base_ms)

    def estimate(
        self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
    ) -> list[LatencyResult]:
        ref = self.base_ms.pop(0)
        return [
            dataclasses.replace(r, median_ms=0.5 * ref, reference_ms=ref, relative=0.5)
            for r in super().estimate(model, inputs)
        ]


def test_without_a_predictor_paired_measurements_share_the_quietest_base_scale(
    profile: HardwareProfile,
) -> None:
    # the base ran 2 ms when quiet, 3 ms in a slow minute: the raw medians swing 1.5x
    est = PromotingEstimator(profile, None, _Drifting(profile, [3.0, 2.0, 3.0, 2.2]))
    first = profile.inputs[:1]
    out = [est.estimate(tiny_tdnn(varied_bn=False), first)[0] for _ in range(4)]
    assert [r.median_ms for r in out] == [1.5, 1.0, 1.5, 1.1]
    assert all(r.basis == "base" for r in out)
    # the first on the only base time seen yet, then all on the quietest (2 ms)
    assert [r.value_ms for r in out] == pytest.approx([1.5, 1.0, 1.0, 1.0])

    class _Unpaired(_Measurer):
        def estimate(
            self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
        ) -> list[LatencyResult]:
            out = super().estimate(model, inputs)
            return [dataclasses.replace(r, reference_ms=None, relative=None) for r in out]

    r = PromotingEstimator(profile, None, _Unpaired(profile)).estimate(
        tiny_tdnn(varied_bn=False), first
    )[0]
    assert (r.basis, r.value_ms) == ("raw", 4.0)  # no base timed alongside: the raw median
