"""Trustworthy measurement on a shared or flaky device (issue 16, item 4).

Every timing records its coefficient of variation; one above the profile's
``measurement.max_cv`` is timed again (``max_repeats`` more tries at most) and the steadiest
try is kept, flagged ``noisy`` when still above. Over RPC a reference model is uploaded
next to the candidate and timed in alternating rounds on the leased device, and the lease's
wait in the tracker's queue is bounded apart from reaching the tracker.

The repeat logic is tested with fake timing functions; everything else for real (TVM, a
loopback tracker and server).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._tiny import tiny_tdnn
from voxfit.compile import CompileResult, TvmWorker, compile_model
from voxfit.hw_profiles import HardwareProfile, RpcSpec, pick_local_profile
from voxfit.latency import LatencyResult, TvmLocalEstimator, TvmRpcEstimator
from voxfit.latency._estimators import _load_note, repeat_while_loaded, repeat_while_noisy
from voxfit.latency._farm import Farm, local_farm
from voxfit.latency._tvm_timing import _stats
from voxfit.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[2]


# -- the repeat rule, with fake timing functions -------------------------------------------


def _fake(*tries: dict[str, Any]) -> tuple[list[int], Any]:
    """A timing function returning ``tries`` in turn; the list counts the calls."""
    calls: list[int] = []

    def measure() -> dict[str, Any]:
        calls.append(1)
        return dict(tries[len(calls) - 1])

    return calls, measure


def _try(cv: float | None, median_ms: float = 1.0, **kw: Any) -> dict[str, Any]:
    return {"median_ms": median_ms, "cv": cv, **kw}


def test_a_steady_first_try_is_not_repeated() -> None:
    calls, measure = _fake(_try(0.02))
    r = repeat_while_noisy(measure, max_cv=0.1, max_repeats=2)
    assert (len(calls), r["tries"], r["noisy"]) == (1, 1, False)


def test_a_noisy_try_is_repeated_until_steady_and_the_steady_one_kept() -> None:
    calls, measure = _fake(_try(0.4, 9.0), _try(0.05, 2.0), _try(0.01, 3.0))
    r = repeat_while_noisy(measure, max_cv=0.1, max_repeats=2)
    assert len(calls) == 2
    assert (r["tries"], r["noisy"], r["median_ms"]) == (2, False, 2.0)
    assert r["try_cvs"] == [0.4, 0.05]


def test_noisy_after_every_try_keeps_the_lowest_cv_and_says_so() -> None:
    calls, measure = _fake(_try(0.4, 9.0), _try(0.2, 2.0), _try(0.3, 3.0), _try(0.0))
    r = repeat_while_noisy(measure, max_cv=0.1, max_repeats=2)
    assert len(calls) == 3  # 1 + max_repeats, never more
    assert (r["tries"], r["noisy"], r["median_ms"], r["cv"]) == (3, True, 2.0, 0.2)
    calls, measure = _fake(_try(0.4))
    r = repeat_while_noisy(measure, max_cv=0.1, max_repeats=0)
    assert (len(calls), r["tries"], r["noisy"]) == (1, 1, True)


def test_paired_tries_are_judged_by_the_ratios_cv() -> None:
    # the samples drift (cv 0.5) but the ratios to the reference hardly move: steady
    calls, measure = _fake(_try(0.5, relative=0.4, relative_cv=0.02))
    r = repeat_while_noisy(measure, max_cv=0.1, max_repeats=2)
    assert (len(calls), r["noisy"]) == (1, False)
    calls, measure = _fake(
        _try(0.01, relative=0.4, relative_cv=0.3), _try(0.01, relative=0.5, relative_cv=0.08)
    )
    r = repeat_while_noisy(measure, max_cv=0.1, max_repeats=2)
    assert (len(calls), r["tries"], r["relative"], r["noisy"]) == (2, 2, 0.5, False)


def test_errors_and_unknown_spreads() -> None:
    calls, measure = _fake({"error": "device gone"}, _try(0.01))
    assert repeat_while_noisy(measure, 0.1, 2) == {"error": "device gone"}
    assert len(calls) == 1  # a failed measurement is the device layer's to retry
    calls, measure = _fake(_try(0.3, 4.0), {"error": "device gone"})
    r = repeat_while_noisy(measure, 0.1, 2)
    assert (r["median_ms"], r["tries"], r["noisy"]) == (4.0, 1, True)
    assert r["repeat_error"] == "device gone"
    calls, measure = _fake(_try(None))  # one sample: its spread is unknown, accepted
    r = repeat_while_noisy(measure, 0.1, 2)
    assert (len(calls), r["noisy"]) == (1, False)


def _paired(ref_ms: float, relative: float) -> dict[str, Any]:
    return _try(0.02, relative * ref_ms, reference_ms=ref_ms, relative=relative)


def test_a_paired_try_under_load_is_timed_again_and_a_quiet_one_kept() -> None:
    quiet: dict[str, float] = {}
    calls, measure = _fake(_paired(1.30, 0.70))
    r = repeat_while_loaded(measure, quiet, "utt", max_repeats=2)
    assert (len(calls), r["loaded_tries"], r["loaded"], quiet["utt"]) == (1, 0, False, 1.30)
    # the reference ran 20% slow: timed again; the quiet try's relative is kept
    calls, measure = _fake(_paired(1.56, 0.82), _paired(1.33, 0.71), _paired(1.30, 0.5))
    r = repeat_while_loaded(measure, quiet, "utt", max_repeats=2)
    assert (len(calls), r["relative"], r["loaded_tries"], r["loaded"]) == (2, 0.71, 1, False)
    assert "timed 1 more time," in _load_note(r)
    # 5% slow is within the margin: no repeat
    calls, measure = _fake(_paired(1.365, 0.9))
    assert repeat_while_loaded(measure, quiet, "utt", max_repeats=2)["loaded_tries"] == 0
    assert len(calls) == 1


def test_load_that_does_not_pass_keeps_the_quietest_try_and_flags_it() -> None:
    quiet = {"utt": 1.0}
    calls, measure = _fake(_paired(1.5, 0.9), _paired(1.3, 0.8), _paired(1.4, 0.7))
    r = repeat_while_loaded(measure, quiet, "utt", max_repeats=2)
    assert len(calls) == 3  # 1 + max_repeats, never more
    assert (r["reference_ms"], r["relative"], r["loaded"], r["loaded_tries"]) == (
        1.3,
        0.8,
        True,
        3,
    )
    assert _load_note(r).startswith("under load")
    # a quieter reference than ever seen lowers the baseline for the next timings
    calls, measure = _fake(_paired(0.9, 0.6))
    repeat_while_loaded(measure, quiet, "utt", max_repeats=2)
    assert quiet["utt"] == 0.9
    assert len(calls) == 1
    # other inputs have their own baseline
    calls, measure = _fake(_paired(0.3, 0.6))
    assert not repeat_while_loaded(measure, quiet, "chunk", max_repeats=2)["loaded"]


def test_the_load_guard_passes_unpaired_timings_and_errors_through() -> None:
    quiet: dict[str, float] = {}
    calls, measure = _fake(_try(0.02, 3.0), _try(0.02, 1.0))
    assert repeat_while_loaded(measure, quiet, "utt", 2) == _try(0.02, 3.0)
    calls, measure = _fake({"error": "device gone"})
    assert repeat_while_loaded(measure, quiet, "utt", 2) == {"error": "device gone"}
    quiet = {"utt": 1.0}
    calls, measure = _fake(_paired(1.5, 0.9), {"error": "device gone"})
    r = repeat_while_loaded(measure, quiet, "utt", 2)
    assert (len(calls), r["relative"], r["loaded"]) == (2, 0.9, True)


def test_stats_record_the_coefficient_of_variation() -> None:
    s = _stats([0.001, 0.002, 0.003])
    assert s["cv"] == pytest.approx(statistics.stdev([1, 2, 3]) / 2)
    assert _stats([0.001])["cv"] is None


# -- real TVM: a noisy measurement is repeated, and says so ----------------------------


def _local_profile(tmp: Path, **measurement: Any) -> HardwareProfile:
    p = pick_local_profile(ROOT / "hw_profiles")
    return replace(
        p,
        cores=1,
        inputs=p.inputs[:1],
        measurement=replace(
            p.measurement, **{"warmup": 1, "repeats": 3, "min_repeat_ms": 1, **measurement}
        ),
        tuning=replace(p.tuning, trials_per_task=0, database_dir=str(tmp / "none")),
    )


@pytest.fixture(scope="module")
def worker() -> Iterator[TvmWorker]:
    with TvmWorker(1) as w:
        yield w


@pytest.mark.tvm
def test_a_measurement_above_max_cv_is_repeated_and_flagged(
    worker: TvmWorker, tmp_path: Path
) -> None:
    # no real timing has a CV of 1e-9: every try is noisy
    p = _local_profile(tmp_path, max_cv=1e-9, max_repeats=1)
    est = TvmLocalEstimator(p, tmp_path / "w", worker=worker, tuning_dir=tmp_path / "t")
    (r,) = est.estimate(tiny_tdnn())
    assert r.ok, r.error
    assert (r.tries, r.noisy) == (2, True)
    assert r.cv is not None
    assert r.cv > 0
    assert r.note.startswith("noisy: CV above 1e-09 in all 2 tries")
    assert r.to_dict()["cv"] == r.cv
    assert r.to_dict()["tries"] == 2
    assert r.to_dict()["noisy"] is True
    # a lax bound: one try, not noisy, no note
    (r,) = TvmLocalEstimator(
        replace(p, measurement=replace(p.measurement, max_cv=1.0)),
        tmp_path / "w2",
        worker=worker,
        tuning_dir=tmp_path / "t",
    ).estimate(tiny_tdnn())
    assert r.ok, r.error
    assert (r.tries, r.noisy, r.note) == (1, False, "")


# -- real RPC: paired rounds on the leased device, and the queue's own timeout ----------

KEY = "voxfit-trust"


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    with local_farm(KEY, servers=1, log_dir=tmp_path_factory.mktemp("farm")) as f:
        yield f


def _rpc_profile(farm: Farm, tmp: Path, **rpc: Any) -> HardwareProfile:
    p = _local_profile(tmp, repeats=5)
    spec = RpcSpec(farm.host, farm.tracker_port, farm.key, connect_timeout_s=60, **rpc)
    return replace(p, measurement=replace(p.measurement, method="rpc", rpc=spec))


def _wide() -> torch.nn.Module:
    """A model far slower than the tiny one (16x its multiply-adds)."""
    torch.manual_seed(1)
    return build_model(ModelConfig("tdnn", 12, channels=128, hidden=192, n_blocks=2)).eval()


@pytest.mark.tvm
@pytest.mark.slow
def test_rpc_paired_rounds_time_candidate_and_reference_on_the_device(
    farm: Farm, worker: TvmWorker, tmp_path: Path
) -> None:
    p = _rpc_profile(farm, tmp_path)
    with TvmRpcEstimator(
        p, tmp_path / "w", worker=worker, tuning_dir=tmp_path / "t", reference=_wide()
    ) as est:
        (r,) = est.estimate(tiny_tdnn())
        assert r.ok, r.error
        assert r.method == "rpc"
        assert r.reference_ms is not None
        assert r.relative is not None
        assert r.relative_iqr is not None
        assert r.cv is not None
        assert r.relative_cv is not None
        assert r.tries >= 1
        # the two libraries are both <input>.so: uploaded under one name, the reference
        # would replace the candidate and the ratio would be ~1
        assert r.relative < 0.5, (r.relative, r.median_ms, r.reference_ms)
        assert r.median_ms is not None
        assert r.relative == pytest.approx(r.median_ms / r.reference_ms, rel=0.5)
        assert r.noisy == (r.relative_cv > p.measurement.max_cv)
        print(
            f"RPC paired: {r.median_ms:.3f} ms vs reference {r.reference_ms:.3f} ms, relative "
            f"{r.relative:.3f} (cv {r.cv:.3f}, relative cv {r.relative_cv:.3f}, {r.tries} tries)"
        )
        (again,) = est.estimate(tiny_tdnn())  # the reference is compiled once per input
        assert again.ok, again.error
        assert len(list((tmp_path / "w").glob("reference-*"))) == 1


@pytest.fixture(scope="module")
def tiny_lib(worker: TvmWorker, tmp_path_factory: pytest.TempPathFactory) -> CompileResult:
    tmp = tmp_path_factory.mktemp("lib")
    (c,) = compile_model(tiny_tdnn(), _local_profile(tmp), worker, tmp / "b", tuning_dir=tmp)
    assert c.ok, c.error
    return c


@pytest.mark.tvm
@pytest.mark.slow
def test_a_busy_device_times_out_in_the_queue_not_at_the_tracker(
    farm: Farm, worker: TvmWorker, tiny_lib: CompileResult, tmp_path: Path
) -> None:
    """The farm's only server is leased by someone else: a measurement waits in the
    tracker's queue for queue_timeout_s (2 s), not connect_timeout_s (60 s), per attempt."""
    from tvm import rpc

    p = _rpc_profile(farm, tmp_path, queue_timeout_s=2.0, attempts=1)
    assert p.measurement.rpc is not None
    held = rpc.connect_tracker(farm.host, farm.tracker_port).request(KEY, session_timeout=60)
    try:
        t0 = time.monotonic()
        out = worker.call(
            "measure_rpc", timeout_s=120, lib=str(tiny_lib.lib), frames=tiny_lib.frames,
            measurement={"warmup": 1, "repeats": 3, "min_repeat_ms": 1}, device="cpu",
            rpc=asdict(p.measurement.rpc),
        )  # fmt: skip
        took = time.monotonic() - t0
    finally:
        del held
    assert "error" in out
    assert f"no free device with key {KEY!r} within 2 s" in out["error"]
    assert "1 attempts failed" in out["error"]
    assert took < 30, took


def test_latency_result_defaults_say_nothing_was_timed() -> None:
    r = LatencyResult(profile="p", input="i", frames=8, method="predicted", median_ms=1.0)
    assert (r.cv, r.relative_cv, r.tries, r.noisy) == (None, None, 0, False)
