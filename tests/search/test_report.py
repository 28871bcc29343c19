"""The review layer on a real SQLite study of synthetic trials that follow the search's
attribute contract: frame, front, figures, the HTML report and the review notebook."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from plotly.offline import get_plotlyjs

from voxfit.errors import ConfigError
from voxfit.search import (
    NOTES,
    OBJECTIVES,
    front_table,
    importance_figure,
    latency_figure,
    load_study,
    pareto_3d_figure,
    pareto_figure,
    plan_heatmap,
    plan_matrix,
    speaker_figure,
    study_frame,
    write_report,
)

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "review.ipynb"
GROUPS = ("stream", "blocks.0.hidden", "blocks.1.hidden")
LAYERS = ("blocks.0.conv", "blocks.1.conv", "head")
SLOTS = ("blocks.0", "blocks.1")
LATENCY_BUDGET_MS = 40.0
MEMORY_BUDGET_MB = 64.0
DISTRIBUTIONS = {
    "keep:stream": CategoricalDistribution([0.5, 0.75, 1.0]),
    **{f"keep:{g}": CategoricalDistribution([0.25, 0.5, 0.75, 1.0]) for g in GROUPS[1:]},
    **{f"wbits:{n}": CategoricalDistribution([4, 8, 32]) for n in LAYERS},
    **{f"abits:{n}": CategoricalDistribution([32]) for n in LAYERS},
    **{f"adapter:{s}": CategoricalDistribution([0, 8, 16, 32]) for s in SLOTS},
    "adapter_kind": CategoricalDistribution(["residual"]),
    "importance": CategoricalDistribution(["magnitude"]),
    "recovery_steps": CategoricalDistribution([0, 200]),
}
# number: (latency_ms, post_adapt_per, dev_per), baseline, predicted_ms, measured_ms,
# peak_memory_mb, plan choices (keep stream/b0/b1, wbits b0/b1/head, adapters b0/b1, steps).
# Trial 8 fails. Trial 5 dominates everything but exceeds the memory budget; 2 is dominated
# by 3, 6 by 1, 11 by 4; 3 and 10 tie (neither dominates); 4 and 9 have only predictions.
TRIALS: dict[int, tuple[Any, ...]] = {
    0: ((30.0, 15.0, 12.0), "fp32", 28.0, 30.0, 20.0, (1.0, 1.0, 1.0, 32, 32, 32, 16, 16, 0)),
    1: ((18.0, 16.0, 12.5), "int8", 17.0, 18.0, 12.0, (1.0, 1.0, 1.0, 8, 8, 8, 16, 16, 0)),
    2: ((14.0, 19.0, 14.0), "prune50", 15.0, 14.0, 10.0, (0.5, 0.5, 0.5, 32, 32, 32, 16, 16, 0)),
    3: ((12.0, 17.0, 13.0), None, 12.5, 12.0, 9.0, (0.75, 0.5, 0.75, 8, 4, 8, 8, 32, 200)),
    4: ((10.0, 22.0, 16.0), None, 10.0, None, 8.0, (0.5, 0.25, 0.5, 4, 4, 8, 0, 8, 0)),
    5: ((9.0, 14.0, 11.0), None, 9.5, 9.0, 69.0, (1.0, 0.25, 0.25, 8, 8, 32, 32, 32, 200)),
    6: ((20.0, 16.0, 12.5), None, 20.0, None, 14.0, (1.0, 0.75, 1.0, 32, 8, 32, 16, 0, 0)),
    7: ((25.0, 14.5, 12.2), None, 23.0, 25.0, 16.0, (1.0, 1.0, 0.75, 8, 32, 32, 32, 32, 0)),
    9: ((16.0, 18.0, 11.5), None, 16.0, None, 11.0, (0.75, 0.75, 0.5, 8, 8, 32, 8, 8, 200)),
    10: ((12.0, 17.0, 13.0), None, 12.0, 12.0, 9.0, (0.75, 0.5, 0.75, 8, 4, 4, 8, 32, 200)),
    11: ((11.0, 25.0, 18.0), None, 11.0, 11.0, 8.5, (0.5, 0.25, 0.25, 4, 4, 4, 0, 0, 0)),
}
# The fourth objective, size_mb: 4 MB, but trial 6 is the smallest (2 MB), which puts it on
# the front although trial 1 dominates it in the first three objectives.
SIZE_MB = {6: 2.0}
SPEAKERS = ("spk2", "spk10", "spk1")


def _values(number: int) -> tuple[float, ...]:
    return (*TRIALS[number][0], SIZE_MB.get(number, 4.0))


def _params(choices: tuple[Any, ...]) -> dict[str, Any]:
    keep, wbits, dims, steps = choices[0:3], choices[3:6], choices[6:8], choices[8]
    return {
        **{f"keep:{g}": k for g, k in zip(GROUPS, keep, strict=True)},
        **{f"wbits:{n}": b for n, b in zip(LAYERS, wbits, strict=True)},
        **{f"abits:{n}": 32 for n in LAYERS},
        **{f"adapter:{s}": d for s, d in zip(SLOTS, dims, strict=True)},
        "adapter_kind": "residual",
        "importance": "magnitude",
        "recovery_steps": steps,
    }


def _plan(params: dict[str, Any]) -> dict[str, Any]:
    """The plan dict the search records (Candidate.to_dict: only non-default entries)."""
    return {
        "schema_version": 1,
        "importance": "magnitude",
        "recovery_steps": params["recovery_steps"],
        "groups": {
            g: {"keep_ratio": params[f"keep:{g}"]} for g in GROUPS if params[f"keep:{g}"] < 1
        },
        "layers": {
            n: {"weight_bits": params[f"wbits:{n}"], "act_bits": 32}
            for n in LAYERS
            if params[f"wbits:{n}"] < 32
        },
        "adapters": {
            s: {"dim": params[f"adapter:{s}"], "kind": "residual"}
            for s in SLOTS
            if params[f"adapter:{s}"] > 0
        },
    }


def _complete_trial(number: int, spec: tuple[Any, ...]) -> optuna.trial.FrozenTrial:
    _, baseline, predicted, measured, peak_mb, choices = spec
    values = _values(number)
    params = _params(choices)
    constraints = [values[0] - LATENCY_BUDGET_MS, peak_mb - MEMORY_BUDGET_MB]
    user_attrs: dict[str, Any] = {
        "plan": _plan(params),
        "plan_hash": f"h{number:015d}",
        "metrics": {
            "dev_per": values[2],
            "post_adapt_per": values[1],
            "pre_adapt_per": values[1] + 5.0,
            "size_mb": values[3],
            "params": 2_000_000,
            "peak_memory_mb": peak_mb,
        },
        "latency": {
            "objective_ms": values[0],
            "source": "measured" if measured is not None else "predicted",
            "predicted_ms": predicted,
            "measured_ms": measured,
            "low_confidence": number == 7,
            "note": "",
            "input": "1x200x80",
            "frames": 200,
            "target": "llvm",
            "tvm_version": "0.27.0",
            "repeats": 10,
        },
        "constraints": constraints,
    }
    if baseline is not None:
        user_attrs["baseline"] = baseline
    if number % 3 != 0:  # some trials record no per-speaker results
        user_attrs["per_speaker"] = {
            s: [values[1] + 5.0 + i, values[1] - 1.0 + i] for i, s in enumerate(SPEAKERS)
        }
    return create_trial(
        state=TrialState.COMPLETE,
        values=list(values),
        params=params,
        distributions=DISTRIBUTIONS,
        user_attrs=user_attrs,
        system_attrs={"constraints": constraints},
    )


def _create_study(storage: str, name: str) -> optuna.Study:
    study = optuna.create_study(
        directions=["minimize"] * len(OBJECTIVES), storage=storage, study_name=name
    )
    study.set_user_attr(
        "profile",
        {
            "name": "x86-avx2-2core",
            "latency_budget_ms": LATENCY_BUDGET_MS,
            "memory_budget_mb": MEMORY_BUDGET_MB,
            "target": {"kind": "llvm", "num-cores": 2},
        },
    )
    study.set_user_attr("space", "tdnn-default")
    study.set_user_attr("objectives", list(OBJECTIVES))
    study.set_user_attr(
        "base",
        {
            "dev_per": 11.8,
            "post_adapt_per": 14.8,
            "pre_adapt_per": 19.0,
            "size_mb": 8.0,
            "latency_ms": 30.0,
        },
    )
    study.set_user_attr("checkpoint", "work/models/tdnn.pt")
    study.set_user_attr("versions", {"voxfit": "0.1.0", "optuna": optuna.__version__})
    return study


def _expected_front() -> set[int]:
    """Non-dominated feasible trials, by a plain double loop over TRIALS."""
    feasible = {
        n: _values(n)
        for n, s in TRIALS.items()
        if s[0][0] <= LATENCY_BUDGET_MS and s[4] <= MEMORY_BUDGET_MB
    }
    front = set()
    for n, v in feasible.items():
        dominated = False
        for m, w in feasible.items():
            pairs = list(zip(w, v, strict=True))
            if m != n and all(a <= b for a, b in pairs) and any(a < b for a, b in pairs):
                dominated = True
        if not dominated:
            front.add(n)
    return front


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite study "t" with the 12 trials of TRIALS (11 complete, trial 8 failed)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('study')}/s.db"
    study = _create_study(url, "t")
    for number in range(12):
        if number == 8:
            study.add_trial(
                create_trial(
                    state=TrialState.FAIL,
                    user_attrs={"fail_reason": "BuildError: tvm build timed out after 600 s"},
                )
            )
        else:
            study.add_trial(_complete_trial(number, TRIALS[number]))
    return url


@pytest.fixture
def study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=storage)


@pytest.fixture
def lonely(tmp_path: Path) -> optuna.Study:
    """A study with one complete trial that records a plan but no params, nor latency data."""
    s = _create_study(f"sqlite:///{tmp_path}/one.db", "one")
    s.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            values=[12.0, 17.0, 13.0, 3.0],
            user_attrs={
                "plan": {"groups": {"stream": {"keep_ratio": 0.5}}, "layers": {}, "adapters": {}},
                "constraints": [-1.0, -1.0],
            },
        )
    )
    return s


def test_expected_front_is_what_the_fixture_means() -> None:
    assert _expected_front() == {0, 1, 3, 4, 6, 7, 9, 10}


def test_study_frame_rows_and_columns(study: optuna.Study) -> None:
    f = study_frame(study)
    assert list(f["number"]) == [n for n in range(12) if n != 8]
    assert set(f.loc[~f["feasible"], "number"]) == {5}
    assert set(f.loc[f["on_front"], "number"]) == _expected_front()
    row = f.set_index("number").loc[2]
    assert (row["latency_ms"], row["post_adapt_per"], row["dev_per"]) == TRIALS[2][0]
    assert row["baseline"] == "prune50"
    assert (row["predicted_ms"], row["measured_ms"]) == (15.0, 14.0)
    assert row["keep:stream"] == 0.5
    assert row["pre_adapt_per"] == 24.0
    assert row["peak_memory_mb"] == 10.0
    assert row["size_mb"] == 4.0
    pred = f.set_index("number").loc[4]
    assert pred["latency_source"] == "predicted"
    assert pred["baseline"] == ""
    assert pred["measured_ms"] != pred["measured_ms"]  # NaN
    assert set(DISTRIBUTIONS) <= set(f.columns)


def test_front_table(study: optuna.Study) -> None:
    rows = front_table(study)
    assert {r["trial"] for r in rows} == _expected_front()
    assert [r["latency_ms"] for r in rows] == sorted(r["latency_ms"] for r in rows)
    by_trial = {r["trial"]: r for r in rows}
    assert by_trial[4]["latency_source"] == "predicted"
    assert by_trial[6]["size_mb"] == 2.0  # on the front by size alone
    assert by_trial[0] == {
        "trial": 0,
        "latency_ms": 30.0,
        "latency_source": "measured",
        "dev_per": 12.0,
        "post_adapt_per": 15.0,
        "size_mb": 4.0,
        "baseline": "fp32",
        "vs_peer": None,  # no peer measured for this study
    }


def test_plan_matrix_and_heatmap(study: optuna.Study) -> None:
    m = plan_matrix(study)
    plan_params = [p for p in DISTRIBUTIONS if p.startswith(("keep:", "wbits:", "adapter:"))]
    assert sorted(m.columns) == sorted(plan_params)
    assert list(m.columns[:3]) == ["keep:blocks.0.hidden", "keep:blocks.1.hidden", "keep:stream"]
    front_by_latency = sorted(_expected_front(), key=lambda n: (TRIALS[n][0][0], n))
    assert [int(ix.split()[0][1:]) for ix in m.index] == front_by_latency
    row = m.loc["#3"]
    assert row.to_dict() == {p: float(v) for p, v in _params(TRIALS[3][5]).items() if p in m}
    fig = plan_heatmap(study)
    assert fig is not None
    xs = [x for trace in fig.data for x in trace.x]
    assert xs == [c.partition(":")[2] for c in m.columns]


def test_plan_matrix_falls_back_to_the_recorded_plan(lonely: optuna.Study) -> None:
    m = plan_matrix(lonely)
    assert list(m.columns) == ["keep:stream"]
    assert m.iloc[0, 0] == 0.5


def test_figures_on_a_full_study(study: optuna.Study) -> None:
    pareto = pareto_figure(study)
    assert pareto is not None
    front_trace = [t for t in pareto.data if t.name == "front" and t.xaxis == "x"]
    assert len(front_trace) == 1
    assert len(front_trace[0].x) == len(_expected_front())
    assert "fp32" in front_trace[0].text
    assert pareto_3d_figure(study) is not None
    imp = importance_figure(study)
    assert imp is not None
    assert any(t.type == "bar" for t in imp.data)
    lat = latency_figure(study)
    assert lat is not None
    measured = sum(len(t.x) for t in lat.data if t.mode == "markers")
    assert measured == sum(1 for s in TRIALS.values() if s[3] is not None)
    spk = speaker_figure(study)
    assert spk is not None
    (heat,) = spk.data
    assert list(heat.x) == ["spk1", "spk2", "spk10"]
    with_speakers = {n for n in _expected_front() if n % 3 != 0}
    assert len(heat.y) == len(with_speakers)


def test_figures_degrade_on_one_trial(lonely: optuna.Study, tmp_path: Path) -> None:
    assert pareto_figure(lonely) is not None
    assert importance_figure(lonely) is None
    assert latency_figure(lonely) is None
    assert speaker_figure(lonely) is None
    html = write_report(lonely, tmp_path / "r" / "one.html").read_text()
    for key in ("importance_figure", "latency_figure", "speaker_figure"):
        assert NOTES[key] in html


def test_figures_on_an_empty_study(tmp_path: Path) -> None:
    s = _create_study(f"sqlite:///{tmp_path}/e.db", "empty")
    assert study_frame(s).empty
    assert front_table(s) == []
    assert all(
        b(s) is None
        for b in (pareto_figure, pareto_3d_figure, plan_heatmap, importance_figure, speaker_figure)
    )
    html = write_report(s, tmp_path / "e.html").read_text()
    assert "the front is empty" in html


def test_write_report(study: optuna.Study, tmp_path: Path) -> None:
    out = write_report(study, tmp_path / "report.html")
    assert out == tmp_path / "report.html"
    html = out.read_text(encoding="utf-8")
    assert html.count(get_plotlyjs()[:2000]) == 1
    # Offline: no script is fetched (plotly.js itself mentions cdn.plot.ly for geo maps).
    assert "<script src" not in html.replace("'", '"')
    for title in (
        "Pareto front: 2-D projections",
        "Pareto front: 3-D",
        "Plan of the front trials",
        "Parameter importances per objective",
        "Predicted vs measured latency",
        "Per-speaker adaptation of the front trials",
    ):
        assert title in html
    assert not any(note in html for note in NOTES.values())
    assert "x86-avx2-2core" in html
    assert "tdnn-default" in html
    assert "11 / 1 / 0 / 0" in html  # complete / failed / running / other
    assert "tvm build timed out" in html


def test_objectives_other_than_the_contract_are_an_error(tmp_path: Path) -> None:
    s = optuna.create_study(directions=["minimize"] * 2, storage=f"sqlite:///{tmp_path}/o.db")
    s.set_user_attr("objectives", ["latency_ms", "dev_per"])
    with pytest.raises(ConfigError, match="optimizes"):
        study_frame(s)


def test_load_study(storage: str, tmp_path: Path) -> None:
    assert load_study(storage).study_name == "t"
    url = f"sqlite:///{tmp_path}/two.db"
    _create_study(url, "old").add_trial(_complete_trial(0, TRIALS[0]))
    newer = _complete_trial(1, TRIALS[1])
    newer.datetime_start = datetime.datetime.now() + datetime.timedelta(hours=1)
    _create_study(url, "new").add_trial(newer)
    _create_study(url, "no-trials")
    assert load_study(url).study_name == "new"
    assert load_study(url, "old").study_name == "old"
    with pytest.raises(ConfigError, match="no study 'nope'"):
        load_study(url, "nope")
    missing = tmp_path / "missing.db"
    with pytest.raises(ConfigError, match="no study storage"):
        load_study(f"sqlite:///{missing}")
    assert not missing.exists()


def test_notebook_is_committed_without_outputs() -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert code[0].source == 'storage = "sqlite:///work/search/voxfit.db"\nstudy_name = None'
    assert "optuna-dashboard sqlite:///work/search/voxfit.db" in nb.cells[-1].source


def test_notebook_runs(storage: str) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code")
    params.source = f"storage = {storage!r}\nstudy_name = None"
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    # jupyter_client launches the "python3" kernelspec's `python` as sys.executable, so the
    # kernel is this venv's interpreter (ipykernel installs that spec under sys.prefix).
    NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert Path(printed.strip()).resolve() == Path(sys.executable).resolve()
    summary = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    assert "study 't'" in summary
    assert f"{len(_expected_front())} on the front" in summary


def test_the_latency_model_section_says_how_the_kernel_model_predicted() -> None:
    from voxfit.search._report import _latency_model

    card = {"hardware_key": "x86-64-sse-rpc/abc", "host": {"cpu_model": "Some CPU"}}
    plain = _latency_model({"cost_model_x": card})
    assert "kernel model" not in plain
    html = _latency_model(
        {"cost_model_x": card, "latency_kernels": {"kernels": 7, "estimated": 2, "transfer": 1}}
    )
    assert "7 predictions from known kernels, 2 with kernels estimated" in html
    assert "1 by the transfer model" in html
