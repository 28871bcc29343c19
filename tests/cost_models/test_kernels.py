"""The kernel model: a device's tuning records summed per model, fitted on a few whole-model
times; kernels the table lacks estimated from their fused pattern."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from voxfit.compile._database import RECORDS, WORKLOADS
from voxfit.cost_models._kernels import (
    KernelModel,
    database_kernels,
    fit_kernels,
    pattern,
)
from voxfit.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]


def _db(d: Path, records: list[tuple[str, list[float]]]) -> Path:
    keys = list(dict.fromkeys(k for k, _ in records))
    d.mkdir(parents=True, exist_ok=True)
    (d / WORKLOADS).write_text("".join(json.dumps([k, "mod"]) + "\n" for k in keys))
    (d / RECORDS).write_text(
        "".join(json.dumps([keys.index(k), [[], s, {}, []]]) + "\n" for k, s in records)
    )
    return d


def test_the_table_keeps_each_workloads_best_mean_time_and_skips_failed_runs(
    tmp_path: Path,
) -> None:
    d = _db(
        tmp_path / "db",
        [("a", [2e-3, 4e-3]), ("a", [1e-3, 1e-3]), ("b", [1e10]), ("b", [5e-4]), ("c", [1e10])],
    )
    assert database_kernels(d) == pytest.approx({"a": 1.0, "b": 0.5})
    assert database_kernels(tmp_path / "none") == {}
    # repeats, one disturbed: the mean takes it, the median does not
    r = _db(tmp_path / "repeats", [("a", [1e-3, 1e-3, 31e-3]), ("b", [2e-3, 1e10, 2e-3])])
    assert database_kernels(r) == pytest.approx({"a": 11.0})
    assert database_kernels(r, median=True) == pytest.approx({"a": 1.0})
    (d / RECORDS).write_text("[0, [[], [0.001]\n")
    with pytest.raises(DataError, match=r"database_tuning_record\.json: line 1"):
        database_kernels(d)


def _keys(*ks: tuple[str, str, int, float]) -> list[list[object]]:
    return [list(k) for k in ks]


def test_fit_recovers_the_composition_and_estimates_a_missing_kernel_from_its_pattern(
    tmp_path: Path,
) -> None:
    table = {"c1": 1.0, "c2": 2.0, "c3": 3.0, "q": 0.1}
    conv = {"c1": 1e6, "c2": 2e6, "c3": 3e6}
    samples = []
    for a, b in (("c1", "c2"), ("c2", "c3"), ("c1", "c3"), ("c3", "c3")):
        keys = _keys(
            ("fused_conv1d1_relu", a, 1, conv[a]),
            ("fused_conv1d2_relu", b, 2, conv[b]),
            ("quantize", "q", 1, 0.0),
        )
        s = table[a] + 2 * table[b] + 0.1
        samples.append((keys, 0.3 + 1.2 * s))  # c0 0.3, scale 1.2
    m = fit_kernels(samples, table)
    assert (m.c0, m.scale) == (pytest.approx(0.3), pytest.approx(1.2))
    assert m.card["fit_metrics"]["mape"] < 1e-9
    # a conv of an unseen shape: the pattern's line of time on FLOPs (1 ms per MFLOP)
    new = _keys(("fused_conv1d7_relu", "c9", 1, 4e6), ("quantize", "q", 1, 0.0))
    ms, est = m.predict_keys(new)
    assert est == 1
    assert ms == pytest.approx(0.3 + 1.2 * (4.0 + 0.1))
    # a pattern the table never saw: no prediction (the caller falls back)
    assert m.predict_keys(_keys(("fused_softmax", "z", 1, 1e3)))[0] is None
    # saved and loaded: the same predictions
    m.save(tmp_path / "model")
    again = KernelModel.load(tmp_path / "model")
    assert again.predict_keys(new) == (pytest.approx(ms), 1)
    assert pattern("fused_conv1d12_add3_relu1") == "fused_convd_add_relu"


def test_too_few_covered_samples_and_broken_files_are_one_line(tmp_path: Path) -> None:
    keys = _keys(("fused_conv1d", "x", 1, 1e6))
    with pytest.raises(ConfigError, match="0 of 3 samples have every kernel"):
        fit_kernels([(keys, 1.0)] * 3, {"other": 1.0})
    with pytest.raises(ConfigError, match="no kernel model here"):
        KernelModel.load(tmp_path)
    (tmp_path / "kernels.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a kernel model"):
        KernelModel.load(tmp_path)


@pytest.mark.tvm
def test_a_search_predictor_sums_the_kernels_of_the_compiled_candidate(tmp_path: Path) -> None:
    """The predictor lists a candidate's TVM tasks in a worker (keys as the tuning database
    has them) and sums the table over them; a kernel the table lacks is estimated, a
    candidate it cannot estimate goes to the fallback model."""
    from tests._tiny import tiny_tdnn
    from voxfit.cost_models import load_for
    from voxfit.cost_models._estimator import KernelPredictor
    from voxfit.hw_profiles import find_profile, load_profile

    profile = load_profile(find_profile("x86-avx2-2core"))
    fallback = load_for(profile, ROOT / "cost_models")
    model = tiny_tdnn()
    probe = KernelPredictor(fallback, KernelModel({}, {}), host_mismatch="ignore", profile=profile)
    try:
        keys = probe._keys(model, 100)
        assert len(keys) >= 3
        assert len({k for _, k, _, _ in keys}) == len(keys)  # one key per task
        convs = [k for k in keys if "conv1d" in k[0]]
        assert convs
        assert all(f and f > 0 for *_, f in convs)
        table = {str(k): 0.5 for _, k, _, _ in keys}
        info = {str(k): (pattern(n), f) for n, k, _, f in keys}
        whole = sum(0.5 * w for _, _, w, _ in keys)
        probe.kernels = KernelModel(table, info, c0=0.25, scale=2.0)
        p = probe.predict(model, 100)
        assert p.ms == pytest.approx(0.25 + 2.0 * whole)
        assert not p.low_confidence
        # a conv missing from the table whose pattern another kernel shares: estimated
        shared = [k for k in convs if sum(pattern(n) == pattern(k[0]) for n, *_ in keys) > 1]
        assert shared, [n for n, *_ in keys]
        probe.kernels = KernelModel(
            {k: v for k, v in table.items() if k != str(shared[0][1])}, info, c0=0.25, scale=2.0
        )
        assert probe.predict(model, 100).ms == pytest.approx(0.25 + 2.0 * whole, rel=0.3)
        # nothing known: the fallback model predicts
        probe.kernels = KernelModel({}, {})
        q = probe.predict(model, 100)
        assert q.ms == pytest.approx(fallback.predict_tasks(_tasks(model)).ms)
    finally:
        probe.close()
    assert probe.counts == {"kernels": 1, "estimated": 1, "transfer": 1}


def _tasks(model: object) -> object:
    from voxfit.cost_models._features import decompose

    return decompose(model, 100)  # type: ignore[arg-type]
