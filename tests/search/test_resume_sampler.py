"""A resumed study must not replay the first run's draws (same seed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna

from voxfit.search._study import make_sampler, reseed_on_resume


def _draws(study: optuna.Study, n: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(n):
        t = study.ask()
        x, y = t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)
        study.tell(t, [x, y])
        out.append((x, y))
    return out


def test_a_resumed_random_study_draws_new_points(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = optuna.create_study(
        storage=url, study_name="s", directions=["minimize"] * 2, sampler=make_sampler("random", 3)
    )
    reseed_on_resume(first, "random", 3)  # new study: the seed is kept
    a = _draws(first, 4)
    fresh = optuna.create_study(directions=["minimize"] * 2, sampler=make_sampler("random", 3))
    assert _draws(fresh, 4) == a  # same seed, same draws: what a naive resume replays
    shutil.copy(tmp_path / "s.db", tmp_path / "copy.db")

    def resume(db: str) -> optuna.Study:
        study = optuna.load_study(
            storage=f"sqlite:///{tmp_path}/{db}", study_name="s", sampler=make_sampler("random", 3)
        )
        reseed_on_resume(study, "random", 3)
        return study

    b = _draws(resume("s.db"), 4)
    assert not set(a) & set(b)
    # the same study resumed at the same point draws the same points (deterministic)
    assert _draws(resume("copy.db"), 4) == b
