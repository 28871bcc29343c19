"""The HTTP API (FastAPI): record jobs, show their state, serve what their runners made.

The API process does no heavy work: it checks a submission (the strict YAML loaders, and
the space against the model's declared names), writes one row to the job store, and serves
files the runners wrote (``front.json``, ``report.html``, the signed bundles, packed into
one archive on first request). Every request, the OpenAPI schema included, needs
``Authorization: Bearer <token>`` (the token file of :func:`~voxfit.service._paths.ensure_token`);
FastAPI's /docs page is off because a browser fetching the schema cannot send the token.
Request bodies are bounded (:data:`MAX_BODY_BYTES`, 413 above it), and every error is JSON
``{"detail": "<one line>"}``.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from voxfit import __version__
from voxfit._config import MAX_CONFIG_BYTES
from voxfit.errors import ConfigError
from voxfit.service._paths import ServicePaths
from voxfit.service._spec import make_spec, shipped_names
from voxfit.service._store import Job, JobStore

# One YAML file may be MAX_CONFIG_BYTES (the loaders' limit); a submission holds two.
MAX_BODY_BYTES = 2 * MAX_CONFIG_BYTES + 64 * 1024
_JOB_ID = re.compile(r"job-\d{8}-\d{6}-[0-9a-f]{6}")
ARCHIVES = {"tar.gz": "application/gzip", "zip": "application/zip"}


class JobRequest(BaseModel):
    """A job: a device (profile), what may be compressed (space) and the search budget."""

    model_config = ConfigDict(extra="forbid")
    profile: str | None = Field(None, description="A shipped profile name (GET /shipped).")
    profile_yaml: str | None = Field(None, description="A hardware profile as YAML text.")
    space: str | None = Field(None, description="A shipped space name; default tdnn-default.")
    space_yaml: str | None = Field(None, description="A search space as YAML text.")
    trials: int | None = Field(None, description="Finished trials the study should have.")
    timeout_s: float | None = Field(None, description="Wall-clock limit of the search.")
    preset: str = Field("default", description="Corpus/model size: tiny (tests) or default.")
    sampler: str = Field("tpe", description="tpe, nsga2 or random.")
    seed: int = Field(0, description="Sampler seed.")


class GuardMiddleware:
    """Bearer token on every request (401 before the body is read), then the body bound
    (413: by Content-Length at once, or counted as a chunked body arrives)."""

    def __init__(self, app: Any, token: str, max_body: int) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body = max_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        scheme, _, given = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            why = "wrong token" if given else "no token"
            await _send(send, 401, f"{why}: send Authorization: Bearer <token> ({_TOKEN_HINT})")
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _send(send, 413, f"request body over {self.max_body} bytes")
            return
        seen = 0
        refused = False

        async def counted() -> Any:
            # over the bound: answer 413 now and tell the app the client left, so it stops
            # reading (an exception here would become FastAPI's 400 "error parsing the body")
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    await _send(send, 413, f"request body over {self.max_body} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def quiet_after_413(message: Any) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, quiet_after_413)


_TOKEN_HINT = "the token is in <work>/service/token"


async def _send(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _finite(x: Any) -> Any:
    """JSON has no NaN: a missing figure is null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def create_app(paths: ServicePaths, token: str, max_body: int = MAX_BODY_BYTES) -> Any:
    """The ASGI app of the job API over the service folder ``paths`` (token checked on every
    request; see the module docstring)."""
    store = JobStore(paths.jobs_db)
    app = FastAPI(
        title="voxfit job API",
        version=__version__,
        description="Submit hardware-aware compression searches; fetch fronts, reports and "
        "signed bundles. Every request needs Authorization: Bearer <token>.",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return JSONResponse({"detail": f"{where}: {first.get('msg')}"}, status_code=422)

    @app.exception_handler(ConfigError)
    async def _config(_: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse({"detail": " ".join(str(exc).split())}, status_code=422)

    def job_or_404(job_id: str) -> Job:
        job = store.get(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def not_ready(job: Job, what: str) -> HTTPException:
        if job.state == "failed":
            return HTTPException(409, f"job {job.id} failed: {job.error}")
        return HTTPException(409, f"job {job.id} is {job.state}: no {what} yet")

    def job_file(job: Job, name: str, what: str) -> Path:
        """A file the runner wrote (a failed job may still have its front and report)."""
        p = paths.job_dir(job.id) / name
        if not p.is_file():
            raise not_ready(job, what)
        return p

    @app.post("/jobs", status_code=201, summary="Submit a job")
    def submit(req: JobRequest) -> dict[str, Any]:
        spec = make_spec(**req.model_dump())
        job = store.submit(spec, spec.profile().name, spec.space().name)
        return job.view()

    @app.get("/jobs", summary="Jobs with state and progress, oldest first")
    def jobs(state: str | None = None) -> list[dict[str, Any]]:
        store.release_orphans()
        store.requeue_stale()
        return [j.view() for j in store.jobs(state)]

    @app.get("/jobs/{job_id}", summary="One job's state and progress")
    def job(job_id: str) -> dict[str, Any]:
        return job_or_404(job_id).view()

    @app.get("/jobs/{job_id}/spec", summary="What the job was submitted with")
    def spec(job_id: str) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(job_or_404(job_id).spec)

    @app.get("/jobs/{job_id}/front", summary="The job's Pareto front (JSON rows, fastest first)")
    def front(job_id: str) -> Any:
        p = job_file(job_or_404(job_id), "front.json", "front")
        return _finite(json.loads(p.read_text()))

    @app.get("/jobs/{job_id}/report", response_class=HTMLResponse, summary="HTML report")
    def report(job_id: str) -> FileResponse:
        p = job_file(job_or_404(job_id), "report.html", "report")
        return FileResponse(p, media_type="text/html")

    @app.get(
        "/jobs/{job_id}/bundles.{fmt}",
        summary="The job's signed bundles as one archive (fmt: tar.gz or zip)",
        response_class=FileResponse,
    )
    def bundles(job_id: str, fmt: str) -> FileResponse:
        if fmt not in ARCHIVES:
            raise HTTPException(404, f"no archive format {fmt!r} (tar.gz or zip)")
        job = job_or_404(job_id)
        if job.state != "succeeded":
            raise not_ready(job, "bundles")
        out = _archive(paths.job_dir(job.id), job.id, fmt)
        return FileResponse(out, media_type=ARCHIVES[fmt], filename=out.name)

    @app.get("/key", response_class=PlainTextResponse, summary="Public key of the bundles")
    def key() -> PlainTextResponse:
        if not paths.public_key.is_file():
            raise HTTPException(503, "the service has no signing key yet (start voxfit serve)")
        return PlainTextResponse(paths.public_key.read_text(), media_type="application/x-pem-file")

    @app.get("/shipped", summary="Shipped profile and space names a job may use")
    def shipped() -> dict[str, list[str]]:
        return shipped_names()

    return GuardMiddleware(app, token, max_body)


def _archive(job_dir: Path, job_id: str, fmt: str) -> Path:
    """``<job>/bundles.<fmt>`` with every ``bundles/trial-<n>/`` under ``<job_id>/``; made
    once (bundles do not change after the job), atomically (a temp file renamed)."""
    out = job_dir / f"{job_id}-bundles.{fmt}"
    if out.is_file():
        return out
    src = job_dir / "bundles"
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []
    fd, tmp = tempfile.mkstemp(dir=job_dir, suffix=".partial")
    os.close(fd)
    try:
        if fmt == "zip":
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in files:
                    z.write(f, f"{job_id}/{f.relative_to(src)}")
        else:
            with tarfile.open(tmp, "w:gz") as t:
                for f in files:
                    t.add(f, f"{job_id}/{f.relative_to(src)}", recursive=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
