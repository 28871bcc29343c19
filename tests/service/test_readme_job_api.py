"""End to end over HTTP: the README's job API client runs against a real ``voxfit serve``
with a real runner (tiny corpus and model, one trial measured with TVM, a signed bundle),
and a runner killed mid-job has its job requeued and claimed again."""

from __future__ import annotations

import io
import os
import re
import signal
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tests.service._server import Server, device_yaml, running, wait_job
from voxfit.search import fingerprint, load_public_key, read_signature, verify_log
from voxfit.service import JobStore

pytestmark = [pytest.mark.slow, pytest.mark.tvm]
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _block() -> str:
    section = README.read_text().split("## Job API (voxfit serve)", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README: no python block under '## Job API (voxfit serve)'"
    return m.group(1)


@pytest.fixture(scope="module")
def service(served_work: Callable[[str], Path]) -> Iterator[Server]:
    work = served_work("served")
    (work.parent / "my-device.yaml").write_text(device_yaml())
    with running(work, "--runners", "1", "--cost-models", str(work.parent / "cm")) as s:
        yield s


def test_readme_client_runs_a_job_and_verifies_its_bundles(service: Server) -> None:
    root = service.work.parent
    here = Path.cwd()
    out = io.StringIO()
    t0 = time.monotonic()
    os.chdir(root)
    try:
        scope: dict[str, object] = {}
        with redirect_stdout(out):
            exec(compile(_block(), "README.md:Job API", "exec"), scope)  # noqa: S102
    finally:
        os.chdir(here)
    took = time.monotonic() - t0
    printed = out.getvalue()
    job = scope["job"]
    assert isinstance(job, dict)
    assert job["state"] == "succeeded", (job, service.output()[-3000:])
    assert re.search(r"^trial \d+: [\d.]+ ms, post-adapt PER", printed, re.M), printed
    verified = re.findall(r"^trial-\d+ verified$", printed, re.M)
    assert len(verified) == job["bundles"] >= 1, printed
    assert job["progress"] == {"trials_finished": 1, "trials_budget": 1, "fraction": 1.0}
    print(f"README job: {took:.0f} s from submit to verified bundles")
    # the bundles were signed by the service's key, and the exports are in the study's log
    pub = service.work / "service" / "signing.pub"
    bundle = next((root / "bundles" / job["id"]).iterdir())
    sig = read_signature(bundle)
    assert sig is not None
    assert sig["key_fingerprint"] == fingerprint(load_public_key(pub))
    log = service.work / "audit" / f"{job['id']}.jsonl"
    assert verify_log(log).ok
    assert '"bundle_exported"' in log.read_text()
    with service.client() as c:
        report = c.get(f"/jobs/{job['id']}/report").raise_for_status()
        assert report.headers["content-type"].startswith("text/html")
        assert "Pareto" in report.text
        z = zipfile.ZipFile(io.BytesIO(c.get(f"/jobs/{job['id']}/bundles.zip").content))
    with tarfile.open(root / "bundles.tar.gz") as t:
        assert sorted(z.namelist()) == sorted(m.name for m in t.getmembers() if m.isfile())


def test_a_killed_runner_requeues_its_job(service: Server) -> None:
    with service.client() as c:
        body = {"profile_yaml": device_yaml(), "trials": 1, "preset": "tiny"}
        job = c.post("/jobs", json=body).raise_for_status().json()
        running_job = wait_job(c, job["id"], ("running", "succeeded", "failed"), 120)
        assert running_job["state"] == "running", running_job
        first = running_job["runner"]
        os.kill(int(first.rsplit(":", 1)[1]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = c.get(f"/jobs/{job['id']}").json()
            if now["state"] == "running" and now["runner"] != first:
                break
            assert time.monotonic() < deadline, (now, service.output()[-3000:])
            time.sleep(0.3)
    assert now["attempts"] == 2
    assert now["note"] == f"requeued: runner {first} exited (killed by SIGKILL)"
    service.stop()  # SIGTERM: the runner puts the job back without using up an attempt
    back = JobStore(service.work / "service" / "jobs.db").get(job["id"])
    assert back is not None
    runner_log = (service.work / "service" / "runners" / "runner-0.log").read_text()
    assert (back.state, back.attempts, back.runner) == ("queued", 1, None), (
        back.error,
        runner_log[-6000:],
    )
    assert back.note is not None
    assert "stopped" in back.note
