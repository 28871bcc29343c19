"""The cost model as a latency estimator, and the rule that promotes candidates to a real
measurement during a search."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from voxfit.cost_models._features import decompose
from voxfit.cost_models._model import CostModel, Prediction, load_for
from voxfit.hw_profiles import HardwareProfile, InputSpec
from voxfit.latency import LatencyResult


class PredictedEstimator:
    """A :class:`~voxfit.latency.LatencyEstimator` that predicts instead of measuring.

    Raises:
        ConfigError: at construction, when the profile has no cost model or it was trained
            for another profile.
    """

    method = "predicted"

    def __init__(
        self,
        profile: HardwareProfile,
        cost_models_dir: str | Path = "cost_models",
        model: CostModel | None = None,
    ) -> None:
        self.profile = profile
        self.model = model or load_for(profile, cost_models_dir)
        self.model.check_profile(profile)
        self.last: list[Prediction] = []

    def __enter__(self) -> PredictedEstimator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def estimate(
        self, model: nn.Module, inputs: tuple[InputSpec, ...] | None = None
    ) -> list[LatencyResult]:
        from voxfit.metrics import packed_size_bytes

        out = []
        self.last = []
        weights = int(packed_size_bytes(model))
        for spec in inputs or self.profile.inputs:
            t0 = time.monotonic()
            tasks = decompose(model, spec.frames)
            p = self.model.predict_tasks(tasks)
            self.last.append(p)
            # the largest task's activations: what a static memory plan must hold at once
            act_bytes = int(max((t.features["act_kb"] for t in tasks), default=0.0) * 1e3)
            out.append(
                LatencyResult(
                    profile=self.profile.name,
                    input=spec.name,
                    frames=spec.frames,
                    method="predicted",
                    median_ms=p.ms,
                    weight_bytes=weights,
                    activation_bytes=act_bytes,
                    measure_s=time.monotonic() - t0,
                    note="; ".join(p.reasons[:3]) if p.low_confidence else "",
                )
            )
        return out


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
