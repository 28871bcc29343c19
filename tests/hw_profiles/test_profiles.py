"""Hardware profile loading: every shipped profile is valid; bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from voxfit.errors import ConfigError
from voxfit.hw_profiles import (
    explain,
    find_profile,
    host_runs,
    load_profile,
    pick_local_profile,
    profile_from_dict,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "hw_profiles").glob("*.yaml"))


def _raw(name: str = "x86-avx2-2core") -> dict:
    return yaml.safe_load((ROOT / "hw_profiles" / f"{name}.yaml").read_text())


def _rpc(d: dict, **fields: object) -> None:
    """Give the profile an rpc section with ``fields``."""
    d["measurement"]["rpc"] = {"tracker_host": "h", "tracker_port": 9190, "device_key": "k"}
    d["measurement"]["rpc"].update(fields)


def test_ships_the_required_profiles() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "x86-avx512-2core",
        "x86-avx2-2core",
        "arm-cortex-a72-rpi4",
        "arm-cortex-a55-phone",
        "nvidia-gpu-sm90",
    } <= names
    kinds = {load_profile(p).target["kind"] for p in SHIPPED}
    methods = {load_profile(p).measurement.method for p in SHIPPED}
    assert kinds == {"llvm", "cuda"}
    assert {"local", "rpc"} <= methods


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_is_valid(path: Path) -> None:
    p = load_profile(path)
    assert p.name == path.stem
    assert p.inputs[0] == p.primary_input
    assert p.primary_input.frames >= 8
    assert len(p.stable_hash()) == 12
    assert profile_from_dict(p.to_dict(), "again") == p  # round trip through plain data
    if p.measurement.method == "rpc":
        assert p.measurement.rpc is not None
    if p.target.get("mtriple", "").startswith("aarch64"):
        assert p.cross_compiler == "aarch64-linux-gnu-g++"


@pytest.mark.parametrize(
    ("mutate", "names"),
    [
        (lambda d: d.update(latency_budget_sm=3), "latency_budget_sm: unknown key"),
        (
            lambda d: d.update(target="llvm -mcpu=haswell"),
            "target: 'llvm -mcpu=haswell' is a target string",
        ),
        (lambda d: d["target"].update(kind="tpu"), "target.kind: 'tpu' is not one of"),
        (lambda d: d["target"].update(mcpu="native"), "target.mcpu: 'native'"),
        (lambda d: d.update(cores=0), "cores: must be >= 1"),
        (lambda d: d.update(cores="two"), "cores: expected int, got 'two'"),
        (
            lambda d: d["measurement"].update(method="guess"),
            "measurement.method: 'guess' is not one of",
        ),
        (lambda d: d["measurement"].update(method="rpc"), "measurement.rpc: is required"),
        (
            lambda d: d["measurement"].update(
                rpc={"tracker_host": "h", "tracker_port": 99999, "device_key": "k"}
            ),
            "measurement.rpc.tracker_port: must be <= 65535",
        ),
        (lambda d: d["tuning"].update(trails_per_task=3), "tuning.trails_per_task: unknown key"),
        (lambda d: d["inputs"][1].update(frames=2), "inputs[1].frames: must be >= 8"),
        (lambda d: d.pop("channel_multiple"), "channel_multiple: is required"),
        (lambda d: d.update(schema_version=2), "schema_version: 2 is not supported"),
        (
            lambda d: d.update(latency_budget_ms=float("nan")),
            "latency_budget_ms: must be a finite number, got nan",
        ),
        (lambda d: d.update(memory_budget_mb=float("inf")), "memory_budget_mb: must be a finite"),
        (lambda d: d.update(cores=10**12), "cores: must be <= 4096, got 1000000000000"),
        (
            lambda d: d["tuning"].update(trials_per_task=1e300),
            "tuning.trials_per_task: expected int, got 1e+300",
        ),
        (lambda d: d["target"].update({"num-cores": 10**9}), "target.num-cores: must be <="),
        (lambda d: d.update(cross_compiler="g++\0"), "cross_compiler: 'g++\\x00' must be"),
        # measurement trust (issue 16): CV bound and repeats
        (lambda d: d["measurement"].update(max_cv=float("nan")), "measurement.max_cv: must be a"),
        (lambda d: d["measurement"].update(max_cv=0), "measurement.max_cv: must be > 0, got 0"),
        (lambda d: d["measurement"].update(max_cv=1.5), "measurement.max_cv: must be <= 1"),
        (lambda d: d["measurement"].update(max_cv="10%"), "measurement.max_cv: expected float"),
        (lambda d: d["measurement"].update(max_repeats=-1), "measurement.max_repeats: must be >="),
        (lambda d: d["measurement"].update(max_repeats=11), "measurement.max_repeats: must be <="),
        (lambda d: d["measurement"].update(max_repeats="two"), "max_repeats: expected int"),
        # RPC timeouts and attempts
        (lambda d: _rpc(d, queue_timeout_s=-1), "measurement.rpc.queue_timeout_s: must be > 0"),
        (lambda d: _rpc(d, queue_timeout_s=float("nan")), "rpc.queue_timeout_s: must be a finite"),
        (lambda d: _rpc(d, queue_timeout_s="soon"), "rpc.queue_timeout_s: expected float"),
        (lambda d: _rpc(d, run_timeout_s=0), "measurement.rpc.run_timeout_s: must be > 0"),
        (lambda d: _rpc(d, run_timeout_s=float("inf")), "rpc.run_timeout_s: must be a finite"),
        (
            lambda d: _rpc(d, run_timeout_s=400),
            "measurement.rpc.run_timeout_s: 400 s is longer than session_timeout_s (300 s)",
        ),
        (lambda d: _rpc(d, attempts=0), "measurement.rpc.attempts: must be >= 1, got 0"),
        (lambda d: _rpc(d, attempts=11), "measurement.rpc.attempts: must be <= 10"),
        (lambda d: _rpc(d, attempts=2.5), "measurement.rpc.attempts: expected int, got 2.5"),
        (lambda d: _rpc(d, attempt=2), "measurement.rpc.attempt: unknown key"),
    ],
)
def test_bad_profile_names_file_and_field(tmp_path: Path, mutate, names: str) -> None:
    d = _raw()
    mutate(d)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    assert names in msg
    assert "\n" not in msg


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("schema_version: 1\nname: [unclosed\n")
    with pytest.raises(ConfigError, match=r"p\.yaml:\d+: invalid YAML"):
        load_profile(path)


def test_find_profile_by_name_and_unknown_name() -> None:
    assert find_profile("x86-avx2-2core", ROOT / "hw_profiles").stem == "x86-avx2-2core"
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*x86-avx2-2core"):
        find_profile("nope", ROOT / "hw_profiles")


def test_host_compatibility_is_checked_per_target() -> None:
    arm = load_profile(ROOT / "hw_profiles" / "arm-cortex-a72-rpi4.yaml")
    ok, why = host_runs(arm)
    assert not ok
    assert "aarch64" in why
    local = pick_local_profile(ROOT / "hw_profiles")
    assert local.measurement.method == "local"
    assert host_runs(local)[0]
    # a profile seeded from another (a device being onboarded) is never the default while
    # its source runs here: x86-avx2-1core sorts first but is seeded from x86-avx2-2core
    assert local.tuning.seed_from is None
    seeded = load_profile(ROOT / "hw_profiles" / "x86-avx2-1core.yaml")
    assert seeded.tuning.seed_from == "x86-avx2-2core"


@given(
    cores=st.integers(1, 64),
    budget=st.floats(0.01, 1e4, allow_nan=False),
    frames=st.lists(st.integers(8, 2000), min_size=1, max_size=3, unique=True),
    multiple=st.integers(1, 64),
)
def test_profile_round_trip_property(
    cores: int, budget: float, frames: list[int], multiple: int
) -> None:
    d = _raw()
    d.update(
        cores=cores,
        latency_budget_ms=budget,
        channel_multiple=multiple,
        inputs=[{"name": f"in{i}", "frames": f} for i, f in enumerate(frames)],
    )
    p = profile_from_dict(d, "gen")
    assert profile_from_dict(p.to_dict(), "gen") == p
    assert p.primary_input.frames == frames[0]
    assert p.stable_hash() == profile_from_dict(p.to_dict(), "other").stable_hash()


# stable_hash() of the shipped profiles, computed before the measurement-trust fields
# (max_cv, max_repeats, rpc queue/run timeouts and attempts) existed: they must not change.
SHIPPED_HASHES = {
    "arm-cortex-a55-phone": "ac48a844f659",
    "arm-cortex-a72-rpi4": "f7ec81ae2c83",
    "nvidia-gpu-sm90": "babebac0e4d4",
    "x86-avx2-2core": "171290f8542e",
    "x86-avx512-2core": "217b6e490a6d",
}


@pytest.mark.parametrize("name", sorted(SHIPPED_HASHES))
def test_shipped_profile_hashes_are_unchanged(name: str) -> None:
    assert (
        load_profile(ROOT / "hw_profiles" / f"{name}.yaml").stable_hash() == (SHIPPED_HASHES[name])
    )


def test_measurement_trust_fields_parse_default_and_hash() -> None:
    d = _raw("arm-cortex-a55-phone")
    p = profile_from_dict(d, "a55")
    m, rpc = p.measurement, p.measurement.rpc
    assert rpc is not None
    # old profiles: the queue wait is the connect timeout, the run timeout is computed
    assert (m.max_cv, m.max_repeats) == (0.10, 2)
    assert (rpc.queue_timeout_s, rpc.run_timeout_s, rpc.attempts) == (None, None, 3)
    assert rpc.queue_wait_s == rpc.connect_timeout_s == 30
    # written out at their defaults: the same profile, the same hash
    d["measurement"].update(max_cv=0.1, max_repeats=2)
    d["measurement"]["rpc"].update(attempts=3)
    assert profile_from_dict(d, "a55").stable_hash() == p.stable_hash()
    d["measurement"].update(max_cv=0.05, max_repeats=4)
    d["measurement"]["rpc"].update(queue_timeout_s=600, run_timeout_s=120, attempts=5)
    q = profile_from_dict(d, "a55")
    assert (q.measurement.max_cv, q.measurement.max_repeats) == (0.05, 4)
    assert q.measurement.rpc is not None
    assert q.measurement.rpc.queue_wait_s == 600
    assert (q.measurement.rpc.run_timeout_s, q.measurement.rpc.attempts) == (120, 5)
    assert q.measurement.rpc.connect_timeout_s == 30  # still: reaching the tracker
    assert profile_from_dict(q.to_dict(), "again") == q
    hashes = {p.stable_hash(), q.stable_hash()}
    for field in ("queue_timeout_s", "run_timeout_s", "attempts"):
        one = _raw("arm-cortex-a55-phone")
        one["measurement"]["rpc"][field] = d["measurement"]["rpc"][field]
        hashes.add(profile_from_dict(one, "a55").stable_hash())
    assert len(hashes) == 5  # each setting, away from its default, is in the hash
    rows = dict(explain(q))
    assert "waiting in its queue <= 600 s" in rows["measurement"]
    assert "reaching the tracker <= 30 s" in rows["measurement"]
    assert "<= 120 s; 5 attempts" in rows["measurement"]
    assert "above 0.05 is timed again, up to 4 more times" in rows["measurement trust"]
