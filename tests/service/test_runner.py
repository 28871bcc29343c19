"""Runners and their supervisor without a search: a job failing with a user error shows
that one line; a runner that dies is noticed at once, its job requeued, then failed with the
reason; claims are atomic across processes; stale heartbeats release a job."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.service._server import running, wait_job
from voxfit.errors import DataError
from voxfit.service import (
    MAX_ATTEMPTS,
    JobStore,
    RunnerSettings,
    ServicePaths,
    ensure_key,
    make_spec,
    run_job,
)

SPEC = make_spec(profile="x86-avx2-2core", trials=1, preset="tiny")


@pytest.mark.parametrize(
    ("raised", "shown"),
    [
        (DataError("corpus: espeak-ng\nis missing"), "corpus: espeak-ng is missing"),
        (RuntimeError("boom\ntraceback-ish"), "RuntimeError: boom traceback-ish"),
    ],
)
def test_a_failing_job_shows_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception, shown: str
) -> None:
    import voxfit.search

    def fail(**_: object) -> None:
        raise raised

    monkeypatch.setattr(voxfit.search.SearchContext, "prepare", fail)
    paths = ServicePaths(tmp_path)
    ensure_key(paths)
    store = JobStore(paths.jobs_db)
    job = store.submit(SPEC, "x86-avx2-2core", "tdnn-default")
    claimed = store.claim("here:1")
    assert claimed is not None
    assert claimed.id == job.id
    assert run_job(claimed, RunnerSettings(paths, "sqlite:///" + str(tmp_path / "s.db")),
                   store, "here:1") == shown  # fmt: skip
    done = store.get(job.id)
    assert done is not None
    assert (done.state, done.error, done.phase) == ("failed", shown, "failed")


def test_an_error_after_a_stop_signal_is_the_stop_not_a_job_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM raised inside an import or a library's bare except can surface as another
    error (a RecursionError was seen in CI): the job is not failed, the runner stops."""
    import voxfit.search
    from voxfit.service import _runner

    def interrupted(**_: object) -> None:
        _runner.STOPPING.set()
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(voxfit.search.SearchContext, "prepare", interrupted)
    monkeypatch.setattr(_runner, "STOPPING", _runner.threading.Event())
    paths = ServicePaths(tmp_path)
    ensure_key(paths)
    store = JobStore(paths.jobs_db)
    job = store.submit(SPEC, "x86-avx2-2core", "tdnn-default")
    claimed = store.claim("here:1")
    assert claimed is not None
    settings = RunnerSettings(paths, "sqlite:///" + str(tmp_path / "s.db"))
    with pytest.raises(_runner.RunnerStopped, match="surfacing as RecursionError"):
        run_job(claimed, settings, store, "here:1")
    now = store.get(job.id)
    assert now is not None
    assert now.state == "running"  # still held: run_jobs' handler requeues it
    assert now.error is None


