"""One record per trial, one feasibility rule, one front for search, report and export."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from voxfit.plan import Candidate, LayerPlan
from voxfit.search import (
    OBJECTIVES,
    AccuracyRecord,
    LatencyRecord,
    TrialRecord,
    front,
    front_table,
    load_study,
    record_of,
    records,
    study_frame,
)
from voxfit.search._study import _front

PLAN = Candidate(layers=(LayerPlan("blocks.0.conv", 8),))


def _trial(values: list[float], optuna_constraints: list[float] | None, **attrs: object):
    system = {} if optuna_constraints is None else {"constraints": optuna_constraints}
    return create_trial(
        values=values,
        distributions={},
        params={},
        user_attrs=dict(attrs),
        system_attrs=system,
        state=TrialState.COMPLETE,
    )


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    url = f"sqlite:///{tmp_path}/s.db"
    st = optuna.create_study(storage=url, study_name="mix", directions=["minimize"] * 4)
    rec = TrialRecord(number=0, state="COMPLETE", plan=PLAN, seed=3, size_mb=1.0).to_attr()
    st.add_trial(_trial([1.0, 10.0, 5.0, 1.0], [0.0, -1.0], record=rec))  # feasible, front
    st.add_trial(_trial([0.5, 9.0, 4.0, 0.5], [2.0, -1.0], record=rec))  # infeasible, dominant
    st.add_trial(_trial([2.0, 8.0, 6.0, 2.0], None, record=rec))  # unconstrained: feasible
    st.add_trial(_trial([3.0, 11.0, 7.0, 3.0], [-1.0, -1.0], record=rec))  # dominated by #0
    # an old-format trial: loose attributes, constraints as a user attr
    st.add_trial(
        _trial(
            [1.5, 12.0, 5.5, 0.9],
            None,
            plan=PLAN.to_dict(),
            seed=7,
            metrics={"dev_per": 5.5, "post_adapt_per": 12.0, "size_mb": 0.9},
            latency={"source": "measured", "measured_ms": 1.5, "objective_basis": "raw"},
            per_speaker={"s1": [30.0, 12.0]},
            constraints=[-0.5, -0.5],
        )
    )
    return load_study(url, "mix")


def test_search_report_and_export_share_one_front(study: optuna.Study) -> None:
    recs = records(study)
    assert [r.feasible for r in recs] == [True, False, True, True, True]
    expected = {0, 2, 4}  # #1 is infeasible however good, #3 is dominated by #0
    assert {r.number for r in front(recs)} == expected
    assert {r["trial"] for r in front_table(study)} == expected  # export --pareto, CLI
    f = study_frame(study)  # report and notebook
    assert set(f.loc[f["on_front"], "number"]) == expected
    assert sorted(_front(study)) == sorted(tuple(recs[n].values or ()) for n in expected)


def test_old_format_trial_reads_as_a_record(study: optuna.Study) -> None:
    old = record_of(study.trials[4])
    assert old.version == 0
    assert old.plan == PLAN
    assert old.seed == 7
    assert old.accuracy.per_speaker == {"s1": (30.0, 12.0)}
    assert old.latency.basis == "raw"
    assert old.latency.measured_ms == 1.5
    assert old.constraints == (-0.5, -0.5)
    assert old.size_mb == 0.9


def test_record_round_trips_through_the_storage(tmp_path: Path) -> None:
    rec = TrialRecord(
        number=0,
        state="COMPLETE",
        plan=PLAN,
        plan_hash=PLAN.stable_hash(),
        seed=11,
        accuracy=AccuracyRecord(dev_per=4.0, post_adapt_per=9.0, per_speaker={"a": (1.0, 2.0)}),
        latency=LatencyRecord(objective_ms=2.0, basis="reference", source="measured"),
        size_mb=1.5,
        timings={"total_s": 3.0},
    )
    st = optuna.create_study(storage=f"sqlite:///{tmp_path}/r.db", directions=["minimize"] * 4)
    st.add_trial(_trial([2.0, 9.0, 4.0, 1.5], [-1.0, -1.0], record=rec.to_attr()))
    back = record_of(st.trials[0])
    assert back.plan == rec.plan
    assert back.accuracy == rec.accuracy
    assert back.latency == rec.latency
    assert back.timings == rec.timings
    assert back.objective("size_mb") == 1.5
    assert back.complete
    assert len(OBJECTIVES) == 4


def test_spread_keeps_both_ends_and_even_steps_between() -> None:
    """`voxfit export --pareto --at-most N`: N front points evenly along it."""
    from voxfit.search import spread

    front = [{"trial": t} for t in (32, 35, 34, 27, 11, 18, 22, 3, 9, 21, 5, 26)]
    assert [r["trial"] for r in spread(front, 4)] == [32, 11, 3, 26]  # indices 0, 4, 7, 11
    assert [r["trial"] for r in spread(front, 2)] == [32, 26]
    assert [r["trial"] for r in spread(front, 1)] == [32]
    assert spread(front, 12) == front
    assert spread(front[:3], 5) == front[:3]
    with pytest.raises(ValueError, match="n: 0"):
        spread(front, 0)


def test_a_resumed_search_continues_on_the_recorded_quietest_base_scale() -> None:
    from dataclasses import replace

    from voxfit.hw_profiles import pick_local_profile
    from voxfit.latency import LatencyResult, PromotingEstimator
    from voxfit.search._study import resume_scale

    profile = pick_local_profile(Path(__file__).resolve().parents[2] / "hw_profiles")
    spec = profile.primary_input

    class _Measurer:  # a candidate at 0.5 of the base, timed in a slow minute (base 3 ms)
        def estimate(self, model: object, inputs: object = None) -> list[LatencyResult]:
            r = LatencyResult(profile.name, spec.name, spec.frames, "local", median_ms=1.5)
            return [replace(r, reference_ms=3.0, relative=0.5)]

        def close(self) -> None:
            pass

    st = optuna.create_study(directions=["minimize"] * 4)
    for base_ms, basis in ((2.4, "base"), (2.1, "base"), (1.0, "raw")):
        lat = LatencyRecord(
            objective_ms=1.0, basis=basis, source="measured", base_ms=base_ms, input=spec.name
        )
        rec = TrialRecord(number=0, state="COMPLETE", plan=PLAN, latency=lat).to_attr()
        st.add_trial(_trial([1.0, 1.0, 1.0, 1.0], None, record=rec))
    est = PromotingEstimator(profile, None, _Measurer())  # type: ignore[arg-type]
    resume_scale(st, est)
    (r,) = est.estimate(None, (spec,))  # type: ignore[arg-type]
    # on the quietest base time the earlier trials recorded on this scale (a raw one says
    # nothing of it), not this slow minute's 3 ms
    assert r.basis == "base"
    assert r.value_ms == pytest.approx(0.5 * 2.1)
