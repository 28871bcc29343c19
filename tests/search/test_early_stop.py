"""Early stopping across objectives: the bound, the adaptation's stop point, and a study
whose dominated trial stops (PRUNED, counted) before adaptation and measurement."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from voxfit.hw_profiles import find_profile, load_profile
from voxfit.latency import LatencyResult
from voxfit.models import build_model, default_config
from voxfit.search import AccuracyRecord, TrialRecord, record_of
from voxfit.search._early import (
    EarlyStop,
    StoppedEarly,
    dominating_point,
    largest_relative_gain,
    optimistic_bound,
)
from voxfit.search._study import SearchSettings, finished_trials, make_objective
from voxfit.spaces import find_space
from voxfit.train import _adapt

ROOT = Path(__file__).resolve().parents[2]


def _rec(pre: float | None, gain: float | None, state: str = "COMPLETE") -> TrialRecord:
    return TrialRecord(
        number=0,
        state=state,
        values=(1.0, 1.0, 1.0, 1.0) if state == "COMPLETE" else None,
        accuracy=AccuracyRecord(pre_adapt_per=pre, adapt_gain=gain),
    )


def test_the_bound_takes_the_largest_relative_gain_and_the_latency_margin() -> None:
    recs = [_rec(40.0, 10.0), _rec(20.0, 8.0), _rec(30.0, None), _rec(50.0, 45.0, "FAIL")]
    assert largest_relative_gain(recs) == pytest.approx(0.4)  # 8/20; the FAILED one ignored
    assert largest_relative_gain([_rec(None, 3.0)]) is None
    cfg = EarlyStop(gain_slack=0.1, latency_margin=0.1, low_confidence_margin=0.5)
    b = optimistic_bound(2.0, False, 30.0, 5.0, 1.5, 0.4, cfg)
    assert b == pytest.approx((1.8, 15.0, 5.0, 1.5))  # 30 x (1 - 0.4 - 0.1)
    assert optimistic_bound(2.0, True, 30.0, 5.0, 1.5, 0.4, cfg)[0] == pytest.approx(1.0)
    assert optimistic_bound(2.0, False, 30.0, 5.0, 1.5, 0.95, cfg)[1] == 0.0  # never below 0
    front = [(1.5, 14.0, 4.0, 1.0), (3.0, 10.0, 3.0, 2.0)]
    assert dominating_point(b, front) == (1.5, 14.0, 4.0, 1.0)
    assert dominating_point((1.4, 15.0, 5.0, 1.5), front) is None  # faster than all: may win


def test_the_adaptation_stops_after_every_speaker_is_scored_and_before_any_adapts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    class _Manifest:
        def by_speaker(self, split: str) -> dict[str, list[str]]:
            return {"a": [f"{split}-a"], "b": [f"{split}-b"]}

    def per(model: Any, utts: list[str], store: Any, inv: Any) -> float:
        calls.append(f"per {utts[0]}")
        return 20.0 if utts[0].endswith("a") else 40.0

    def adapt(*a: Any) -> Any:
        calls.append("adapt")
        return a[0]

    monkeypatch.setattr(_adapt, "phone_error_rate", per)
    monkeypatch.setattr(_adapt, "adapt_speaker", adapt)
    seen: list[float] = []

    def check(pre: float) -> None:
        seen.append(pre)
        raise StoppedEarly((1, 2, 3, 4), (0, 1, 2, 3), pre)

    m = _Manifest()
    with pytest.raises(StoppedEarly):
        _adapt.measure_adaptation(None, m, None, None, None, before_check=check)  # type: ignore[arg-type]
    assert seen == [30.0]
    assert calls == ["per eval-a", "per eval-b"]  # scored, never adapted
    calls.clear()
    r = _adapt.measure_adaptation(None, m, None, None, None, before_check=seen.append)  # type: ignore[arg-type]
    assert calls.count("adapt") == 2
    assert r.per_before == 30.0  # each speaker scored once


class _Ctx:
    """The search context's two calls: a fixed tiny model; accuracy from a script."""

    def __init__(self, model: torch.nn.Module, script: list[tuple[float, float, float]]):
        self.model, self.script, self.adapted = model, script, 0
        self.base = model

    def build(self, *a: Any, **kw: Any) -> torch.nn.Module:
        return self.model

    def accuracy(self, model: Any, *, full: bool = False, before_check: Any = None) -> dict:  # type: ignore[type-arg]
        dev, pre, post = self.script.pop(0)
        if before_check is not None:
            before_check(dev, pre)
        self.adapted += 1
        return {
            "dev_per": dev, "pre_adapt_per": pre, "post_adapt_per": post,
            "adapt_gain": pre - post, "per_speaker": {}, "dev_s": 0.0, "adapt_s": 0.0,
        }  # fmt: skip


