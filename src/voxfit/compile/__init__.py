"""Compile models for a hardware profile with Apache TVM (Relax + MetaSchedule).

TVM itself runs in a :class:`TvmWorker` process; this package's import needs torch but not
TVM. Tuning reads the profile's shipped database (``cost_models/<profile>/tuning/``,
read-only at run time) under the user's own, which takes every new record
(:func:`compile_model`'s ``tuning_dir``, by default next to its ``out_dir``). Tuning trials
run where the profile measures (:func:`runner_spec`).
"""

from voxfit.compile._compile import (
    CompileResult,
    compile_model,
    default_tuning_dir,
    export_program,
    int8_layers,
    saturates_int8_pairs,
    seed_database_dir,
)
from voxfit.compile._database import PublishReport, RepairReport, check, locked, publish, repair
from voxfit.compile._executables import kept_executable
from voxfit.compile._lease import call_bounded, lease_bounded
from voxfit.compile._runner import RunnerKind, RunnerSpec, runner_spec
from voxfit.compile._worker import TvmWorker

__all__ = [
    "CompileResult",
    "PublishReport",
    "RepairReport",
    "RunnerKind",
    "RunnerSpec",
    "TvmWorker",
    "check",
    "compile_model",
    "default_tuning_dir",
    "seed_database_dir",
    "export_program",
    "kept_executable",
    "call_bounded",
    "lease_bounded",
    "locked",
    "publish",
    "repair",
    "runner_spec",
    "int8_layers",
    "saturates_int8_pairs",
]
