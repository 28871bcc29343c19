"""Does voxfit scale out: workers on PostgreSQL, a device farm, the job API, signed bundles?

On the tiny preset (tiny corpus, tiny tdnn, a 2x2x2-choice space, untuned TVM measured
locally for every trial: no cost model), with a real PostgreSQL server started in a
temporary folder and a loopback TVM RPC farm:

- **workers**: one study run by 3 ``voxfit worker`` processes; once a trial has completed,
  a worker is killed with SIGKILL while it runs a trial. Reports ``trials_lost`` (logical
  trials -- a trial and its retry -- that neither completed nor failed with a reason),
  ``trials_duplicated`` (completed more than once), whether the killed trial was retried,
  the measurement files (one per measured trial) and the audit log's chain;
- **throughput**: the same kind of study with 1 and then 2 workers (one torch thread each;
  TVM measures with the profile's 2 threads): trials per hour over the span from the first
  trial's start to the last trial's end (worker start-up excluded; ``*_wall_s`` includes it);
- **farm**: 2 RPC servers on 127.0.0.1 under one key, two clients measuring at once, one
  server killed mid-measurement: ``measurements_failed`` (and how many needed a retry);
- **tamper**: a bundle of the killed study exported and signed; one changed byte of a copy
  and one edited entry of a copy of the audit log must both be caught;
- **api**: ``benchmarks/_scale_api.py``'s ``api_job`` (a job over HTTP, its bundles verified
  with the service's key), when that file is present.

Each part's figures are kept in ``<work>/scale/partial.json`` as it finishes: a rerun skips
finished parts (``--fresh`` starts over). Writes ``benchmarks/results/scale.json``.

    python benchmarks/scale.py --work /tmp/voxfit-scale
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from rich.console import Console

from _common import parser, provenance, write_result
from voxfit.search import (
    SearchContext,
    SearchSettings,
    count_budget,
    logical_trials,
    prepare_study,
    record_budget,
    record_of,
    verify_log,
)
from voxfit.search._postgres import PostgresServer, local_postgres

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
schema_version: 1
name: scale-tiny
model: tdnn
pruning:
  groups: {stream: [0.5, 1.0]}
quantization:
  weight_bits: {"*": [8, 32]}
adapters:
  slots: {"blocks.*": [0, 8]}
"""
console = Console()


def device_yaml(tuning: Path) -> dict[str, Any]:
    """The shipped 2-core AVX2 profile, untuned (fits a 1 s budget), no cost model."""
    prof = yaml.safe_load((ROOT / "hw_profiles" / "x86-avx2-2core.yaml").read_text())
    prof["name"] = "scale-cpu"
    prof["inputs"] = prof["inputs"][:1]
    prof["latency_budget_ms"] = 1000.0
    prof["measurement"].update(repeats=5, min_repeat_ms=10, warmup=1)
    prof["tuning"].update(trials_per_task=0, database_dir=str(tuning))
    return dict(prof)


class Bench:
    """The shared setup: work folder, tiny context, profile, space, PostgreSQL."""

    def __init__(self, work: Path, pg: PostgresServer, grace_s: int, heartbeat_s: int) -> None:
        from voxfit.hw_profiles import profile_from_dict
        from voxfit.spaces import space_from_dict

        self.work, self.pg = work, pg
        self.grace_s, self.heartbeat_s = grace_s, heartbeat_s
        self.ctx = SearchContext.prepare(preset="tiny", work=work)
        self.profile = profile_from_dict(device_yaml(work / "no-shipped-tuning"), "scale-cpu")
        self.space = space_from_dict(yaml.safe_load(SPACE)).bind(self.ctx.base.structure())  # type: ignore[operator]
        self.no_cost_models = work / "no-cost-models"
        self.no_cost_models.mkdir(exist_ok=True)

    def study(self, name: str, budget: int) -> optuna.Study:
        s = SearchSettings(
            profile=self.profile,
            space=self.space,
            storage=self.pg.url,
            study_name=name,
            n_trials=budget,
            work=self.work,
            cost_models_dir=self.no_cost_models,
        )
        study = prepare_study(s, self.ctx)
        record_budget(study, budget)
        return study

    def worker(self, name: str, i: int) -> subprocess.Popen[bytes]:
        (self.work / "logs").mkdir(exist_ok=True)
        log = (self.work / "logs" / f"{name}-worker{i}.log").open("ab")
        cmd = [sys.executable, "-m", "voxfit.cli", "worker", "--study", name,
               "--storage", self.pg.url, "--work", str(self.work),
               "--cost-models", str(self.no_cost_models), "--threads", "1",
               "--grace", str(self.grace_s), "--heartbeat", str(self.heartbeat_s)]  # fmt: skip
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            codes.append(p.wait())
    return codes


