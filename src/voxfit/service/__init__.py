"""The job service: an HTTP API that records search jobs, and runners that execute them.

``voxfit serve`` runs :func:`serve`: the API (:func:`create_app`, FastAPI on uvicorn) in one
process, which only checks submissions (:func:`make_spec`, the project's strict loaders)
and records them in the :class:`JobStore`, and N runner processes (:func:`run_jobs`) that
claim queued jobs atomically and run them through :mod:`voxfit.search` (search, front,
report, signed bundles). State lives under ``<work>/service/`` (:class:`ServicePaths`).
"""

from voxfit.service._app import MAX_BODY_BYTES, JobRequest, create_app
from voxfit.service._paths import ServicePaths, ensure_key, ensure_token
from voxfit.service._runner import RunnerSettings, RunnerStopped, run_job, run_jobs
from voxfit.service._serve import Supervisor, exit_reason, serve
from voxfit.service._spec import JobSpec, make_spec, parse_profile, parse_space, shipped_names
from voxfit.service._store import MAX_ATTEMPTS, STALE_S, STATES, Job, JobState, JobStore

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_BODY_BYTES",
    "STALE_S",
    "STATES",
    "Job",
    "JobRequest",
    "JobSpec",
    "JobState",
    "JobStore",
    "RunnerSettings",
    "RunnerStopped",
    "ServicePaths",
    "Supervisor",
    "create_app",
    "ensure_key",
    "ensure_token",
    "exit_reason",
    "make_spec",
    "parse_profile",
    "parse_space",
    "run_job",
    "run_jobs",
    "serve",
    "shipped_names",
]
