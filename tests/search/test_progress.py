"""A search's progress: a count when the count ends it, the time limit when the time does."""

from __future__ import annotations

from voxfit._config import OPEN_ENDED_TRIALS
from voxfit.search._study import progress_of
from voxfit.service._spec import MAX_TRIALS


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_counted_search_shows_its_count_and_no_time_note() -> None:
    total, left = progress_of(40, None)
    assert total == 40
    assert left() == ""


def test_an_open_ended_search_has_no_total_and_counts_down_its_time_limit() -> None:
    clock = Clock()
    total, left = progress_of(MAX_TRIALS, 900.0, clock)
    assert total is None  # not "12/100000"
    assert left() == "; time limit in 15.0 min"
    clock.t += 630.0
    assert left() == "; time limit in 4.5 min"
    clock.t += 10_000.0
    assert left() == "; time limit in 0.0 min"


def test_a_count_and_a_timeout_keep_the_count_as_total() -> None:
    total, left = progress_of(30, 900.0, Clock())
    assert total == 30
    assert left() == "; time limit in 15.0 min"


def test_the_service_default_count_is_the_open_ended_one() -> None:
    assert MAX_TRIALS == OPEN_ENDED_TRIALS