def _outcome(study: optuna.Study) -> dict[str, int]:
    """Logical trials by outcome: completed, failed with a reason (the objective's error),
    lost (the last attempt died, or is still running or queued)."""
    out = {"completed": 0, "failed": 0, "lost": 0}
    for group in logical_trials(study.get_trials(deepcopy=False)).values():
        last = group[-1]
        if last.state == TrialState.COMPLETE:
            out["completed"] += 1
        elif last.state == TrialState.FAIL and record_of(last).failure:
            out["failed"] += 1
        else:
            out["lost"] += 1
    return out


def _running_of(study: optuna.Study, pid: int) -> list[int]:
    """Trials RUNNING in the worker with process id ``pid``."""
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if str(t.user_attrs.get("worker", "")).endswith(f":{pid}")
    ]


def workers_part(b: Bench, budget: int) -> dict[str, Any]:
    """3 workers, one killed -9 mid-trial once a trial has completed."""
    name = f"scale-killed-{time.strftime('%H%M%S')}"
    study = b.study(name, budget)
    started = time.time()
    procs = [b.worker(name, i) for i in range(3)]
    killed: dict[str, Any] = {}
    deadline = time.monotonic() + 1200
    while not killed and time.monotonic() < deadline:
        time.sleep(0.2)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            continue
        for p in procs:
            if p.poll() is None and _running_of(study, p.pid):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                # the trial it was running when it died: still RUNNING, its heartbeat stopped
                (trial,) = _running_of(study, p.pid) or [None]
                killed = {"pid": p.pid, "trial": trial}
                console.print(f"killed worker {p.pid} (-9) during trial {trial}")
                break
    codes = _wait(procs, 1500)
    c = count_budget(study, budget)
    outcome = _outcome(study)
    retry = [
        t
        for t in study.get_trials(deepcopy=False)
        if killed and t.system_attrs.get("failed_trial") == killed["trial"]
    ]
    measured = [
        record_of(t)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if record_of(t).latency.source == "measured"
    ]
    store = b.work / "measurements" / b.profile.name
    audit = verify_log(b.work / "audit" / f"{name}.jsonl")
    return {
        "study": name,
        "workers": 3,
        "budget": budget,
        "worker_exit_codes": codes,
        "killed_worker_trial": killed.get("trial"),
        "killed_trial_retried": bool(retry) and retry[-1].state == TrialState.COMPLETE,
        "trials_completed": outcome["completed"],
        "trials_failed": outcome["failed"],
        "trials_lost": outcome["lost"],
        "trials_duplicated": c.duplicated,
        "trials_over_budget_pruned": len(
            [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("over_budget")]
        ),
        "measured_trials": len(measured),
        # files this study's workers wrote (the store is shared by every study in work)
        "measurement_files": sum(f.stat().st_mtime >= started for f in store.glob("*.json"))
        if store.exists()
        else 0,
        "audit_log_intact": audit.ok,
        "audit_entries": audit.entries,
        "heartbeat_s": b.heartbeat_s,
        "grace_s": b.grace_s,
    }


def _span_h(study: optuna.Study) -> float:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    start = min(t.datetime_start for t in trials if t.datetime_start)
    end = max(t.datetime_complete for t in trials if t.datetime_complete)
    return (end - start).total_seconds() / 3600


def throughput_part(b: Bench, n_workers: int, budget: int) -> dict[str, Any]:
    name = f"scale-throughput-{n_workers}-{time.strftime('%H%M%S')}"
    study = b.study(name, budget)
    t0 = time.monotonic()
    codes = _wait([b.worker(name, i) for i in range(n_workers)], 1500)
    wall = time.monotonic() - t0
    c = count_budget(study, budget)
    return {
        f"trials_per_hour_{n_workers}_worker{'s' if n_workers > 1 else ''}": round(
            c.done / _span_h(study), 1
        ),
        f"throughput_{n_workers}_trials": c.done,
        f"throughput_{n_workers}_wall_s": round(wall, 1),
        f"throughput_{n_workers}_exit_codes": codes,
    }


