"""onnxruntime timing on this machine: the peer every front is compared with (its static
int8 of the base model, what a deployment team tries first)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def time_onnxruntime(
    path: str | Path, frames: int, threads: int, repeats: int = 30, *, n_mels: int = 80
) -> dict[str, Any]:
    """Wall time of ``path`` under onnxruntime's CPU provider (the session config bundles
    state, ``threads`` intra-op threads): one utterance of ``frames`` frames, 5 warm-up runs
    then ``repeats`` timed ones. Returns ``median_ms``, ``min_ms``, ``iqr_ms`` and
    ``samples_ms``."""
    from voxfit.compress import ort_session

    sess = ort_session(path, threads=threads)
    feed = {
        "feats": np.random.default_rng(0).standard_normal((1, frames, n_mels)).astype(np.float32),
        "lengths": np.array([frames], dtype=np.int64),
    }
    for _ in range(5):
        sess.run(None, feed)
    out = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        sess.run(None, feed)
        out.append((time.perf_counter() - t0) * 1e3)
    out.sort()
    q = statistics.quantiles(out, n=4) if len(out) >= 2 else [out[0]] * 3
    return {
        "median_ms": statistics.median(out),
        "min_ms": out[0],
        "iqr_ms": q[2] - q[0],
        "samples_ms": out,
    }
