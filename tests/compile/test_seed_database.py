"""A profile seeded by another (``tuning.seed_from``): the seed's schedules serve the tasks
the device has no record of, the device's own records always win, and onboarding tunes the
seeded tasks on the device."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._tiny import tiny_tdnn
from voxfit.compile import TvmWorker, compile_model, seed_database_dir
from voxfit.compile._database import RECORDS, WORKLOADS
from voxfit.errors import ConfigError
from voxfit.hw_profiles import find_profile, load_profile

pytestmark = [pytest.mark.tvm, pytest.mark.slow]


def _small(name: str, cost: Path) -> object:
    p = load_profile(find_profile(name))
    return replace(
        p,
        inputs=p.inputs[:1],
        tuning=replace(p.tuning, trials_per_task=2, trials_per_iter=2),
        measurement=replace(p.measurement, repeats=3, min_repeat_ms=5, warmup=1),
    )


def _records(db: Path) -> int:
    f = db / RECORDS
    return len([x for x in f.read_text().splitlines() if x.strip()]) if f.exists() else 0


def test_a_seeded_device_compiles_from_the_seed_then_from_its_own_records(tmp_path: Path) -> None:
    model = tiny_tdnn()
    cost = tmp_path / "cost_models"
    source = _small("x86-avx2-2core", cost)
    shipped = source.database_dir(cost)  # type: ignore[attr-defined]
    # the new device: no AVX, nothing of its own, seeded by the AVX2 profile
    device = replace(
        _small("x86-64-sse-rpc", cost),
        measurement=source.measurement,  # type: ignore[attr-defined]
    )
    assert seed_database_dir(device, cost) == shipped  # type: ignore[arg-type]
    user = tmp_path / "tuning-device"
    with TvmWorker(1) as w:
        # the source's "shipped" records: the tiny model tuned into that folder
        (r0,) = compile_model(model, source, w, tmp_path / "a", cost_models_dir=cost,
                              tuning_dir=shipped, export=False)  # type: ignore[arg-type]  # fmt: skip
        assert r0.ok, r0.error
        assert r0.new_tasks == r0.n_tasks > 0
        # compiled without tuning: the seed's schedules serve every task, unmeasured here
        (r1,) = compile_model(model, device, w, tmp_path / "b", cost_models_dir=cost,
                              tuning_dir=user, tune=False)  # type: ignore[arg-type]  # fmt: skip
        assert r1.ok, r1.error
        assert r1.new_tasks == 0
        assert len(r1.details["seeded_tasks"]) == r1.n_tasks
        assert _records(user) == 0
        # the seeded library computes the model (compiled for x86-64, no AVX)
        x = torch.randn(1, 100, 80)
        got = w.call("run_local", lib=str(r1.lib), input=x.numpy())
        with torch.no_grad():
            want = model(x, torch.tensor([100]))[0].numpy()
        np.testing.assert_allclose(np.asarray(got["output"]), want, atol=1e-4)
        # a build that may tune measures the seed's best schedules on the device first and
        # keeps them as the device's records: nothing is tuned, nothing left unmeasured
        (r2,) = compile_model(model, device, w, tmp_path / "c", cost_models_dir=cost,
                              tuning_dir=user, export=False)  # type: ignore[arg-type]  # fmt: skip
        assert r2.ok, r2.error
        assert "seed_measure_errors" not in r2.details, r2.details["seed_measure_errors"]
        assert (r2.new_tasks, r2.details["seeded_tasks"]) == (0, [])
        assert len(r2.details["seed_measured_tasks"]) == r2.n_tasks
        seed_times = sorted(_best_secs(shipped).values())
        here = sorted(_best_secs(user).values())
        assert len(here) == len(seed_times) == r2.n_tasks  # every task, timed here
        assert here != seed_times  # (the device's times, not the seed's copied)
        assert r2.details["seed_measured_records"] == _records(user) <= 3 * r2.n_tasks
        # each task's key is the database's own: its record there can be looked up
        keys = {k for _, k, _, _ in r2.details["task_keys"]}
        assert len(r2.details["task_keys"]) == r2.n_tasks
        assert keys == {json.loads(x)[0] for x in (user / WORKLOADS).read_text().splitlines()}
        assert all(w >= 1 for _, _, w, _ in r2.details["task_keys"])
        assert any(f and f > 1e5 for _, _, _, f in r2.details["task_keys"])  # the convs' FLOPs
        # onboarding tunes the seeded tasks on the device, starting from those records
        (r3,) = compile_model(model, device, w, tmp_path / "d", cost_models_dir=cost,
                              tuning_dir=user, tune_seeded=True, export=False)  # type: ignore[arg-type]  # fmt: skip
        assert r3.ok, r3.error
        assert r3.new_tasks == 0  # every task has the device's own records now
        (r4,) = compile_model(model, device, w, tmp_path / "e", cost_models_dir=cost,
                              tuning_dir=user, export=False)  # type: ignore[arg-type]  # fmt: skip
        assert (r4.new_tasks, r4.details["seeded_tasks"]) == (0, [])
        assert "seed_measured_tasks" not in r4.details
    targets = {json.loads(x)[1][2]["mcpu"] for x in (user / RECORDS).read_text().splitlines()}
    assert targets == {"x86-64"}  # measured for the device's own target


def _best_secs(db: Path) -> dict[int, float]:
    """Each workload's best mean run time in a database folder."""
    best: dict[int, float] = {}
    for line in (db / RECORDS).read_text().splitlines():
        if line.strip():
            w, rec = json.loads(line)
            secs = sum(rec[1]) / len(rec[1])
            best[w] = min(best.get(w, secs), secs)
    return best