def farm_part(b: Bench, per_client: int) -> dict[str, Any]:
    """2 servers, 2 clients measuring at once; one server killed mid-measurement."""
    from voxfit.compile import TvmWorker, compile_model
    from voxfit.hw_profiles import RpcSpec
    from voxfit.latency._farm import local_farm

    results: list[dict[str, Any]] = []
    with local_farm("scale-farm", servers=2, log_dir=b.work / "farm") as farm:
        rpc = RpcSpec(farm.host, farm.tracker_port, farm.key, connect_timeout_s=30)
        p = replace(
            b.profile,
            cores=1,
            measurement=replace(b.profile.measurement, method="rpc", rpc=rpc),
        )
        with TvmWorker(1) as w0:
            before = w0.call("tracker_summary", timeout_s=60, host=farm.host,
                             port=farm.tracker_port)  # fmt: skip
            (c,) = compile_model(b.ctx.base, p, w0, b.work / "farm-lib",
                                 tuning_dir=b.work / "farm-tuning")  # fmt: skip
        if not c.ok:
            return {"farm_error": c.error}
        req = {
            "lib": str(c.lib), "frames": c.frames, "device": "cpu",
            "measurement": {"warmup": 1, "repeats": 20, "min_repeat_ms": 100},
            "rpc": {**asdict(rpc), "attempts": 3},
        }  # fmt: skip
        lock = threading.Lock()

        def client() -> None:
            with TvmWorker(1) as w:
                for _ in range(per_client):
                    r = w.call("measure_rpc", timeout_s=600, **req)
                    with lock:
                        results.append(r)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        killed = None
        deadline = time.monotonic() + 600
        while killed is None and time.monotonic() < deadline:
            serving = farm.serving()
            if results and serving:
                time.sleep(0.5)
                replace(farm, pids=serving[:1]).kill()
                killed = serving[0]
                console.print(f"killed RPC server {killed} (-9) mid-measurement")
            time.sleep(0.2)
        for t in threads:
            t.join(900)
        with TvmWorker(1) as w0:
            after = w0.call("tracker_summary", timeout_s=60, host=farm.host,
                            port=farm.tracker_port)  # fmt: skip
    ok = [r for r in results if "error" not in r]
    return {
        "farm_servers": 2,
        "farm_clients": 2,
        "farm_server_killed": killed is not None,
        "measurements": len(results),
        "measurements_failed": len(results) - len(ok),
        "measurements_retried": sum(int(r.get("attempts", 1)) > 1 for r in ok),
        "measurement_errors": [r["error"] for r in results if "error" in r],
        "farm_servers_before": len(before.get("servers", [])),
        "farm_servers_after": len(after.get("servers", [])),
        "farm_median_ms": sorted(r["median_ms"] for r in ok)[len(ok) // 2] if ok else None,
    }


def tamper_part(b: Bench, name: str) -> dict[str, Any]:
    """A signed bundle of the killed study's fp32 baseline; a byte and a log entry changed."""
    from voxfit.compile import TvmWorker, default_tuning_dir
    from voxfit.search import (
        AuditLog,
        export_bundle,
        keygen,
        load_private_key,
        load_study,
        verify_bundle,
    )

    keys = b.work / "keys"
    if not (keys / "signing.key").exists():
        keygen(keys)
    study = load_study(b.pg.url, name)
    (trial,) = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("baseline") == "int8"
    ]
    out = b.work / "bundles"
    shutil.rmtree(out, ignore_errors=True)
    with TvmWorker(b.profile.cores) as w:
        bundle = export_bundle(
            b.ctx, study, trial, b.profile, out, cost_models_dir=b.no_cost_models,
            tuning_dir=default_tuning_dir(b.work, b.profile), worker=w,
            audit=AuditLog.of_study(b.work, name),
            sign_key=load_private_key(keys / "signing.key"),
        )  # fmt: skip
    pub = keys / "signing.pub"
    intact = verify_bundle(bundle, key=pub, run_models=False)
    copy = b.work / "tampered-bundle"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    target = max((p for p in copy.rglob("*") if p.is_file() and p.name != "manifest.sig"),
                 key=lambda p: p.stat().st_size)  # fmt: skip
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    byte_problems = verify_bundle(copy, key=pub, run_models=False)
    log = b.work / "audit" / f"{name}.jsonl"
    log_ok = verify_log(log)
    lines = log.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["data"] = {**entry.get("data", {}), "speakers": ["someone-else"]}
    lines[1] = json.dumps(entry)
    edited = b.work / "tampered-audit.jsonl"
    edited.write_text("\n".join(lines) + "\n")
    log_check = verify_log(edited)
    return {
        "tamper_detected": not intact and bool(byte_problems) and log_ok.ok and not log_check.ok,
        "signed_bundle_verifies": not intact,
        "changed_byte_in": str(target.relative_to(copy)),
        "changed_byte_problem": byte_problems[0] if byte_problems else None,
        "audit_log_intact": log_ok.ok,
        "edited_log_entry_problem": log_check.problem,
    }


