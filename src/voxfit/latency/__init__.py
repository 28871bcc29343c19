"""Latency of a candidate on a hardware profile: one composable stack.

``make_estimator(profile, work, predictor=...)`` returns a :class:`PromotingEstimator`:
predict with the profile's cost model (injected, see ``voxfit.cost_models``), promote to a
real measurement (local TVM, or TVM RPC on the device) by a rule. Every estimator returns
one :class:`LatencyResult` per input; failures are results, never exceptions.
"""

from voxfit.latency._estimators import (
    LatencyEstimator,
    LatencyResult,
    TvmLocalEstimator,
    TvmRpcEstimator,
    summarize,
)
from voxfit.latency._farm import Farm, FarmError, hosted, local_farm, tracker_state
from voxfit.latency._isa import features_beyond, peer_isa, restrict_cpuid
from voxfit.latency._ort import time_onnxruntime
from voxfit.latency._stack import (
    LatencyPredictor,
    PredictedEstimator,
    PredictedLatency,
    PromotingEstimator,
    PromotionRule,
    always,
    dominates,
    front_rule,
    low_confidence_rule,
    make_estimator,
    should_measure,
)

__all__ = [
    "Farm",
    "FarmError",
    "LatencyEstimator",
    "LatencyPredictor",
    "LatencyResult",
    "PredictedEstimator",
    "PredictedLatency",
    "PromotingEstimator",
    "PromotionRule",
    "TvmLocalEstimator",
    "TvmRpcEstimator",
    "always",
    "dominates",
    "features_beyond",
    "front_rule",
    "hosted",
    "local_farm",
    "low_confidence_rule",
    "make_estimator",
    "peer_isa",
    "restrict_cpuid",
    "should_measure",
    "summarize",
    "time_onnxruntime",
    "tracker_state",
]