class _Latency:
    """Predicts the trials' latencies from a script; counts the measurements asked for."""

    predictor = object()

    def __init__(self, script: list[float]) -> None:
        self.script, self.measured = script, 0

    def _r(self) -> LatencyResult:
        ms = self.script.pop(0)
        return LatencyResult(
            profile="p", input="utterance_1s", frames=100, method="predicted", median_ms=ms
        )

    def predict(self, model: Any, inputs: Any) -> list[LatencyResult]:
        return [self._r()]

    def estimate(self, model: Any, inputs: Any, *, promote: Any, predicted: Any) -> list:  # type: ignore[type-arg]
        predicted = predicted or [self._r()]  # a baseline: not predicted before
        if promote(predicted[0]):
            self.measured += 1
            return [replace(predicted[0], method="local", predicted=predicted[0])]
        return list(predicted)


def test_a_dominated_trial_stops_before_adaptation_and_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", 20, "tiny")).eval()
    profile = load_profile(find_profile("x86-avx2-2core"))
    space = find_space(ROOT / "spaces" / "tdnn-default.yaml").bind(base.structure())
    s = SearchSettings(profile, space, "sqlite://", "t", 10, early_stop=EarlyStop())
    # four trials make the study's front and gains (best relative gain 10/40 = 0.25);
    # the fifth is slower (4 ms predicted: 3.6 at best) and worse before adaptation than the
    # front after it, even at that gain + 0.1; the sixth is as bad but a baseline
    good = [(5.0, 40.0, 30.0), (5.5, 40.0, 32.0), (6.0, 42.0, 33.0), (6.5, 44.0, 35.0)]
    bad = (9.0, 80.0, 60.0)
    ctx = _Ctx(base, [*good, bad, bad])
    lat = _Latency([2.0, 2.0, 2.0, 2.0, 4.0, 4.0])
    study = optuna.create_study(directions=["minimize"] * 4)
    objective = make_objective(ctx, s, lat)  # type: ignore[arg-type]
    study.optimize(objective, n_trials=5, catch=(Exception,))
    study.enqueue_trial({}, user_attrs={"baseline": "fp32"})
    study.optimize(objective, n_trials=1, catch=(Exception,))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 4 + [TrialState.PRUNED, TrialState.COMPLETE]
    assert ctx.adapted == 5  # the stopped trial never adapted
    assert lat.measured == 5  # ... nor was measured
    r = record_of(study.trials[4])
    assert r.stopped is not None
    assert "dominated by the front point" in r.stopped
    assert (r.accuracy.dev_per, r.accuracy.pre_adapt_per) == (9.0, 80.0)
    assert r.accuracy.post_adapt_per is None
    assert r.latency.source == "predicted"
    assert r.plan is not None
    assert r.size_mb is not None
    assert r.stop_bound == pytest.approx((3.6, 80.0 * 0.65, 9.0, r.size_mb))
    assert finished_trials(study) == 6
    # with early stopping off, the same trial runs to the end
    ctx2 = _Ctx(base, [*good, bad])
    s2 = replace(s, early_stop=None)
    study2 = optuna.create_study(directions=["minimize"] * 4)
    lat2 = _Latency([2.0, 2.0, 2.0, 2.0, 4.0])
    study2.optimize(make_objective(ctx2, s2, lat2), n_trials=5)  # type: ignore[arg-type]
    assert all(t.state == TrialState.COMPLETE for t in study2.trials)
    assert ctx2.adapted == 5
