"""A job whose study lives in PostgreSQL: ``voxfit serve --storage postgresql://...`` on a
real local server (skipped, with the reason, only where its programs are not installed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.service._server import device_yaml, running, wait_job
from voxfit.search import load_study, records
from voxfit.search._postgres import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.tvm]


def test_a_job_on_postgresql(served_work: Callable[[str], Path], postgres: PostgresServer) -> None:
    work = served_work("served-pg")
    args = ["--runners", "1", "--storage", postgres.url, "--cost-models", str(work.parent / "cm")]
    with running(work, *args) as s, s.client() as c:
        body = {"profile_yaml": device_yaml(), "trials": 1, "preset": "tiny"}
        job = c.post("/jobs", json=body).raise_for_status().json()
        done = wait_job(c, job["id"], ("succeeded", "failed"), 600)
        assert done["state"] == "succeeded", (done, s.output()[-2000:])
        assert done["bundles"] >= 1
        assert c.get(f"/jobs/{job['id']}/bundles.tar.gz").status_code == 200
    assert not (work / "service" / "studies.db").exists()  # the study is in PostgreSQL
    password = postgres.url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    runner_log = (work / "service" / "runners" / "runner-0.log").read_text()
    assert "voxfit:***@127.0.0.1" in runner_log  # the URL without its password
    assert password not in runner_log + s.output()
    study = load_study(postgres.url, job["id"])
    # one trial run; the other baselines stay enqueued (WAITING) for a bigger budget
    assert [r.state for r in records(study) if r.state != "WAITING"] == ["COMPLETE"]
    assert study.user_attrs["profile"]["name"] == "ci-device"
