"""The fitted cost model as the latency stack's predictor (``voxfit.latency``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torch import nn

from voxfit.cost_models._features import decompose
from voxfit.cost_models._model import CostModel, load_for
from voxfit.hw_profiles import HardwareProfile
from voxfit.latency import PredictedEstimator, PredictedLatency


class CostModelPredictor:
    """A :class:`~voxfit.latency.LatencyPredictor` backed by a fitted :class:`CostModel`.

    Its milliseconds are at the reference speed when the model was fitted on drift-free
    labels (its card knows the reference model's typical time), else raw medians.
    """

    def __init__(self, model: CostModel) -> None:
        self.model = model
        self.basis: Literal["raw", "reference"] = (
            "reference" if model.card.get("reference_ms") else "raw"
        )

    @property
    def card(self) -> Mapping[str, Any]:
        return self.model.card

    def predict(self, model: nn.Module, frames: int) -> PredictedLatency:
        """Raises ModelError for a model it cannot decompose into its tasks."""
        tasks = decompose(model, frames)
        p = self.model.predict_tasks(tasks)
        # the largest task's activations: what a static memory plan must hold at once
        act_bytes = int(max((t.features["act_kb"] for t in tasks), default=0.0) * 1e3)
        return PredictedLatency(
            ms=p.ms,
            activation_bytes=act_bytes,
            low_confidence=p.low_confidence,
            reasons=p.reasons,
        )

    def reference_ms(self, input_name: str, reference: nn.Module) -> float | None:
        from voxfit.cost_models._dataset import reference_key

        known = self.model.card.get("reference_ms") or {}
        ms = known.get(f"{input_name}@{reference_key(reference)}")
        return float(ms) if ms else None


def load_predictor(
    profile: HardwareProfile,
    cost_models_dir: str | Path = "cost_models",
    directory: str | Path | None = None,
) -> CostModelPredictor:
    """The profile's cost model as a predictor: the one saved in ``directory`` (``voxfit
    cost-model fit`` output) if given, else the shipped one under ``cost_models_dir``.

    Raises:
        ConfigError: no cost model there, or it was trained for another profile.
    """
    return CostModelPredictor(load_for(profile, cost_models_dir, directory))


def predicted_estimator(
    profile: HardwareProfile,
    cost_models_dir: str | Path = "cost_models",
    model: CostModel | None = None,
) -> PredictedEstimator:
    """A predicting estimator for ``profile`` (``model``, or the profile's fitted one).

    Raises:
        ConfigError: no cost model, or one trained for another profile.
    """
    if model is not None:
        model.check_profile(profile)
        return PredictedEstimator(profile, CostModelPredictor(model))
    return PredictedEstimator(profile, load_predictor(profile, cost_models_dir))
