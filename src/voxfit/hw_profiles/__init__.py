"""Hardware profiles (``hw_profiles/*.yaml``): schema, loader, host compatibility, and a
description of the host (:func:`describe_host`) that fitted models record.

Importing this package is instant: it needs neither torch nor TVM.
"""

from voxfit.hw_profiles._host import (
    HostInfo,
    check_recorded_host,
    describe_host,
    host_cpu_flags,
    host_runs,
    pick_local_profile,
    same_host_kind,
    target_runs_here,
)
from voxfit.hw_profiles._profile import (
    METHODS,
    PROFILE_SCHEMA_VERSION,
    HardwareProfile,
    InputSpec,
    MeasurementSpec,
    RpcSpec,
    TuningSpec,
    explain,
    find_profile,
    load_profile,
    profile_from_dict,
)

__all__ = [
    "METHODS",
    "PROFILE_SCHEMA_VERSION",
    "HardwareProfile",
    "HostInfo",
    "InputSpec",
    "MeasurementSpec",
    "RpcSpec",
    "TuningSpec",
    "check_recorded_host",
    "describe_host",
    "explain",
    "find_profile",
    "host_cpu_flags",
    "host_runs",
    "target_runs_here",
    "load_profile",
    "pick_local_profile",
    "profile_from_dict",
    "same_host_kind",
]
