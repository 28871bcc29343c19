"""The job store: one SQLite file (stdlib ``sqlite3``) under ``<work>/service/``.

Lifecycle of a job: ``queued`` (recorded by the API) -> ``running`` (claimed by one runner,
atomically: ``BEGIN IMMEDIATE`` serializes claimers, so two runners never take the same job)
-> ``succeeded`` or ``failed`` (with a one-line ``error``). A running job carries its
runner's id (``host:pid``) and a heartbeat the runner renews every few seconds. A job whose
runner is gone -- its process exited (the supervisor of ``voxfit serve`` sees it at once) or
its heartbeat is older than ``stale_s`` (a runner on another host, or one nobody supervises)
-- is requeued, and failed with the reason once it has been claimed :data:`MAX_ATTEMPTS`
times: never left ``running`` forever, never lost. The study of a requeued job resumes in
the Optuna storage (its completed trials are kept; see ``voxfit.search.run_search``).

The file is the whole state: a restarted service finds every job where it was.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from voxfit.service._spec import JobSpec

JobState = Literal["queued", "running", "succeeded", "failed"]
STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed")
MAX_ATTEMPTS = 2  # a job whose runner died twice is failed, not retried forever
# no heartbeat for this long: the runner is gone. Only for runners of other hosts: a dead
# runner of this host is found by its pid at once (release_orphans). Generous, because a
# heartbeat thread waits for the GIL, which a long native call may hold.
STALE_S = 300.0
_SCHEMA = 1

_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    profile TEXT NOT NULL,
    space TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    runner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    phase TEXT NOT NULL DEFAULT '',
    trials_finished INTEGER NOT NULL DEFAULT 0,
    bundles INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    note TEXT
)
"""


