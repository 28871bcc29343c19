"""Hardware profiles (``hw_profiles/*.yaml``): schema, loader, host compatibility.

Importing this package is instant: it needs neither torch nor TVM.
"""

from voxfit.hw_profiles._host import host_cpu_flags, host_runs, pick_local_profile
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
    "InputSpec",
    "MeasurementSpec",
    "RpcSpec",
    "TuningSpec",
    "explain",
    "find_profile",
    "host_cpu_flags",
    "host_runs",
    "load_profile",
    "pick_local_profile",
    "profile_from_dict",
]
