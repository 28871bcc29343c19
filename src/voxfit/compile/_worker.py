"""A long-lived process that owns TVM, and the parent-side handle that talks to it.

Why a separate process: TVM's thread pool may pin the process to one CPU, which torch's
OpenMP threads then inherit (torch runs ~100x slower); a segfault in a compiler pass or a
hung measurement must not take the search down; and importing TVM costs seconds, so one
worker serves many requests. The parent sends plain-dict requests over a pipe and always
gets a dict back: ``{"ok": ...}`` or ``{"error": "one line"}``. A worker that dies or runs
past its deadline is killed and replaced on the next call.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

OPS = (
    "ping",
    "check_target",
    "build",
    "task_keys",
    "time_here",
    "measure_local",
    "measure_rpc",
    "tracker_summary",
    "run_local",
    "run_rpc",
)


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """End this process as soon as its parent is gone (reparented), even mid-job.

    A parent killed by a signal runs no exit handlers, so the daemon flag alone would leave
    the worker tuning for minutes; MetaSchedule and time.sleep release the GIL, so this
    thread gets to run while a job is in progress.
    """
    while True:
        time.sleep(every_s)
        if os.getppid() != parent:
            os._exit(0)


def serve(conn: Connection, env: dict[str, str], parent: int | None = None) -> None:
    """The worker's main loop (runs in the spawned child)."""
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    os.environ.update(env)  # before TVM is imported: thread count, no affinity pinning
    # MetaSchedule logs every round to stdout at DEBUG; keep that in its log files only.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    # TVM is imported here, in the child, never in the parent. The timing ops belong to
    # voxfit.latency (which imports compile, not the other way round at module level); they
    # are served by this same process because a local measurement runs the executable a
    # build just kept here (compile._executables).
    import tvm

    from voxfit.compile import _build, _fastmath, _import
    from voxfit.latency import _tvm_timing

    _fastmath.register()

    def _ping(req: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(req.get("sleep_s", 0.0)))  # a busy worker, for tests
        return {"pid": os.getpid(), "tvm": tvm.__version__}

    handlers = {
        "ping": _ping,
        "check_target": lambda req: {"target": _import.check_target(req["profile"])},
        "build": _build.build,
        "task_keys": _build.tasks_of,
        "time_here": _build.time_here,
        "measure_local": _tvm_timing.measure_local,
        "measure_rpc": _tvm_timing.measure_rpc,
        "tracker_summary": _tvm_timing.tracker_summary,
        "run_local": _tvm_timing.run_local,
        "run_rpc": _tvm_timing.run_rpc,
    }
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        try:
            conn.send({"ok": handlers[req["op"]](req)})
        except Exception as e:  # noqa: BLE001 - every failure becomes a result, not a crash
            first = str(e).strip().splitlines()
            msg = first[-1] if first else ""
            log.debug("worker op %s failed:\n%s", req.get("op"), traceback.format_exc())
            conn.send({"error": f"{type(e).__name__}: {msg}"[:2000]})


class TvmWorker:
    """Parent-side handle of one TVM worker process with ``threads`` TVM threads.

    Lifecycle: started lazily by the first :meth:`call`; :meth:`close` (or leaving the
    ``with`` block) stops it. After a crash or a timeout the next call starts a new one.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def __enter__(self) -> TvmWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> tuple[mp.process.BaseProcess, Connection]:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        env = {
            "TVM_NUM_THREADS": str(self.threads),
            "TVM_BIND_THREADS": "0",
            "OMP_NUM_THREADS": str(self.threads),
        }
        self._proc = ctx.Process(target=serve, args=(child, env, os.getpid()), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        return self._proc, parent

    def call(self, op: str, timeout_s: float | None = None, **req: Any) -> dict[str, Any]:
        """Run ``op`` in the worker; a result dict, or ``{"error": ...}`` on any failure."""
        if op not in OPS:
            raise ValueError(f"unknown worker op {op!r}")
        if self._proc is None or self._conn is None or not self._proc.is_alive():
            proc, conn = self._start()
        else:
            proc, conn = self._proc, self._conn
        try:
            conn.send({"op": op, **req})
            if not conn.poll(timeout_s):
                self._kill()
                return {"error": f"TVM worker: {op} did not finish within {timeout_s:g} s"}
            reply: dict[str, Any] = conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            proc.join(5)
            code = proc.exitcode
            self._kill()
            return {"error": f"TVM worker process died during {op} (exit code {code})"}
        if "error" in reply:
            return reply
        result: dict[str, Any] = reply["ok"]
        return result

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        self._proc = None
        self._conn = None

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            try:
                self._conn.send(None)
                self._proc.join(10)
            except (BrokenPipeError, OSError):
                pass
        self._kill()
