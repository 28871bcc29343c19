"""A search worker with a stub objective (the worker logic on a real storage, no model):
``python -m tests.search._stub_worker URL STUDY BUDGET MARKERS SLEEP_S GRACE_S HEARTBEAT_S``.

Each trial writes ``MARKERS/<pid>-<number>.start`` before it sleeps ``SLEEP_S`` and
``.done`` after; the value is the trial's first parameter. Prints the worker's report as
JSON on its last line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import optuna

from voxfit.search import open_storage, work_until_budget


def main(argv: list[str]) -> int:
    url, name, budget, markers = argv[0], argv[1], int(argv[2]), Path(argv[3])
    sleep_s, grace_s, heartbeat_s = float(argv[4]), int(argv[5]), int(argv[6])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=name, storage=open_storage(url, grace_s=grace_s, heartbeat_s=heartbeat_s)
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        stem = markers / f"{os.getpid()}-{trial.number}"
        stem.with_suffix(".start").write_text(str(x))
        time.sleep(sleep_s)
        stem.with_suffix(".done").write_text(str(x))
        return x

    r = work_until_budget(study, objective, budget, poll_s=0.5)
    print(
        json.dumps(
            {
                "worker": r.worker,
                "completed": r.completed,
                "failed": r.failed,
                "retries_run": r.retries_run,
                "over_budget": r.over_budget,
                "stopped": r.stopped,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
