"""``voxfit serve``: the API (uvicorn, in this process) and N runner processes beside it.

The supervisor thread starts the runners once the API listens, writes the API's address to
``<work>/service/url``, and watches them: a runner that exits has its running job released
at once (requeued, or failed after two attempts, with the exit status as the reason) and is
started again (with a growing pause if it keeps dying). On shutdown the runners get SIGTERM
(they requeue their job without using up an attempt) and, after a grace period, SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from typing import IO, Any

from voxfit.service._app import create_app
from voxfit.service._paths import ServicePaths, ensure_key, ensure_token
from voxfit.service._store import JobStore, runner_id

log = logging.getLogger(__name__)
STOP_GRACE_S = 30.0


def exit_reason(code: int) -> str:
    """A process's exit status in words (``killed by SIGKILL``, ``exit code 1``)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Keeps ``n`` runner processes (``command``) alive; logs go to ``paths.runners``."""

    def __init__(
        self, paths: ServicePaths, command: list[str], n: int, env: dict[str, str] | None = None
    ) -> None:
        self.paths, self.command, self.n = paths, command, n
        self.env = {**os.environ, **(env or {})}
        self.store = JobStore(paths.jobs_db)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, IO[bytes]] = {}
        self.stopping = threading.Event()
        self._pause: dict[int, float] = {}

    def start(self, slot: int) -> None:
        self.paths.runners.mkdir(parents=True, exist_ok=True)
        if slot not in self.logs:
            self.logs[slot] = (self.paths.runners / f"runner-{slot}.log").open("ab")
        self.procs[slot] = subprocess.Popen(
            self.command,
            stdout=self.logs[slot],
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        log.info("runner %d started (pid %d)", slot, self.procs[slot].pid)

    def watch(self) -> None:
        """Start the runners, then restart any that exits, until :meth:`stop`."""
        for slot in range(self.n):
            self.start(slot)
        started = {slot: time.monotonic() for slot in self.procs}
        while not self.stopping.wait(1.0):
            for slot, p in list(self.procs.items()):
                code = p.poll()
                if code is None:
                    continue
                if self.stopping.is_set():
                    # stop() signalled it (stopping is set before any SIGTERM goes out):
                    # stop() requeues its job without using up an attempt
                    return
                rid = runner_id(p.pid)
                why = f"runner {rid} exited ({exit_reason(code)})"
                back = self.store.release(rid, why)
                log.warning("%s%s", why, f"; released {', '.join(back)}" if back else "")
                # a runner that dies at once (a broken install) is restarted ever more slowly
                quick = time.monotonic() - started[slot] < 30
                self._pause[slot] = min(60.0, 2 * self._pause.get(slot, 1.0)) if quick else 1.0
                if self.stopping.wait(self._pause[slot]):
                    return
                self.start(slot)
                started[slot] = time.monotonic()

    def stop(self) -> None:
        """SIGTERM every runner (each requeues its job), SIGKILL those still there after
        :data:`STOP_GRACE_S`; jobs a killed runner still held are requeued here."""
        self.stopping.set()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            self.store.release(runner_id(p.pid), "service stopped", count_attempt=False)
        for f in self.logs.values():
            f.close()


def serve(
    paths: ServicePaths,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    runners: int = 1,
    runner_command: list[str] | None = None,
    runner_env: dict[str, str] | None = None,
    access_log: bool = False,
) -> None:
    """Run the API until SIGINT/SIGTERM, with ``runners`` runner processes started by
    ``runner_command`` (the CLI's ``voxfit serve --run-jobs ...``) with ``runner_env`` added
    to their environment.

    Raises:
        ConfigError: the token file is readable by others, or half a key pair is there.
    """
    import uvicorn

    token = ensure_token(paths)
    ensure_key(paths)
    store = JobStore(paths.jobs_db)
    back = store.release_orphans()
    if back:
        log.info("requeued after a restart: %s", ", ".join(back))
    app = create_app(paths, token)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=access_log, lifespan="off"
        )
    )
    sup = Supervisor(paths, runner_command or [], runners if runner_command else 0, runner_env)

    def when_up() -> None:
        while not server.started:
            if sup.stopping.wait(0.1):
                return
        sock = server.servers[0].sockets[0].getsockname()
        url = f"http://{_url_host(host)}:{sock[1]}"
        tmp = paths.url.with_suffix(".partial")
        tmp.write_text(url + "\n")
        os.replace(tmp, paths.url)
        log.info("voxfit job API on %s (token in %s), %d runner(s)", url, paths.token, sup.n)
        sup.watch()

    thread = threading.Thread(target=when_up, name="supervisor", daemon=True)
    thread.start()
    # uvicorn shuts down on SIGINT/SIGTERM and then raises the signal again under the
    # handlers it found; SIGTERM's default would end this process before the runners are
    # stopped, so both become an exception that runs the cleanup below
    before = signal.signal(signal.SIGTERM, _stop_signal)
    try:
        server.run()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        sup.stop()
        thread.join(timeout=5)
        paths.url.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, before)
        log.info("voxfit job API stopped")


class _Stop(Exception):
    pass


def _stop_signal(_signum: int, _frame: Any) -> None:
    raise _Stop


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