@dataclass(frozen=True, slots=True)
class Job:
    """One row of the store (times are Unix seconds)."""

    id: str
    state: JobState
    spec: JobSpec
    profile: str
    space: str
    created: float
    started: float | None = None
    finished: float | None = None
    runner: str | None = None
    heartbeat: float | None = None
    attempts: int = 0
    phase: str = ""
    trials_finished: int = 0
    bundles: int = 0
    error: str | None = None
    note: str | None = None  # why it was requeued, when it was

    def view(self) -> dict[str, Any]:
        """The job as the API shows it (the YAML texts left out: GET the job's spec)."""
        s = self.spec
        now = time.time()
        if s.trials is not None:
            fraction = min(1.0, self.trials_finished / s.trials)
        elif s.timeout_s and self.started is not None:
            end = self.finished or now
            fraction = min(1.0, (end - self.started) / s.timeout_s)
        else:
            fraction = 0.0
        if self.state == "succeeded":
            fraction = 1.0
        return {
            "id": self.id,
            "state": self.state,
            "phase": self.phase,
            "profile": self.profile,
            "space": self.space,
            "preset": s.preset,
            "budget": {"trials": s.trials, "timeout_s": s.timeout_s},
            "progress": {
                "trials_finished": self.trials_finished,
                "trials_budget": s.trials,
                "fraction": round(fraction, 4),
            },
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "runner": self.runner,
            "attempts": self.attempts,
            "bundles": self.bundles,
            "error": self.error,
            "note": self.note,
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def runner_id(pid: int | None = None) -> str:
    """``host:pid`` of a runner process (this one by default)."""
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def one_line(text: str, limit: int = 500) -> str:
    """``text`` as one line of at most ``limit`` characters (a job's ``error``)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class JobStore:
    """Jobs in one SQLite file; safe for many threads and processes (a connection per call,
    WAL journal, writers serialized by SQLite's lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as c:
            c.execute(_TABLE)
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                c.execute(f"PRAGMA user_version = {_SCHEMA}")
            elif version != _SCHEMA:
                from voxfit.errors import ConfigError

                raise ConfigError(f"{self.path}: job store schema {version} (this voxfit: 1)")

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA busy_timeout=30000")
            c.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")
        finally:
            c.close()

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        d = dict(row)
        d.pop("seq")
        d["spec"] = JobSpec.from_json(d["spec"])
        return Job(**d)

    def submit(self, spec: JobSpec, profile: str, space: str) -> Job:
        """Record a new queued job (its id names its study and its folder)."""
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        with self._tx(immediate=True) as c:
            c.execute(
                "INSERT INTO jobs (id, state, spec, profile, space, created) "
                "VALUES (?, 'queued', ?, ?, ?, ?)",
                (job_id, spec.to_json(), profile, space, time.time()),
            )
        job = self.get(job_id)
        if job is None:
            raise RuntimeError(f"{self.path}: job {job_id} not found right after inserting it")
        return job

    def get(self, job_id: str) -> Job | None:
        with self._tx() as c:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row is not None else None

    def jobs(self, state: str | None = None) -> list[Job]:
        """Every job (of ``state``), oldest first."""
        with self._tx() as c:
            if state is None:
                rows = c.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
            else:
                query = "SELECT * FROM jobs WHERE state = ? ORDER BY seq"
                rows = c.execute(query, (state,)).fetchall()
        return [self._job(r) for r in rows]

    def claim(self, runner: str, stale_s: float = STALE_S) -> Job | None:
        """Take the oldest queued job for ``runner`` (after releasing the jobs of dead or
        silent runners), or None."""
        self.release_orphans()
        self.requeue_stale(stale_s)
        now = time.time()
        with self._tx(immediate=True) as c:
            row = c.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state = 'running', runner = ?, heartbeat = ?, "
                "started = COALESCE(started, ?), attempts = attempts + 1, phase = 'claimed' "
                "WHERE id = ? AND state = 'queued'",
                (runner, now, now, row["id"]),
            )
        return self.get(row["id"])

    def beat(
        self,
        job_id: str,
        runner: str,
        *,
        phase: str | None = None,
        trials_finished: int | None = None,
    ) -> bool:
        """Renew the heartbeat (and progress) of ``runner``'s job; False when the job is no
        longer this runner's (requeued as stale): the runner should stop it."""
        sets, args = ["heartbeat = ?"], [time.time()]
        if phase is not None:
            sets.append("phase = ?")
            args.append(phase)  # type: ignore[arg-type]
        if trials_finished is not None:
            sets.append("trials_finished = ?")
            args.append(trials_finished)
        with self._tx(immediate=True) as c:
            cur = c.execute(
                f"UPDATE jobs SET {', '.join(sets)} "
                "WHERE id = ? AND runner = ? AND state = 'running'",
                (*args, job_id, runner),
            )
            return cur.rowcount == 1

    def finish(
        self, job_id: str, runner: str, *, error: str | None = None, bundles: int = 0
    ) -> None:
        """Mark ``runner``'s job succeeded (``error`` None) or failed with ``error``."""
        with self._tx(immediate=True) as c:
            c.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = ?, bundles = ?, heartbeat = ?, "
                "phase = ? WHERE id = ? AND runner = ? AND state = 'running'",
                (
                    "failed" if error else "succeeded",
                    time.time(),
                    one_line(error) if error else None,
                    bundles,
                    time.time(),
                    "failed" if error else "done",
                    job_id,
                    runner,
                ),
            )

    def release(self, runner: str, reason: str, *, count_attempt: bool = True) -> list[str]:
        """The running jobs of ``runner``, whose process is gone or stopping: requeued (or
        failed after :data:`MAX_ATTEMPTS` claims) with ``reason``. ``count_attempt`` False:
        a clean stop (the service shut down), which does not use up an attempt."""
        with self._tx(immediate=True) as c:
            rows = c.execute(
                "SELECT id, attempts FROM jobs WHERE runner = ? AND state = 'running'", (runner,)
            ).fetchall()
            for r in rows:
                self._release(c, r["id"], r["attempts"], reason, count_attempt)
        return [r["id"] for r in rows]

    def release_orphans(self) -> list[str]:
        """Release running jobs whose runner was a process of this host that no longer
        exists (killed with nobody supervising it, or the service stopped hard): they need
        not wait for their heartbeat to go stale."""
        host = runner_id(0).rsplit(":", 1)[0]
        out: list[str] = []
        for job in self.jobs("running"):
            h, _, pid = (job.runner or "").rpartition(":")
            if h == host and pid.isdigit() and not _alive(int(pid)):
                out += self.release(job.runner or "", f"runner {job.runner} is gone")
        return out

    def requeue_stale(self, stale_s: float = STALE_S) -> list[str]:
        """Release every running job whose heartbeat is older than ``stale_s``."""
        limit = time.time() - stale_s
        with self._tx(immediate=True) as c:
            rows = c.execute(
                "SELECT id, attempts, runner FROM jobs WHERE state = 'running' AND heartbeat < ?",
                (limit,),
            ).fetchall()
            for r in rows:
                why = f"runner {r['runner']} sent no heartbeat for {stale_s:.0f} s"
                self._release(c, r["id"], r["attempts"], why, True)
        return [r["id"] for r in rows]

    @staticmethod
    def _release(
        c: sqlite3.Connection, job_id: str, attempts: int, reason: str, count: bool
    ) -> None:
        if count and attempts >= MAX_ATTEMPTS:
            c.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, phase = 'failed', error = ? "
                "WHERE id = ?",
                (
                    time.time(),
                    one_line(f"{reason} (attempt {attempts} of {MAX_ATTEMPTS})"),
                    job_id,
                ),
            )
        else:
            c.execute(
                "UPDATE jobs SET state = 'queued', runner = NULL, phase = 'requeued', note = ?, "
                "attempts = attempts - ? WHERE id = ?",
                (one_line(f"requeued: {reason}"), 0 if count else 1, job_id),
            )
