"""Search workers on a real PostgreSQL server: the budget, killed workers, real trials.

The worker logic (budget, retries, waiting for others' trials) runs with a stub objective
in separate processes (``tests/search/_stub_worker.py``); one test runs real ``voxfit
worker`` processes on a real tiny study (latency predicted by the shipped cost model, so
no TVM build: the TVM paths are tested in tests/compile and tests/latency).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests._cli import run_voxfit
from tests._tiny import CI_TINY_SPACE
from voxfit.data import Manifest
from voxfit.search import (
    SearchContext,
    SearchSettings,
    count_budget,
    logical_trials,
    open_storage,
    prepare_study,
    record_budget,
    record_of,
    verify_log,
)
from voxfit.search._postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
GRACE_S, HEARTBEAT_S = 4, 1


def _new_study(url: str, name: str, budget: int) -> optuna.Study:
    study = optuna.create_study(storage=open_storage(url), study_name=name)
    record_budget(study, budget)
    return study


def _stub_worker(
    url: str, name: str, budget: int, markers: Path, sleep_s: float
) -> subprocess.Popen[str]:
    markers.mkdir(exist_ok=True)
    args = [url, name, str(budget), str(markers), str(sleep_s), str(GRACE_S), str(HEARTBEAT_S)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.search._stub_worker", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _report(p: subprocess.Popen[str], timeout_s: float = 180) -> dict[str, object]:
    out, _ = p.communicate(timeout=timeout_s)
    assert p.returncode == 0, out[-3000:]
    report: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return report


def test_the_budget_counts_logical_trials(tmp_path: Path) -> None:
    """A retried trial counts once (its latest attempt), queued and running trials count
    as in flight, a trial stopped early as done, over-budget trials not at all."""
    study = _new_study(f"sqlite:///{tmp_path}/s.db", "count", 5)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def add(state: TrialState, **kw: object) -> None:
        values = [0.5] if state == TrialState.COMPLETE else None
        study.add_trial(
            optuna.create_trial(state=state, params={"x": 0.5}, distributions=dist, values=values,
                                **kw)  # type: ignore[arg-type]
        )  # fmt: skip

    add(TrialState.COMPLETE)  # 0
    add(TrialState.FAIL)  # 1: killed, retried as 2
    add(TrialState.COMPLETE, system_attrs={"failed_trial": 1, "retry_history": [1]})  # 2
    add(TrialState.RUNNING)  # 3
    add(TrialState.WAITING)  # 4
    add(TrialState.PRUNED, user_attrs={"over_budget": True})  # 5
    add(TrialState.PRUNED, user_attrs={"record": {"stopped": "dominated"}})  # 6: stopped early
    assert sorted(logical_trials(study.get_trials())) == [0, 1, 3, 4, 6]
    c = count_budget(study, 5)
    assert (c.done, c.running, c.waiting, c.complete, c.retried, c.duplicated) == (
        3,
        1,
        1,
        2,
        1,
        0,
    )
    assert c.may_start  # a queued trial is waiting
    assert not c.met
    assert record_budget(study, None) == 5


def test_two_workers_finish_one_study_on_postgresql(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    budget = 8
    study = _new_study(postgres.url, "two-workers", budget)
    procs = [
        _stub_worker(postgres.url, "two-workers", budget, tmp_path / "m", 0.5) for _ in range(2)
    ]
    reports = [_report(p) for p in procs]
    c = count_budget(study, budget)
    assert c.met
    assert (c.done, c.complete, c.duplicated, c.retried) == (budget, budget, 0, 0)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == budget  # no overshoot: a fresh trial past the budget is pruned
    assert len({t.number for t in complete}) == budget
    assert all(r["stopped"] == "budget met" for r in reports)
    assert all(r["completed"] for r in reports), reports  # both took part
    ran = sorted(n for r in reports for n in r["completed"])  # type: ignore[attr-defined]
    assert ran == sorted(t.number for t in complete)  # every trial ran in exactly one worker


def test_a_worker_killed_mid_trial_has_its_trial_retried_once(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    budget, name, markers = 4, "killed-worker", tmp_path / "m"
    study = _new_study(postgres.url, name, budget)
    victim = _stub_worker(postgres.url, name, budget, markers, 3.0)
    deadline = time.monotonic() + 60
    while not list(markers.glob(f"{victim.pid}-*.start")):
        assert time.monotonic() < deadline, "the worker never started a trial"
        assert victim.poll() is None, victim.communicate()[0][-2000:]
        time.sleep(0.1)
    survivor = _stub_worker(postgres.url, name, budget, markers, 3.0)
    time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)  # mid-trial: its heartbeat stops
    victim.wait()
    (started,) = markers.glob(f"{victim.pid}-*.start")
    killed = int(started.stem.split("-")[1])
    assert not started.with_suffix(".done").exists()
    report = _report(survivor)

    c = count_budget(study, budget)
    assert c.met
    assert (c.done, c.complete, c.retried, c.duplicated) == (budget, budget, 1, 0)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed].state == TrialState.FAIL  # failed by the survivor, after the grace
    (retry,) = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == trials[killed].params  # the same candidate, run again once
    assert report["retries_run"] == [retry.number]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == budget


def test_worker_errors_are_one_line(
    postgres: PostgresServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = "postgresql://voxfit:secret@127.0.0.1:1/voxfit"
    code, _, err = run_voxfit(["worker", "--study", "s", "--storage", bad], capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "postgresql://voxfit:***@127.0.0.1:1/voxfit" in err
    assert "secret" not in err
    args = ["worker", "--study", "nope", "--storage", postgres.url]
    code, _, err = run_voxfit(args, capsys, monkeypatch)
    assert code == 2
    assert "no study 'nope'" in err
    _new_study(postgres.url, "no-budget", 1).set_user_attr("n_trials", None)
    args = ["worker", "--study", "no-budget", "--storage", postgres.url]
    code, _, err = run_voxfit(args, capsys, monkeypatch)
    assert code == 2
    assert "records no trial budget" in err


SPACE = CI_TINY_SPACE


@pytest.mark.slow
def test_voxfit_workers_finish_a_real_study(
    postgres: PostgresServer, tiny_manifest: Manifest, tmp_path: Path
) -> None:
    """Two ``voxfit worker`` processes join a study made by prepare_study and read
    everything from it; the baselines and one sampled trial are each run once."""
    from voxfit.hw_profiles import load_profile
    from voxfit.spaces import space_from_dict

    work = tmp_path / "work"
    ctx = SearchContext.prepare(preset="tiny", work=work, manifest=tiny_manifest.source)
    p = load_profile(ROOT / "hw_profiles" / "x86-avx2-2core.yaml")
    p = replace(p, inputs=p.inputs[:1], measurement=replace(p.measurement, method="predicted"))
    space = space_from_dict(yaml.safe_load(SPACE)).bind(ctx.base.structure())  # type: ignore[operator]
    s = SearchSettings(p, space, postgres.url, "real", n_trials=4, work=work,
                       cost_models_dir=ROOT / "cost_models")  # fmt: skip
    study = prepare_study(s, ctx)
    record_budget(study, 4)
    cmd = [sys.executable, "-m", "voxfit.cli", "worker", "--study", "real",
           "--storage", postgres.url, "--work", str(work),
           "--cost-models", str(ROOT / "cost_models"), "--threads", "1"]  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [q.communicate(timeout=600)[0] for q in procs]
    for q, out in zip(procs, outs, strict=True):
        assert q.returncode == 0, out[-3000:]
        assert "(budget met)" in out
    c = count_budget(study, 4)
    assert (c.done, c.complete, c.duplicated) == (4, 4, 0)
    recs = [record_of(t) for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(r.baseline for r in recs) == ["", "fp32", "int8", "prune50"]
    assert all(r.latency.source == "predicted" for r in recs)
    workers = {t.user_attrs["worker"] for t in study.get_trials()}
    assert len(workers) <= 2
    check = verify_log(work / "audit" / "real.jsonl")
    assert check.ok, check
    events = [
        json.loads(x)["event"] for x in (work / "audit" / "real.jsonl").read_text().splitlines()
    ]
    assert events.count("trial_completed") == 4
