"""A resumed study must not replay the first run's draws (same seed)."""

from __future__ import annotations

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


def test_a_resumed_random_study_draws_new_points(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = optuna.create_study(
        storage=url, study_name="s", directions=["minimize"] * 2, sampler=make_sampler("random", 3)
    )
    reseed_on_resume(first, "random", 3)  # new study: the seed is kept
    a = _draws(first, 4)
    fresh = optuna.create_study(directions=["minimize"] * 2, sampler=make_sampler("random", 3))
    assert _draws(fresh, 4) == a  # same seed, same draws: what a naive resume replays

    resumed = optuna.load_study(storage=url, study_name="s", sampler=make_sampler("random", 3))
    reseed_on_resume(resumed, "random", 3)
    b = _draws(resumed, 4)
    assert not set(a) & set(b)
    # and the reseeding is deterministic
    again = optuna.load_study(storage=url, study_name="s", sampler=make_sampler("random", 3))
    n = len(again.get_trials())
    again.sampler = make_sampler("random", 3 + 7919 * (n - 4))
    assert _draws(again, 4) == b
