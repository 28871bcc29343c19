"""Tuning measures its trials where the profile measures: the runner factory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from voxfit.compile import RunnerSpec, runner_spec
from voxfit.errors import ConfigError
from voxfit.hw_profiles import find_profile, load_profile


def _shipped(name: str):  # type: ignore[no-untyped-def]
    return load_profile(find_profile(name))


def test_an_rpc_profile_tunes_on_its_tracker() -> None:
    p = _shipped("arm-cortex-a55-phone")
    assert p.measurement.method == "rpc"
    assert p.measurement.rpc is not None
    assert runner_spec(p) == RunnerSpec(
        "rpc",
        p.tuning.runner_timeout_s,
        tracker_host=p.measurement.rpc.tracker_host,
        tracker_port=p.measurement.rpc.tracker_port,
        device_key=p.measurement.rpc.device_key,
    )


@pytest.mark.parametrize("method", ["local", "predicted"])
def test_other_profiles_tune_on_this_machine(method: str) -> None:
    p = _shipped("x86-avx2-2core")
    p = replace(p, measurement=replace(p.measurement, method=method))
    assert runner_spec(p) == RunnerSpec("local", p.tuning.runner_timeout_s)


def test_an_rpc_profile_without_its_tracker_is_a_config_error() -> None:
    p = _shipped("arm-cortex-a55-phone")
    p = replace(p, measurement=replace(p.measurement, rpc=None))
    with pytest.raises(ConfigError, match=r"measurement\.rpc"):
        runner_spec(p)


@pytest.mark.tvm
def test_the_worker_side_factory_makes_metaschedules_runners() -> None:
    """MetaSchedule's own classes, configured from the profile; no tracker is contacted."""
    from tvm.s_tir import meta_schedule as ms

    from voxfit.compile._tune import make_runner

    rpc_profile = _shipped("arm-cortex-a72-rpi4")
    assert rpc_profile.measurement.rpc is not None
    rpc = make_runner(runner_spec(rpc_profile).to_dict())
    assert isinstance(rpc, ms.runner.RPCRunner)
    assert rpc.rpc_config.tracker_host == rpc_profile.measurement.rpc.tracker_host
    assert rpc.rpc_config.tracker_port == rpc_profile.measurement.rpc.tracker_port
    assert rpc.rpc_config.tracker_key == rpc_profile.measurement.rpc.device_key
    assert rpc.rpc_config.session_timeout_sec == rpc_profile.tuning.runner_timeout_s
    local_profile = _shipped("x86-avx2-2core")
    local = make_runner(runner_spec(local_profile).to_dict())
    assert isinstance(local, ms.runner.LocalRunner)
    assert local.timeout_sec == local_profile.tuning.runner_timeout_s
