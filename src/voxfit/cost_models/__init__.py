"""Learned latency cost models per hardware profile.

The shipped ``cost_models/<profile>/{dataset,model}`` are read-only at run time; what a run
measures goes to a :class:`MeasurementStore` under the work folder (:func:`measurements_dir`)
and what ``voxfit cost-model fit`` fits to :func:`fitted_model_dir` unless told otherwise.
"""

from voxfit.cost_models._dataset import (
    PROFILE_CALLS,
    collect,
    random_calibration,
    refeaturize,
    reference_key,
    reference_models,
    rows_of,
    sample_candidates,
)
from voxfit.cost_models._estimator import (
    CostModelPredictor,
    load_predictor,
    predicted_estimator,
)
from voxfit.cost_models._features import (
    ADAPTERS,
    FEATURES,
    KINDS,
    MIXING,
    Task,
    attribute_calls,
    decompose,
)
from voxfit.cost_models._model import (
    CostModel,
    Prediction,
    evaluate,
    fit,
    fitted_model_dir,
    hardware_key,
    load_for,
    metrics,
    metrics_table,
    model_dir,
    roofline_ms,
    split,
)
from voxfit.cost_models._store import (
    MeasurementStore,
    dataset_dir,
    drop_keys,
    load_dataset,
    measurements_dir,
    noisy_keys,
    write_dataset,
)

__all__ = [
    "ADAPTERS",
    "PROFILE_CALLS",
    "FEATURES",
    "KINDS",
    "MIXING",
    "CostModel",
    "CostModelPredictor",
    "MeasurementStore",
    "Prediction",
    "Task",
    "attribute_calls",
    "collect",
    "dataset_dir",
    "decompose",
    "drop_keys",
    "evaluate",
    "fit",
    "fitted_model_dir",
    "hardware_key",
    "load_dataset",
    "load_for",
    "load_predictor",
    "measurements_dir",
    "metrics",
    "metrics_table",
    "model_dir",
    "noisy_keys",
    "predicted_estimator",
    "reference_key",
    "reference_models",
    "refeaturize",
    "roofline_ms",
    "rows_of",
    "random_calibration",
    "sample_candidates",
    "split",
    "write_dataset",
]
