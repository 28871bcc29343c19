"""Learned latency cost models per hardware profile (``cost_models/<profile>/``)."""

from voxfit.cost_models._dataset import (
    append,
    collect,
    dataset_dir,
    drop_noisy,
    load_dataset,
    reference_key,
    rows_of,
    sample_candidates,
)
from voxfit.cost_models._estimator import PredictedEstimator, dominates, should_measure
from voxfit.cost_models._features import FEATURES, Task, attribute_calls, decompose
from voxfit.cost_models._model import (
    CostModel,
    Prediction,
    evaluate,
    fit,
    hardware_key,
    load_for,
    metrics,
    metrics_table,
    model_dir,
    roofline_ms,
    split,
)

__all__ = [
    "FEATURES",
    "CostModel",
    "PredictedEstimator",
    "Prediction",
    "Task",
    "append",
    "attribute_calls",
    "collect",
    "dataset_dir",
    "decompose",
    "dominates",
    "drop_noisy",
    "evaluate",
    "fit",
    "hardware_key",
    "load_dataset",
    "load_for",
    "metrics",
    "metrics_table",
    "model_dir",
    "roofline_ms",
    "reference_key",
    "rows_of",
    "sample_candidates",
    "should_measure",
    "split",
]
