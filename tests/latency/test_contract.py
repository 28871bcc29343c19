"""The estimator contract, run over every estimator of the latency stack.

Every estimator returns exactly one result per input, in the inputs' order, each naming
its input; a model it cannot handle (unexportable, unfeaturizable, an unreachable device)
is a result with a one-line ``error``, never an exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests._tiny import tiny_tdnn
from voxfit.compile import TvmWorker
from voxfit.errors import ModelError
from voxfit.hw_profiles import HardwareProfile, RpcSpec, pick_local_profile
from voxfit.latency import (
    LatencyEstimator,
    PredictedEstimator,
    PredictedLatency,
    PromotingEstimator,
    TvmLocalEstimator,
    TvmRpcEstimator,
    always,
)
from voxfit.latency._farm import free_port

ROOT = Path(__file__).resolve().parents[2]


class _Broken(nn.Module):
    """A model nothing can handle: torch.export fails, the predictor cannot featurize it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model cannot run")


class FakePredictor:
    """ms proportional to the parameter count; refuses models without a structure."""

    basis = "raw"
    card: dict[str, Any] = {}

    def predict(self, model: nn.Module, frames: int) -> PredictedLatency:
        if not hasattr(model, "structure"):
            raise ModelError(f"{type(model).__name__} declares no structure")
        n = sum(p.numel() for p in model.parameters())
        return PredictedLatency(ms=1e-5 * n * frames / 100, activation_bytes=4 * frames)

    def reference_ms(self, input_name: str, reference: nn.Module) -> float | None:
        return None


def _profile(tmp: Path) -> HardwareProfile:
    p = pick_local_profile(ROOT / "hw_profiles")
    assert len(p.inputs) >= 2, "the contract needs a profile with two inputs"
    return dataclasses.replace(
        p,
        cores=1,
        measurement=dataclasses.replace(p.measurement, repeats=3, min_repeat_ms=1, warmup=1),
        tuning=dataclasses.replace(p.tuning, database_dir=str(tmp / "tuning")),
    )


@pytest.fixture(scope="module")
def worker() -> Iterator[TvmWorker]:
    with TvmWorker(1) as w:
        yield w


class EstimatorContract:
    """Subclass per estimator; ``make`` builds it for ``profile``."""

    method: str
    can_measure = True  # False: every result is an error for a working model too

    def make(self, profile: HardwareProfile, tmp: Path, request: Any) -> LatencyEstimator:
        raise NotImplementedError

    @pytest.fixture
    def estimator(
        self, tmp_path: Path, request: pytest.FixtureRequest
    ) -> Iterator[tuple[Any, HardwareProfile]]:
        profile = _profile(tmp_path)
        est = self.make(profile, tmp_path, request)
        try:
            yield est, profile
        finally:
            est.close()

    def test_one_result_per_input_in_order(self, estimator: Any) -> None:
        est, profile = estimator
        results = est.estimate(tiny_tdnn(varied_bn=False), profile.inputs)
        assert [r.input for r in results] == [s.name for s in profile.inputs]
        assert [r.frames for r in results] == [s.frames for s in profile.inputs]
        for r in results:
            assert r.method == self.method
            assert r.profile == profile.name
            if self.can_measure:
                assert r.ok, r.error
                assert r.median_ms is not None
                assert r.median_ms > 0
                assert r.value_ms == (r.at_reference_ms or r.median_ms)
            else:
                assert not r.ok
                assert r.error
                assert "\n" not in r.error
        # one input asked, one result
        assert len(est.estimate(tiny_tdnn(varied_bn=False), profile.inputs[1:2])) == 1

    def test_a_model_it_cannot_handle_is_a_result(self, estimator: Any) -> None:
        est, profile = estimator
        results = est.estimate(_Broken(), profile.inputs)
        assert [r.input for r in results] == [s.name for s in profile.inputs]
        for r in results:
            assert not r.ok
            assert r.median_ms is None
            assert r.error
            assert "\n" not in r.error


class TestPredictedEstimator(EstimatorContract):
    method = "predicted"

    def make(self, profile: HardwareProfile, tmp: Path, request: Any) -> LatencyEstimator:
        return PredictedEstimator(profile, FakePredictor())


class TestPromotingPredictOnly(EstimatorContract):
    """A ``predicted`` profile: the stack without a measurer."""

    method = "predicted"

    def make(self, profile: HardwareProfile, tmp: Path, request: Any) -> LatencyEstimator:
        return PromotingEstimator(
            profile, PredictedEstimator(profile, FakePredictor()), None, rule=always
        )


@pytest.mark.tvm
@pytest.mark.slow
class TestTvmLocalEstimator(EstimatorContract):
    method = "local"

    def make(self, profile: HardwareProfile, tmp: Path, request: Any) -> LatencyEstimator:
        w = request.getfixturevalue("worker")
        return TvmLocalEstimator(profile, tmp / "builds", tune=False, worker=w)


@pytest.mark.tvm
@pytest.mark.slow
class TestTvmRpcEstimatorUnreachable(EstimatorContract):
    """No tracker listens: every input's result says so (after compiling)."""

    method = "rpc"
    can_measure = False

    def make(self, profile: HardwareProfile, tmp: Path, request: Any) -> LatencyEstimator:
        rpc = RpcSpec("127.0.0.1", free_port(), "nobody", 2.0)
        p = dataclasses.replace(
            profile, measurement=dataclasses.replace(profile.measurement, method="rpc", rpc=rpc)
        )
        w = request.getfixturevalue("worker")
        return TvmRpcEstimator(p, tmp / "builds", tune=False, worker=w)


@pytest.mark.tvm
@pytest.mark.slow
class TestPromotingPredictThenMeasure(EstimatorContract):
    """Predict, promote every candidate (and every unfeaturizable one) to a local build."""

    method = "local"

    def make(self, profile: HardwareProfile, tmp: Path, request: Any) -> LatencyEstimator:
        w = request.getfixturevalue("worker")
        return PromotingEstimator(
            profile,
            PredictedEstimator(profile, FakePredictor()),
            TvmLocalEstimator(profile, tmp / "builds", tune=False, worker=w),
            rule=always,
        )