def test_an_unknown_seed_profile_is_one_line(tmp_path: Path) -> None:
    p = load_profile(find_profile("x86-64-sse-rpc"))
    bad = replace(p, tuning=replace(p.tuning, seed_from="no-such-profile"))
    with pytest.raises(ConfigError, match=r"tuning\.seed_from: unknown profile 'no-such-profile'"):
        seed_database_dir(bad, tmp_path)


def test_a_device_without_avx2_loads_a_seed_that_holds_int8_schedules(tmp_path: Path) -> None:
    """The seed's int8 tasks were tensorized with the AVX2 intrinsic; a fresh worker
    compiling for the no-AVX device (whose int8 layers are not tensorized) must still read
    them."""
    from voxfit.compress import apply
    from voxfit.plan import Candidate, LayerPlan

    m = tiny_tdnn()
    s = m.structure()
    layers = [LayerPlan(q, 8, 8) for q in s.quantizable[:-1]] + [
        LayerPlan(s.quantizable[-1], 32, 32)
    ]
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64]))]
    model = apply(m, Candidate(layers=tuple(layers)), calibration=cal)
    cost = tmp_path / "cost_models"
    source = _small("x86-avx2-2core", cost)
    shipped = source.database_dir(cost)  # type: ignore[attr-defined]
    device = replace(_small("x86-64-sse-rpc", cost), measurement=source.measurement)  # type: ignore[attr-defined]  # fmt: skip
    with TvmWorker(1) as w:
        (r0,) = compile_model(model, source, w, tmp_path / "a", cost_models_dir=cost,
                              tuning_dir=shipped, export=False)  # type: ignore[arg-type]  # fmt: skip
        assert r0.ok, r0.error
    assert "avx2" in (shipped / RECORDS).read_text()  # the seed holds tensorized schedules
    with TvmWorker(1) as w:  # a process that never compiled for AVX2
        (r1,) = compile_model(model, device, w, tmp_path / "b", cost_models_dir=cost,
                              tuning_dir=tmp_path / "tuning-device", export=False)  # type: ignore[arg-type]  # fmt: skip
    assert r1.ok, r1.error  # (it failed: "TensorIntrin 'voxfit_dot_8x4_u8i8i32_avx2' is not
    # registered" while reading the seed)
    assert r1.details["int8"]["compute"] == "int8"  # plain int8 TIR: nothing to tensorize with
    # every task runs a schedule timed on this device: the seed's, measured here, or tuned
    # here where none of the seed's ran
    assert r1.details["seeded_tasks"] == []
    measured = set(r1.details["seed_measured_tasks"])
    assert measured
    assert measured | set(r1.details["new_task_names"]) == set(r1.task_names)
