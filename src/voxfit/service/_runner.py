"""Job runners: processes that claim queued jobs and run them through ``voxfit.search``.

One job, in the runner process: the corpus and base model of its preset (cached under
``<work>``, as for ``voxfit search``), the search with the job's budget into the service's
Optuna storage (study name = job id; a requeued job resumes its study), ``front.json`` and
``report.html``, then one bundle per front trial, signed with the service's key (each export
an entry of the study's audit log), and the job marked succeeded. A user error
(:class:`~voxfit.errors.VoxfitError`) fails the job with its one line; anything else fails it
with the exception's first line (the traceback goes to the runner's log).

A heartbeat thread renews the job's claim every few seconds and copies the study's progress
(finished trials, the front so far) into the store and the job folder. SIGTERM or Ctrl-C
puts the running job back in the queue (not counted as an attempt) and ends the runner.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxfit.errors import VoxfitError
from voxfit.service._paths import ServicePaths, ensure_key
from voxfit.service._spec import MAX_TRIALS
from voxfit.service._store import Job, JobStore, one_line, runner_id

log = logging.getLogger(__name__)
HEARTBEAT_S = 5.0


class RunnerStopped(BaseException):
    """SIGTERM: stop now and requeue (a BaseException, so a trial's ``except Exception``
    and Optuna's ``catch`` do not swallow it)."""


@dataclass(frozen=True)
class RunnerSettings:
    """What every job of one service shares: its folder, Optuna storage, cost models."""

    paths: ServicePaths
    storage: str
    cost_models: Path = Path("cost_models")
    poll_s: float = 2.0
    heartbeat_s: float = HEARTBEAT_S


def redact(url: str) -> str:
    """A storage URL without its password (``postgresql://u:***@host/db``)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=str))
    os.replace(tmp, path)


def _nan_to_none(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows
    ]


class _Heartbeat(threading.Thread):
    """Renews the claim every ``every_s``; while searching, copies progress and the front."""

    def __init__(self, store: JobStore, job: Job, me: str, s: RunnerSettings) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.store, self.job, self.me, self.s = store, job, me, s
        self.ours = True
        self.searching = False
        self._phase: str | None = None
        self._done = threading.Event()
        self._seen = -1
        self._study: Any = None

    def phase(self, name: str) -> None:
        self._phase = name
        self.searching = name == "searching"
        self._beat()

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)

    def run(self) -> None:
        while not self._done.wait(self.s.heartbeat_s):
            try:
                self._beat()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried, never fatal
                log.warning("job %s: heartbeat failed: %s", self.job.id, e)

    def _beat(self) -> None:
        n = self._progress() if self.searching else None
        ok = self.store.beat(self.job.id, self.me, phase=self._phase, trials_finished=n)
        if not ok and self.ours:
            log.error("job %s is no longer this runner's (requeued as stale)", self.job.id)
        self.ours = ok

    def _progress(self) -> int | None:
        """Finished trials of the job's study; the front so far into ``front.json``."""
        from voxfit.search import load_study, records

        if self._study is None:  # opened once: each open makes a storage engine
            try:
                self._study = load_study(self.s.storage, self.job.id)
            except VoxfitError:
                return None  # the study is being created
        st = self._study
        n = sum(r.state in ("COMPLETE", "FAIL") for r in records(st))
        if n != self._seen:
            self._seen = n
            write_json(self.s.paths.job_dir(self.job.id) / "front.json", _front_rows(st))
        return n


def _front_rows(study: Any) -> list[dict[str, Any]]:
    from voxfit.search import front_table

    rows = _nan_to_none(front_table(study))
    for r in rows:
        r["bundle"] = f"trial-{r['trial']}"
    return rows


def run_job(job: Job, s: RunnerSettings, store: JobStore, me: str) -> str | None:
    """Run ``job`` (claimed by runner ``me``) to its end; returns its error (None = done)."""
    beat = _Heartbeat(store, job, me, s)
    beat.start()
    bundles, error = 0, None
    t0 = time.monotonic()
    try:
        bundles = _execute(job, s, beat)
    except Exception as e:
        if STOPPING.is_set():
            # the stop was raised inside code that turned it into another error (an import
            # it interrupted, a library's bare except): the stop, not the job, ended it
            raise RunnerStopped(f"stopped, surfacing as {type(e).__name__}") from e
        if isinstance(e, VoxfitError):
            error = one_line(str(e))
        else:
            log.exception("job %s failed", job.id)
            error = one_line(f"{type(e).__name__}: {e}")
    finally:
        beat.stop()
    if beat.ours:
        store.finish(job.id, me, error=error, bundles=bundles)
    took = time.monotonic() - t0
    if error:
        log.warning("job %s failed after %.0f s: %s", job.id, took, error)
    else:
        log.info("job %s done in %.0f s: %d bundle(s)", job.id, took, bundles)
    return error


def _execute(job: Job, s: RunnerSettings, beat: _Heartbeat) -> int:
    from voxfit.compile import TvmWorker, default_tuning_dir
    from voxfit.search import (
        AuditLog,
        SearchContext,
        SearchSettings,
        export_bundle,
        load_private_key,
        records,
        run_search,
        write_report,
    )

    spec = job.spec
    prof, space = spec.profile(), spec.space()
    key = load_private_key(s.paths.key)
    work = s.paths.work
    out = s.paths.job_dir(job.id)
    out.mkdir(parents=True, exist_ok=True)
    beat.phase("preparing")  # corpus, features, base model: cached under work
    ctx = SearchContext.prepare(preset=spec.preset, model=space.model, work=work)
    settings = SearchSettings(
        profile=prof,
        space=space.bind(ctx.base.structure()),  # type: ignore[operator]
        storage=s.storage,
        study_name=job.id,
        n_trials=spec.trials if spec.trials is not None else MAX_TRIALS,
        timeout_s=spec.timeout_s,
        sampler=spec.sampler,
        seed=spec.seed,
        work=work,
        cost_models_dir=s.cost_models,
    )
    beat.phase("searching")
    study = run_search(settings, ctx)
    recs = records(study)
    beat.searching = False
    store_n = sum(r.state in ("COMPLETE", "FAIL") for r in recs)
    beat.store.beat(job.id, beat.me, phase="report", trials_finished=store_n)
    rows = _front_rows(study)
    write_json(out / "front.json", rows)
    write_report(study, out / "report.html")
    if not rows:
        failures = [r.failure for r in recs if r.failure]
        last = f"; last failure: {failures[-1]}" if failures else ""
        raise VoxfitError(f"no feasible trial completed in {len(recs)} trial(s){last}")
    if not beat.ours:
        raise VoxfitError("job taken over by another runner (this one missed its heartbeats)")
    beat.phase("exporting")
    partial = out / "bundles.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a requeued job's half export
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    with TvmWorker(prof.cores) as w:
        for r in rows:
            export_bundle(
                ctx,
                study,
                by_number[r["trial"]],
                prof,
                partial,
                cost_models_dir=s.cost_models,
                tuning_dir=default_tuning_dir(work, prof),
                worker=w,
                audit=AuditLog.of_study(work, job.id),
                sign_key=key,
            )
    shutil.rmtree(out / "bundles", ignore_errors=True)
    os.replace(partial, out / "bundles")
    return len(rows)


#: set once a signal asked this runner to stop
STOPPING = threading.Event()


def _raise_stopped(signum: int, _frame: Any) -> None:
    STOPPING.set()
    raise RunnerStopped(signal.Signals(signum).name)


def run_jobs(s: RunnerSettings, *, until_empty: bool = False) -> int:
    """Claim and run queued jobs until stopped (SIGTERM/Ctrl-C), or with ``until_empty``
    until the queue is empty; returns how many jobs this runner ran."""
    store = JobStore(s.paths.jobs_db)
    ensure_key(s.paths)
    me = runner_id()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)
    log.info("runner %s: jobs of %s, studies in %s", me, s.paths.jobs_db, redact(s.storage))
    n = 0
    try:
        while True:
            job = store.claim(me)
            if job is None:
                if until_empty:
                    return n
                time.sleep(s.poll_s)
                continue
            log.info("runner %s: job %s (attempt %d)", me, job.id, job.attempts)
            run_job(job, s, store, me)
            n += 1
    except (RunnerStopped, KeyboardInterrupt) as e:
        back = store.release(
            me, f"runner {me} stopped ({e or 'interrupted'})", count_attempt=False
        )
        if back:
            log.info("runner %s stopped; requeued %s", me, ", ".join(back))
        return n
