"""Latency of a candidate on a hardware profile: local TVM, TVM RPC (cost model: predicted)."""

from voxfit.latency._estimators import (
    LatencyEstimator,
    LatencyResult,
    TvmLocalEstimator,
    TvmRpcEstimator,
    make_estimator,
    summarize,
)

__all__ = [
    "LatencyEstimator",
    "LatencyResult",
    "TvmLocalEstimator",
    "TvmRpcEstimator",
    "make_estimator",
    "summarize",
]
