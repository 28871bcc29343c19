"""The TVM worker process does not outlive its parent, even in the middle of a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.tvm]
ROOT = Path(__file__).resolve().parents[2]

PARENT = """
import sys
from voxfit.compile import TvmWorker
w = TvmWorker(1)
print(w.call("ping", timeout_s=120)["pid"], flush=True)
w.call("ping", timeout_s=600, sleep_s=300)  # busy for minutes; the test kills us here
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose; reaped by init soon
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_worker_exits_when_its_parent_is_killed_mid_job() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
        time.sleep(1.0)  # the worker is now sleeping inside the job
        parent.send_signal(signal.SIGKILL)  # no exit handlers, no daemon cleanup
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        gone = not _alive(pid)
        if not gone:
            os.kill(pid, signal.SIGKILL)
        assert gone, "the TVM worker kept running after its parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
