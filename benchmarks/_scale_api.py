"""The job API end to end, for ``benchmarks/scale.py``: a real ``voxfit serve`` (one runner)
in a temporary work folder, one tiny job submitted over HTTP, its bundle archive downloaded
and every bundle verified with the service's public key.

Imported by ``scale.py`` as ``from _scale_api import api_job``; runnable alone:
``python benchmarks/_scale_api.py [--work DIR]`` prints the figures as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 1200.0


def _device_yaml() -> str:
    """The shipped 2-core AVX2 profile without tuning (untuned code fits a 1 s budget)."""
    prof = yaml.safe_load((ROOT / "hw_profiles" / "x86-avx2-2core.yaml").read_text())
    prof["name"] = "bench-device"
    prof["inputs"] = prof["inputs"][:1]
    prof["latency_budget_ms"] = 1000.0
    prof["measurement"].update(repeats=3, min_repeat_ms=5, warmup=1)
    prof["tuning"].update(trials_per_task=0)
    return yaml.safe_dump(prof)


def api_job(tmp: Path, corpus: Path | None = None) -> dict[str, Any]:
    """Serve from ``tmp/work``, run one job (tiny preset, 1 trial, shipped space) over HTTP.

    Args:
        tmp: an empty folder (the service's work folder goes under it).
        corpus: a tiny corpus folder (``tiny-<hash>/``) to link instead of synthesizing one.

    Returns:
        ``api_job_completed`` (the job succeeded and every bundle verified with the public
        key), ``api_job_s`` (submit to succeeded), ``api_archive_s`` (download + verify),
        ``bundles_verified``, ``api_job_state``, ``api_job_error``, ``api_runner_log_tail``
        when it did not complete.
    """
    from voxfit.search import verify_bundle

    work = tmp / "work"
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    if corpus is not None:
        (work / "corpus" / corpus.name).symlink_to(corpus.resolve())
    log = tmp / "serve.log"
    cmd = [sys.executable, "-m", "voxfit.cli", "serve", "--port", "0", "--runners", "1",
           "--work", str(work), "--cost-models", str(tmp / "cm")]  # fmt: skip
    out: dict[str, Any] = {"api_job_completed": False, "api_job_s": None, "bundles_verified": 0}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        url_file = work / "service" / "url"
        deadline = time.monotonic() + 60
        while not url_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out["api_job_error"] = "voxfit serve did not start: " + log.read_text()[-500:]
                return out
            time.sleep(0.1)
        token = (work / "service" / "token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url_file.read_text().strip(), headers=headers,
                          timeout=60) as api:  # fmt: skip
            t0 = time.monotonic()
            body = {"profile_yaml": _device_yaml(), "space": "tdnn-default", "trials": 1,
                    "preset": "tiny"}  # fmt: skip
            job = api.post("/jobs", json=body).raise_for_status().json()
            while job["state"] in ("queued", "running") and time.monotonic() - t0 < JOB_TIMEOUT_S:
                time.sleep(1)
                job = api.get(f"/jobs/{job['id']}").raise_for_status().json()
            out["api_job_s"] = round(time.monotonic() - t0, 1)
            out["api_job_state"], out["api_job_error"] = job["state"], job["error"]
            if job["state"] != "succeeded":
                out["api_runner_log_tail"] = _runner_log(work)
                return out
            t1 = time.monotonic()
            pub = tmp / "signing.pub"
            pub.write_text(api.get("/key").raise_for_status().text)
            archive = tmp / "bundles.tar.gz"
            with (
                archive.open("wb") as f,
                api.stream("GET", f"/jobs/{job['id']}/bundles.tar.gz") as r,
            ):
                for chunk in r.raise_for_status().iter_bytes():
                    f.write(chunk)
        with tarfile.open(archive) as t:
            t.extractall(tmp / "bundles", filter="data")
        bundles = sorted((tmp / "bundles" / job["id"]).iterdir())
        problems = {b.name: verify_bundle(b, key=pub) for b in bundles}
        out["bundles_verified"] = sum(not p for p in problems.values())
        out["api_archive_s"] = round(time.monotonic() - t1, 1)
        out["api_archive_bytes"] = archive.stat().st_size
        out["api_job_completed"] = bool(bundles) and out["bundles_verified"] == len(bundles)
        if not out["api_job_completed"]:
            out["api_job_error"] = f"bundle problems: {problems}"
        return out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=45)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _runner_log(work: Path) -> str:
    logs = sorted((work / "service" / "runners").glob("*.log"))
    return logs[0].read_text()[-2000:] if logs else ""


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=None, help="folder (default: a temp one)")
    ap.add_argument("--corpus", type=Path, default=None, help="a tiny-<hash>/ corpus to link")
    args = ap.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(api_job(args.work, args.corpus), indent=1))
    else:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(api_job(Path(d), args.corpus), indent=1))
