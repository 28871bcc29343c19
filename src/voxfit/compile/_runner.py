"""Which MetaSchedule runner measures tuning trials for a profile (plain data, no TVM).

Tuning measures candidate schedules where the profile says latency is measured: on this
machine, or on a device leased from the profile's TVM RPC tracker. :func:`runner_spec` makes
that choice once, from the profile; the worker turns the spec into MetaSchedule's runner
(``_tune.make_runner``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile

RunnerKind = Literal["local", "rpc"]


@dataclass(frozen=True, slots=True)
class RunnerSpec:
    """A MetaSchedule runner, described: ``"local"``, or ``"rpc"`` with the tracker and the
    device key to lease. ``timeout_s`` bounds one measurement of one trial."""

    kind: RunnerKind
    timeout_s: float
    tracker_host: str | None = None
    tracker_port: int | None = None
    device_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the worker request."""
        return asdict(self)


def runner_spec(profile: HardwareProfile) -> RunnerSpec:
    """The runner tuning uses for ``profile``: its RPC tracker when it measures over RPC,
    else this machine (``local``, and ``predicted``, whose promoted candidates are measured
    here). ``tuning.runner_timeout_s`` bounds each trial's measurement either way.

    Raises:
        ConfigError: an RPC profile without its ``measurement.rpc`` section (the loader
            refuses those; a profile built in code may not).
    """
    timeout_s = profile.tuning.runner_timeout_s
    match profile.measurement.method:
        case "rpc":
            rpc = profile.measurement.rpc
            if rpc is None:
                raise ConfigError(
                    f"{profile.source or profile.name}: measurement.rpc: an rpc profile needs "
                    "the tracker to tune on"
                )
            return RunnerSpec(
                "rpc",
                timeout_s,
                tracker_host=rpc.tracker_host,
                tracker_port=rpc.tracker_port,
                device_key=rpc.device_key,
            )
        case "local" | "predicted":
            return RunnerSpec("local", timeout_s)
