"""A model fitted on another host, calibrated here by kernels: the profile's schedules timed
on this host (``voxfit device time-kernels``), each candidate predicted as the sum of its
kernels' times here, scaled on the first few measurements a search makes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests._tiny import fake_host, tiny_tdnn
from voxfit.compile._database import RECORDS, WORKLOADS
from voxfit.cost_models import CostModel, CostModelPredictor, load_for
from voxfit.cost_models._estimator import KernelPredictor
from voxfit.cost_models._host_kernels import (
    host_kernels_dir,
    host_table,
    time_kernels_here,
    timed_seconds,
)
from voxfit.errors import ConfigError, DataError
from voxfit.hw_profiles import describe_host, find_profile, load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "x86-avx2-2core"


def test_host_keys_name_the_kind_of_host_and_are_folder_names() -> None:
    a, b = fake_host("AMD EPYC 7B12", 23, 49), fake_host("AMD EPYC 9B14", 25, 17)
    assert a.key != b.key
    assert a.key == fake_host("AMD EPYC 7B12", 23, 49).key
    assert a.key.startswith("authenticamd-23-49-2c-")
    assert "/" not in a.key
    assert " " not in a.key


def _keys(n: int, start: int = 0) -> list[list[Any]]:
    return [[f"fused_conv1d_add{i}", f"k{i}", 1 + i % 3, 1e6 * (i + 1)] for i in range(start, n)]


def test_the_predictor_calibrates_by_kernels_after_min_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Until ``min_samples`` measurements, the source model predicts (flagged: another host);
    from then on the kernel sum over this host's table, fitted on them, predicts with
    confidence; a candidate whose kernels cannot be estimated keeps the source model."""
    profile = load_profile(find_profile(PROFILE))
    src = load_for(profile, ROOT / "cost_models")
    assert isinstance(src, CostModel)
    src.card["host"] = fake_host("AMD EPYC 7B12", 23, 49).as_dict()
    table = {f"k{i}": 0.05 * (i + 1) for i in range(12)}
    pred = KernelPredictor(
        src, None, host_table=table, current_host=fake_host("AMD EPYC 9B14", 25, 17),
        profile=profile, min_samples=4,
    )  # fmt: skip
    assert pred.calibrating
    assert pred.host_table == table
    models = [tiny_tdnn(seed=i) for i in range(7)]
    keys = {id(m): _keys(4 + i) for i, m in enumerate(models)}
    keys[id(models[6])] = [["softmax_only0", "unknown", 1, None]]  # no table kernel, no pattern
    monkeypatch.setattr(pred, "_keys", lambda m, frames: keys[id(m)])

    def truth(m: Any) -> float:
        return 0.2 + 1.3 * sum(w * table[k] for _, k, w, _ in keys[id(m)])

    first = pred.predict(models[0], 100)
    assert first.low_confidence
    assert any("another host" in r for r in first.reasons)
    for m in models[:3]:
        pred.observe(m, 100, truth(m))
    cal = pred.calibration
    assert cal is not None
    assert cal["kernels"]["samples"] == 3
    assert not cal["kernels"]["active"]
    assert pred.predict(models[4], 100).low_confidence
    pred.observe(models[3], 100, truth(models[3]))
    cal = pred.calibration
    assert cal is not None
    assert cal["kernels"]["active"]
    assert cal["kernels"]["coef"]["scale"] == pytest.approx(1.3)
    p = pred.predict(models[5], 100)
    assert p.ms == pytest.approx(truth(models[5]))
    assert not p.low_confidence
    assert p.reasons == ()
    # no kernel of it timed here and no pattern to estimate from: the source model (as
    # calibrated by the transfer so far)
    q = pred.predict(models[6], 100)
    assert q.ms == pytest.approx(CostModelPredictor.predict(pred, models[6], 100).ms)
    assert pred.counts == {"kernels": 1, "estimated": 0, "transfer": 3}


def test_a_model_on_its_own_host_is_not_calibrated_by_kernels() -> None:
    profile = load_profile(find_profile(PROFILE))
    src = load_for(profile, ROOT / "cost_models")
    host = fake_host("AMD EPYC 7B12", 23, 49)
    src.card["host"] = host.as_dict()
    pred = KernelPredictor(src, None, host_table={"k0": 1.0}, current_host=host, profile=profile)
    assert not pred.calibrating
    assert pred.host_table is None


