"""Compile models for a hardware profile with Apache TVM (Relax + MetaSchedule).

TVM itself runs in a :class:`TvmWorker` process; this package's import needs torch but not
TVM. The per-profile tuning database lives under ``cost_models/<profile>/tuning/``.
"""

from voxfit.compile._compile import CompileResult, compile_model, export_program
from voxfit.compile._database import RepairReport, locked, repair
from voxfit.compile._worker import TvmWorker

__all__ = [
    "CompileResult",
    "RepairReport",
    "TvmWorker",
    "compile_model",
    "export_program",
    "locked",
    "repair",
]