def test_claims_are_atomic_across_processes(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    ids = {store.submit(SPEC, "p", "s").id for _ in range(30)}
    claimer = textwrap.dedent(f"""
        import sys
        from voxfit.service import JobStore
        store = JobStore({str(tmp_path / "jobs.db")!r})
        while (job := store.claim(sys.argv[1])) is not None:
            print(job.id, flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", claimer, f"h:{i}"], text=True,
                              stdout=subprocess.PIPE) for i in range(3)]  # fmt: skip
    got = [line for p in procs for line in p.communicate(timeout=120)[0].split()]
    assert sorted(got) == sorted(ids)  # every job once, none twice
    assert {j.state for j in store.jobs()} == {"running"}


def test_stale_heartbeat_requeues_then_fails(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    job = store.submit(SPEC, "p", "s")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = store.claim(f"far:{attempt}")
        assert claimed is not None
        assert claimed.attempts == attempt
        assert store.beat(job.id, f"far:{attempt}", phase="searching", trials_finished=0)
        time.sleep(0.05)
        assert store.requeue_stale(stale_s=0.01) == [job.id]
        assert not store.beat(job.id, f"far:{attempt}")  # no longer that runner's
    last = store.get(job.id)
    assert last is not None
    assert last.state == "failed"
    assert f"runner far:{MAX_ATTEMPTS} sent no heartbeat" in (last.error or "")
    # a clean stop does not use up an attempt
    other = store.submit(SPEC, "p", "s")
    for _ in range(MAX_ATTEMPTS + 1):
        assert store.claim("near:1") is not None
        assert store.release("near:1", "stopped", count_attempt=False) == [other.id]
    again = store.get(other.id)
    assert again is not None
    assert (again.state, again.attempts) == ("queued", 0)


FAKE_RUNNER = """
import os, signal, sys, time
from voxfit.service import JobStore
from voxfit.service._store import runner_id
store = JobStore(sys.argv[1])
while store.claim(runner_id()) is None:
    time.sleep(0.1)
os.kill(os.getpid(), signal.SIGKILL)  # dies mid-job, as an OOM kill would
"""

SERVE = """
import sys
from pathlib import Path
from voxfit.service import ServicePaths, serve
serve(ServicePaths(Path(sys.argv[1])), port=0, runners=1,
      runner_command=[sys.executable, sys.argv[2], sys.argv[1] + "/service/jobs.db"])
"""


def test_a_dead_runner_is_noticed_requeued_then_failed(tmp_path: Path) -> None:
    fake = tmp_path / "fake_runner.py"
    fake.write_text(FAKE_RUNNER)
    work = tmp_path / "work"
    cmd = [sys.executable, "-c", SERVE, str(work), str(fake)]
    with running(work, command=cmd) as s, s.client() as c:
        job = c.post("/jobs", json={"profile": "x86-avx2-2core", "trials": 1}).json()
        t0 = time.monotonic()
        done = wait_job(c, job["id"], ("failed", "succeeded"), 60)
        took = time.monotonic() - t0
    assert done["state"] == "failed", done
    assert done["attempts"] == MAX_ATTEMPTS
    assert "exited (killed by SIGKILL)" in done["error"]
    assert f"attempt {MAX_ATTEMPTS} of {MAX_ATTEMPTS}" in done["error"]
    assert done["note"].startswith("requeued: runner ")  # after the first death
    assert took < 30  # noticed by the supervisor, not after a heartbeat timeout


def test_standalone_runner_until_empty(tmp_path: Path) -> None:
    """``voxfit serve --run-jobs --until-empty`` (a runner without the API) on an empty
    queue: makes the service's key, runs nothing, exits 0."""
    r = subprocess.run(
        [sys.executable, "-m", "voxfit.cli", "serve", "--run-jobs", "--until-empty",
         "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "runner done: 0 job(s)" in r.stderr
    assert (tmp_path / "service" / "signing.pub").is_file()
    assert not (tmp_path / "service" / "token").exists()  # the API's, made by the API


def test_an_unsupervised_dead_runner_is_released_by_its_pid(tmp_path: Path) -> None:
    """A runner started on its own (``--run-jobs``) and killed: the next look at the jobs
    (a list, a claim) finds its pid gone on this host and requeues the job at once."""
    fake = tmp_path / "fake_runner.py"
    fake.write_text(FAKE_RUNNER)
    work = tmp_path / "work"
    with running(work, "--runners", "0") as s, s.client() as c:
        job = c.post("/jobs", json={"profile": "x86-avx2-2core", "trials": 1}).json()
        dead = subprocess.run([sys.executable, str(fake), str(work / "service" / "jobs.db")],
                              timeout=60, check=False)  # fmt: skip
        assert dead.returncode == -9
        listed = {j["id"]: j for j in c.get("/jobs").raise_for_status().json()}
    got = listed[job["id"]]
    assert (got["state"], got["attempts"], got["runner"]) == ("queued", 1, None)
    assert got["note"].startswith("requeued: runner ")
    assert got["note"].endswith(" is gone")