def _subset_db(src: Path, dst: Path, n: int) -> list[str]:
    """The shipped database's first ``n`` workloads and their records, in ``dst``."""
    workloads = src.joinpath(WORKLOADS).read_text().splitlines()[:n]
    records = [
        line for line in src.joinpath(RECORDS).read_text().splitlines() if json.loads(line)[0] < n
    ]
    dst.mkdir(parents=True)
    dst.joinpath(WORKLOADS).write_text("\n".join(workloads) + "\n")
    dst.joinpath(RECORDS).write_text("\n".join(records) + "\n")
    return [str(json.loads(w)[0]) for w in workloads]


@pytest.mark.tvm
def test_time_kernels_here_times_every_workload_once_and_resumes(tmp_path: Path) -> None:
    """Real MetaSchedule builds and runs of the shipped database's schedules (three of its
    workloads) on this machine, into this host's table; a second run times nothing."""
    profile = load_profile(find_profile(PROFILE))
    cost_models = tmp_path / "cost_models"
    shipped = profile.database_dir(ROOT / "cost_models")
    keys = _subset_db(shipped, cost_models / PROFILE / "tuning", 3)
    work = tmp_path / "work"
    assert host_table(profile, work) is None
    r = time_kernels_here(profile, work=work, cost_models_dir=cost_models, batch=2)
    assert (r.total, r.timed, r.skipped, r.errors) == (len(set(keys)), len(set(keys)), 0, [])
    assert r.directory == host_kernels_dir(profile, work)
    assert describe_host().key in str(r.directory)
    table = host_table(profile, work)
    assert table is not None
    assert set(table) == set(keys)
    assert all(0 < ms < 1e3 for ms in table.values())
    # each schedule timed in repeats (the table takes their median)
    lines = (r.directory / RECORDS).read_text().splitlines()
    assert [len(json.loads(x)[1][1]) for x in lines] == [3] * len(set(keys))
    assert timed_seconds(profile, work) == pytest.approx(r.seconds)
    again = time_kernels_here(profile, work=work, cost_models_dir=cost_models)
    assert (again.timed, again.skipped) == (0, len(set(keys)))
    assert timed_seconds(profile, work) == pytest.approx(r.seconds)  # nothing timed: no run
    assert host_table(profile, work) == table
    # nothing to time: a clear error
    shutil.rmtree(cost_models / PROFILE / "tuning")
    with pytest.raises(DataError, match="no tuning records"):
        time_kernels_here(profile, work=tmp_path / "w2", cost_models_dir=cost_models)


def test_time_kernels_here_refuses_a_device_it_cannot_run_here(tmp_path: Path) -> None:
    profile = load_profile(find_profile("x86-64-sse-rpc"))
    with pytest.raises(ConfigError, match="measurement.method: rpc"):
        time_kernels_here(profile, work=tmp_path)


@pytest.mark.tvm
def test_load_predictor_finds_this_hosts_table_and_a_search_calibrates_by_it(
    tmp_path: Path,
) -> None:
    """The predictor a search in ``work`` gets (``load_predictor(..., work=)``) calibrates by
    this host's table when there is one: real TVM task lists of the observed and predicted
    models (the shipped card records no host, so it is calibrated wherever it runs)."""
    from voxfit.cost_models import load_predictor

    profile = load_profile(find_profile(PROFILE))
    work = tmp_path / "work"
    plain = load_predictor(profile, ROOT / "cost_models", work=work)
    assert not isinstance(plain, KernelPredictor)  # no table here: the transfer calibration
    models = [tiny_tdnn(seed=i) for i in range(4)]
    probe = KernelPredictor(plain.model, None, host_mismatch="ignore", profile=profile)
    try:
        keys = probe._keys(models[0], 100)
    finally:
        probe.close()
    d = host_kernels_dir(profile, work)
    d.mkdir(parents=True)
    d.joinpath(WORKLOADS).write_text("".join(json.dumps([k, "mod"]) + "\n" for _, k, _, _ in keys))
    d.joinpath(RECORDS).write_text(
        "".join(
            json.dumps([i, [[], [1e-5 * (i + 1)] * 3, {}, []]]) + "\n" for i in range(len(keys))
        )
    )
    pred = load_predictor(profile, ROOT / "cost_models", work=work)
    assert isinstance(pred, KernelPredictor)
    assert pred.host_table is not None
    assert len(pred.host_table) == len(keys)
    pred.min_samples = 3
    try:
        for m in models[:3]:
            pred.observe(m, 100, 1.5)  # the tiny models share shapes: one kernel sum
        cal = pred.calibration
        assert cal is not None
        assert cal["kernels"]["active"]
        p = pred.predict(models[3], 100)
    finally:
        pred.close()
    assert p.ms == pytest.approx(1.5, rel=1e-3)
    assert not p.low_confidence
    assert pred.counts["kernels"] == 1
