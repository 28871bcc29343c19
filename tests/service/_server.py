"""A real ``voxfit serve`` in a subprocess (own session, free port) and an httpx client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]


def device_yaml() -> str:
    """x86-avx2-2core without tuning and a generous budget: the cheapest real job."""
    prof = yaml.safe_load((ROOT / "hw_profiles" / "x86-avx2-2core.yaml").read_text())
    prof["name"] = "ci-device"
    prof["inputs"] = prof["inputs"][:1]
    prof["latency_budget_ms"] = 1000.0  # untuned code: every candidate fits
    prof["measurement"].update(repeats=3, min_repeat_ms=5, warmup=1)
    prof["tuning"].update(trials_per_task=0)
    return yaml.safe_dump(prof)


class Server:
    def __init__(self, work: Path, proc: subprocess.Popen[str], log: Path) -> None:
        self.work, self.proc, self.log = work, proc, log
        svc = work / "service"
        self.url = (svc / "url").read_text().strip()
        self.token = (svc / "token").read_text().strip()

    def client(self, token: str | None = "") -> httpx.Client:
        """A client with the service's token (``token=None``: none; a string: that one)."""
        tok = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self, timeout_s: float = 45) -> int:
        """SIGTERM and wait (runners requeue their jobs); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        return self.proc.wait(timeout=5)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@contextmanager
def running(work: Path, *args: str, command: list[str] | None = None) -> Iterator[Server]:
    """``voxfit serve --port 0 --work WORK ARGS`` (or ``command``) until the block ends;
    then SIGTERM (the runners requeue their jobs) and, if needed, SIGKILL of its group."""
    svc = work / "service"
    (svc / "url").unlink(missing_ok=True)
    cmd = command or [sys.executable, "-m", "voxfit.cli", "serve", "--port", "0",
                      "--work", str(work), *args]  # fmt: skip
    log = work / "serve.log"
    work.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (svc / "url").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"voxfit serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield Server(work, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=45)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything left of its group (runners)
        proc.wait()


def wait_job(client: httpx.Client, job_id: str, until: tuple[str, ...], timeout_s: float) -> dict:  # type: ignore[type-arg]
    """Poll the job until its state is one of ``until``; its last view."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        if job["state"] in until or time.monotonic() > deadline:
            return job  # type: ignore[no-any-return]
        time.sleep(0.5)
