"""Real TVM: compile, tune into a persistent database, measure locally and over RPC.

One TVM worker and one tuning database serve the module (tuning a tiny TDNN's tasks once,
2 trials each, is the expensive part); each test checks a different promise on top. The
module's database is the user's (``tuning_dir``) for the cold compile; later tests use it
as the read-only shipped layer (the profile's ``tuning.database_dir``) under a new user
database, and check that it is never written.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._tiny import tiny_tdnn
from voxfit.compile import CompileResult, TvmWorker, compile_model, default_tuning_dir
from voxfit.compile._database import RECORDS, WORKLOADS
from voxfit.compress import apply
from voxfit.hw_profiles import HardwareProfile, RpcSpec, load_profile, pick_local_profile
from voxfit.latency import TvmLocalEstimator, TvmRpcEstimator
from voxfit.latency._farm import free_port, local_farm
from voxfit.models import count_parameters
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _profile(shipped: Path, trials: int = 2) -> HardwareProfile:
    """The local profile, small, with ``shipped`` as its (read-only) shipped database."""
    p = pick_local_profile(ROOT / "hw_profiles")
    return replace(
        p,
        cores=1,
        inputs=p.inputs[:1],
        measurement=replace(p.measurement, repeats=5, min_repeat_ms=5, warmup=1),
        tuning=replace(
            p.tuning, trials_per_task=trials, trials_per_iter=2, database_dir=str(shipped)
        ),
    )


def _hashes(db: Path) -> dict[str, str]:
    files = sorted(f for f in db.rglob("*") if f.is_file())
    return {str(f.relative_to(db)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def worker() -> TvmWorker:
    with TvmWorker(1) as w:
        yield w


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tuning")


@pytest.fixture(scope="module")
def nothing_shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("empty") / "none"


@pytest.fixture(scope="module")
def cold(
    worker: TvmWorker,
    db: Path,
    nothing_shipped: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> CompileResult:
    out = tmp_path_factory.mktemp("cold")
    (r,) = compile_model(tiny_tdnn(), _profile(nothing_shipped), worker, out, tuning_dir=db)
    return r


def test_cold_compile_tunes_every_task_and_matches_torch(
    cold: CompileResult, worker: TvmWorker, db: Path, nothing_shipped: Path
) -> None:
    assert cold.ok, cold.error
    assert (db / "logs").is_dir()  # MetaSchedule's logs beside the user's records
    assert not nothing_shipped.exists()  # a missing shipped database is not created
    assert cold.n_tasks >= 4
    assert cold.new_tasks == cold.n_tasks
    assert cold.tuned_trials == 2 * cold.n_tasks
    assert cold.memory_bytes is not None
    assert cold.memory_bytes > 0
    m = tiny_tdnn()
    x = torch.randn(1, cold.frames, 80, generator=torch.Generator().manual_seed(1))
    out = worker.call("run_local", timeout_s=120, lib=str(cold.lib), input=x.numpy())
    with torch.no_grad():
        ref = m(x, torch.tensor([cold.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)


def test_warm_compile_tunes_nothing(
    cold: CompileResult, worker: TvmWorker, db: Path, nothing_shipped: Path, tmp_path: Path
) -> None:
    (warm,) = compile_model(
        tiny_tdnn(), _profile(nothing_shipped), worker, tmp_path, tuning_dir=db
    )
    assert warm.ok, warm.error
    assert (warm.n_tasks, warm.new_tasks, warm.tuned_trials) == (cold.n_tasks, 0, 0)
    assert warm.task_names == cold.task_names


def test_compressed_candidate_compiles_and_reports_its_new_tasks(
    cold: CompileResult, worker: TvmWorker, db: Path, tmp_path: Path
) -> None:
    base = tiny_tdnn()
    s = base.structure()
    cand = Candidate(
        groups=tuple(GroupPlan(g.name, 0.5) for g in s.groups if g.name != "stream"),
        layers=tuple(LayerPlan(q, 8) for q in s.quantizable),
        adapters=(AdapterPlan(s.adapter_slots[-1].name, 4),),
    )
    small = apply(base, cand, channel_multiple=4)
    assert count_parameters(small) < count_parameters(base)
    (r,) = compile_model(small, _profile(db), worker, tmp_path / "out", tune=False)
    assert r.ok, r.error
    assert r.details["tuner"] == "local"
    assert 0 < r.new_tasks <= r.n_tasks  # pruned shapes are new to the database
    assert r.tuned_trials == 0  # tune=False: compiled with default schedules
    # every quantized conv keeps its int8 weights in the library (tests/compile/test_packed.py)
    assert r.lowering == f"{len(s.quantizable)} w8 layers packed, unpacked in the kernel"
    assert "int8" in r.details["constant_bytes"]


def test_local_estimator_measures_with_spread(
    cold: CompileResult, db: Path, tmp_path: Path
) -> None:
    with TvmLocalEstimator(_profile(db), tmp_path) as est:
        (r,) = est.estimate(tiny_tdnn())
    assert r.ok, r.error
    assert r.median_ms is not None
    assert 0 < r.median_ms < 1000
    assert r.repeats == 5
    assert r.min_ms <= r.median_ms <= r.max_ms
    assert r.compile is not None
    assert r.compile.new_tasks == 0
    assert r.peak_memory_mb is not None
    assert r.peak_memory_mb > 0


@pytest.mark.alone  # a wall-clock ratio: make test runs it with nothing beside it
def test_a_model_timed_against_itself_is_relative_one(
    cold: CompileResult, db: Path, tmp_path: Path
) -> None:
    base = tiny_tdnn()
    s = base.structure()
    quarter = Candidate(groups=tuple(GroupPlan(g.name, 0.25) for g in s.groups))
    small = apply(base, quarter, channel_multiple=4)
    with TvmLocalEstimator(_profile(db), tmp_path, reference=tiny_tdnn()) as est:
        (same,) = est.estimate(tiny_tdnn())
        (pruned,) = est.estimate(small)
    assert same.ok, same.error
    assert pruned.ok, pruned.error
    assert same.relative is not None
    assert same.reference_ms is not None
    assert 0.7 < same.relative < 1.4  # one model, alternating rounds
    assert pruned.relative is not None
    assert pruned.relative < same.relative  # a quarter of the channels


def test_retune_starts_from_the_shipped_best_and_writes_only_the_users_database(
    cold: CompileResult, worker: TvmWorker, db: Path, tmp_path: Path
) -> None:
    shipped = _hashes(db)
    user = tmp_path / "user-tuning"
    (r,) = compile_model(
        tiny_tdnn(), _profile(db), worker, tmp_path / "out", tuning_dir=user, retune_trials=2
    )
    assert r.ok, r.error
    assert (r.new_tasks, r.tuned_trials) == (0, 2 * r.n_tasks)
    # every task's shipped best was copied over first, and the new trials came after
    assert r.details["seeded_records"] >= r.n_tasks
    assert (user / RECORDS).read_text().count("\n") > r.details["seeded_records"]
    assert _hashes(db) == shipped


def test_new_tasks_go_to_the_users_database_over_the_shipped_one(
    cold: CompileResult, worker: TvmWorker, db: Path, tmp_path: Path
) -> None:
    """The shipped database stays byte-identical; the second compile finds the new records."""
    base = tiny_tdnn()
    cand = Candidate(groups=tuple(GroupPlan(g.name, 0.5) for g in base.structure().groups))
    small = apply(base, cand, channel_multiple=4)
    shipped = _hashes(db)
    user = tmp_path / "user-tuning"
    p = _profile(db, trials=1)
    (first,) = compile_model(small, p, worker, tmp_path / "a", tuning_dir=user)
    assert first.ok, first.error
    assert 0 < first.new_tasks < first.n_tasks  # some shapes are new, the rest shipped
    assert first.tuned_trials == first.new_tasks
    assert (user / RECORDS).read_text().count("\n") >= first.new_tasks
    assert _hashes(db) == shipped
    (second,) = compile_model(small, p, worker, tmp_path / "b", tuning_dir=user)
    assert second.ok, second.error
    assert (second.new_tasks, second.tuned_trials) == (0, 0)
    assert _hashes(db) == shipped


def test_a_torn_shipped_database_is_an_error_naming_it_and_left_as_it_is(
    cold: CompileResult, worker: TvmWorker, db: Path, tmp_path: Path
) -> None:
    torn = tmp_path / "shipped"
    torn.mkdir()
    for name in (WORKLOADS, RECORDS):
        (torn / name).write_bytes((db / name).read_bytes())
    with (torn / RECORDS).open("a") as f:
        f.write('[0, [["half a rec')
    before = _hashes(torn)
    (r,) = compile_model(tiny_tdnn(), _profile(torn), worker, tmp_path / "out")
    assert not r.ok
    assert str(torn) in (r.error or "")
    assert "torn" in (r.error or "")
    assert _hashes(torn) == before


def test_default_user_database_is_beside_the_builds(
    cold: CompileResult, worker: TvmWorker, db: Path, tmp_path: Path
) -> None:
    p = _profile(db)
    (r,) = compile_model(tiny_tdnn(), p, worker, tmp_path / "builds" / "one", tune=False)
    assert r.ok, r.error
    assert (default_tuning_dir(tmp_path / "builds", p) / WORKLOADS).exists()


def test_rpc_measurement_agrees_with_local(cold: CompileResult, db: Path, tmp_path: Path) -> None:
    local_profile = _profile(db)
    with TvmLocalEstimator(local_profile, tmp_path / "local") as est:
        (local,) = est.estimate(tiny_tdnn())
    with local_farm("voxfit-test", log_dir=tmp_path / "farm") as farm:
        rpc = RpcSpec(farm.host, farm.tracker_port, farm.key, connect_timeout_s=30)
        p = replace(
            local_profile, measurement=replace(local_profile.measurement, method="rpc", rpc=rpc)
        )
        with TvmRpcEstimator(p, tmp_path / "rpc") as est:
            (remote,) = est.estimate(tiny_tdnn())
    assert remote.ok, remote.error
    assert local.median_ms is not None
    assert remote.median_ms is not None
    # Same CPU, same library: equal within this shared machine's noise.
    assert 1 / 3 < remote.median_ms / local.median_ms < 3


def test_unreachable_tracker_is_a_one_line_error_within_the_timeout(
    cold: CompileResult, db: Path, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here
    p = _profile(db)
    p = replace(
        p,
        measurement=replace(
            p.measurement, method="rpc", rpc=RpcSpec("127.0.0.1", port, "rpi4", 3.0)
        ),
    )
    t0 = time.monotonic()
    with TvmRpcEstimator(p, tmp_path) as est:
        (r,) = est.estimate(tiny_tdnn())
    assert not r.ok
    assert r.error is not None
    assert f"127.0.0.1:{port}" in r.error
    assert "'rpi4'" in r.error
    assert "\n" not in r.error
    assert r.compile is not None
    assert r.compile.ok
    assert time.monotonic() - t0 < 120


def test_cross_compiled_arm_library_is_an_aarch64_elf(worker: TvmWorker, tmp_path: Path) -> None:
    p = load_profile(ROOT / "hw_profiles" / "arm-cortex-a72-rpi4.yaml")
    p = replace(
        p, inputs=p.inputs[:1], tuning=replace(p.tuning, database_dir=str(tmp_path / "db"))
    )
    (r,) = compile_model(tiny_tdnn(), p, worker, tmp_path / "out", tune=False)
    assert r.ok, r.error
    assert r.details["tuner"] == "rpc"  # it would tune on the profile's device
    header = r.lib.read_bytes()[:20] if r.lib else b""
    assert header[:4] == b"\x7fELF"
    assert struct.unpack("<H", header[18:20])[0] == 183  # e_machine EM_AARCH64


def test_killed_tuning_leaves_a_database_the_next_run_resumes(tmp_path: Path) -> None:
    db = tmp_path / "db"
    p = _profile(tmp_path / "nothing-shipped", trials=64)
    m = tiny_tdnn()
    with TvmWorker(1) as w:
        (r,) = compile_model(m, p, w, tmp_path / "a", tuning_dir=db, timeout_s=45)
    assert not r.ok
    assert "did not finish" in (r.error or "")
    p = replace(p, tuning=replace(p.tuning, trials_per_task=1))
    with TvmWorker(1) as w:
        (again,) = compile_model(m, p, w, tmp_path / "b", tuning_dir=db)
    assert again.ok, again.error
    assert (db / WORKLOADS).exists()
    assert (db / RECORDS).exists()
    assert again.new_tasks <= again.n_tasks


def test_cuda_profile_builds_without_a_gpu(worker: TvmWorker, tmp_path: Path) -> None:
    p = load_profile(ROOT / "hw_profiles" / "nvidia-gpu-sm90.yaml")
    p = replace(
        p, inputs=p.inputs[:1], tuning=replace(p.tuning, database_dir=str(tmp_path / "db"))
    )
    (r,) = compile_model(tiny_tdnn(), p, worker, tmp_path / "out", tune=False)
    assert r.ok, r.error
    assert r.lib is not None
    assert r.lib.stat().st_size > 0
    assert r.tuned_trials == 0  # GPU kernels come from TVM's default (dlight) schedules