def api_part(tmp: Path, corpus: Path) -> dict[str, Any]:
    try:
        from _scale_api import api_job
    except ImportError as e:
        return {"api_job_completed": None, "api_note": f"benchmarks/_scale_api.py absent: {e}"}
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return dict(api_job(tmp, corpus=corpus))


def main(argv: list[str] | None = None) -> int:
    ap = parser("scale", __doc__)
    ap.add_argument("--budget", type=int, default=9, help="trials of the 3-worker study")
    ap.add_argument("--throughput-trials", type=int, default=8)
    ap.add_argument("--farm-measurements", type=int, default=4, help="per client")
    ap.add_argument("--grace", type=int, default=20, help="heartbeat grace, s")
    ap.add_argument("--heartbeat", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="forget finished parts")
    args = ap.parse_args(argv)
    work = args.work.resolve() / "scale"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    partial_path = work / "partial.json"
    partial: dict[str, Any] = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    load = os.getloadavg()
    t0 = time.monotonic()
    with local_postgres(work / "postgres") as pg:
        # one server folder per run: the studies of a resumed run are still there
        b = Bench(work, pg, args.grace, args.heartbeat)

        def part(key: str, run: Callable[[], dict[str, Any]]) -> None:
            if key in partial:
                console.print(f"{key}: done in an earlier run")
                return
            ts = time.monotonic()
            console.rule(key)
            partial[key] = {**run(), f"{key}_s": round(time.monotonic() - ts, 1)}
            partial_path.write_text(json.dumps(partial, indent=2, default=str))
            console.print(partial[key])

        part("workers", lambda: workers_part(b, args.budget))
        part("throughput_1", lambda: throughput_part(b, 1, args.throughput_trials))
        part("throughput_2", lambda: throughput_part(b, 2, args.throughput_trials))
        part("farm", lambda: farm_part(b, args.farm_measurements))
        part("tamper", lambda: tamper_part(b, partial["workers"]["study"]))
        part("api", lambda: api_part(work / "api", b.ctx.manifest.source.parent))
        version = pg.version
    flat: dict[str, Any] = {}
    for figures in partial.values():
        flat.update(figures)
    result = {
        "trials_lost": flat.get("trials_lost"),
        "trials_duplicated": flat.get("trials_duplicated"),
        "postgres_version": version,
        "measurements_failed": flat.get("measurements_failed"),
        "trials_per_hour_1_worker": flat.get("trials_per_hour_1_worker"),
        "trials_per_hour_2_workers": flat.get("trials_per_hour_2_workers"),
        "tamper_detected": flat.get("tamper_detected"),
        "api_job_completed": flat.get("api_job_completed"),
        "parts": partial,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load],
            "note": "2 shared cores; other jobs may run beside the benchmark",
        },
        "seconds": round(time.monotonic() - t0, 1),
        "provenance": provenance({"optuna": optuna.__version__}, checkpoint=str(b.ctx.checkpoint)),
    }
    write_result(args.out, result, default=str)
    console.print({k: v for k, v in result.items() if k not in ("parts", "provenance")})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
