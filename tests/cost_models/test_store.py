"""The measurement store and the merged dataset: concurrent writers, torn files, merging,
and the cost-model commands leaving the repository as it was."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from voxfit.cost_models import (
    MeasurementStore,
    drop_keys,
    fitted_model_dir,
    load_dataset,
    load_for,
    measurements_dir,
    noisy_keys,
    write_dataset,
)
from voxfit.hw_profiles import find_profile, load_profile

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PROFILE = "x86-avx2-2core"
SHIPPED = ROOT / "cost_models" / SHIPPED_PROFILE / "dataset"
SPACES = ROOT / "src" / "voxfit" / "spaces" / "shipped"
TASKS = ("stem", "blocks.0", "blocks.1", "head")


def _rows(
    cand: str, ms: float = 1.0, date: str = "2026-01-01T00:00:00+00:00", **more: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    row = {"cand": cand, "input": "utterance_1s", "measured_ms": ms, "date": date, **more}
    tasks = [
        {"cand": cand, "input": "utterance_1s", "task": t, "ms": ms / len(TASKS)} for t in TASKS
    ]
    return row, tasks


def _writer(directory: str, tag: str, n: int, start: Any) -> None:
    start.wait(60)
    store = MeasurementStore(directory)
    for i in range(n):
        store.add(*_rows(f"{tag}{i:04d}", ms=float(i)))


def test_two_processes_adding_at_once_lose_nothing(tmp_path: Path) -> None:
    n = 100
    ctx = mp.get_context("spawn")  # two interpreters, as two searches would be
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), t, n, start)) for t in "ab"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    models, tasks = MeasurementStore(tmp_path).load()
    assert len(models) == 2 * n
    assert sorted(models["cand"]) == sorted(f"{t}{i:04d}" for t in "ab" for i in range(n))
    assert len(tasks) == 2 * n * len(TASKS)
    assert (
        models.set_index("cand")["measured_ms"] == [float(c[1:]) for c in models["cand"]]
    ).all()
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_torn_and_broken_files_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MeasurementStore(tmp_path)
    store.add(*_rows("whole"))
    text = json.dumps({"schema_version": 1, "model": _rows("torn")[0], "tasks": []})
    (tmp_path / ".tmpab12cd.tmp").write_text(text[:40])  # a writer killed mid-write
    (tmp_path / "broken-disk.json").write_text(text[:40])  # cut short after the rename
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "other.json").write_text(json.dumps({"schema_version": 99}))
    with caplog.at_level(logging.WARNING):
        models, tasks = store.load()
    assert list(models["cand"]) == ["whole"]
    assert len(tasks) == len(TASKS)
    for name in ("broken-disk.json", "binary.json", "other.json"):
        assert name in caplog.text
    assert ".tmpab12cd.tmp" not in caplog.text  # temporaries are not measurements at all


def test_add_refuses_rows_that_do_not_belong_together(tmp_path: Path) -> None:
    row, tasks = _rows("a")
    with pytest.raises(ValueError, match="cand and input"):
        MeasurementStore(tmp_path).add({"cand": 1}, [])
    with pytest.raises(ValueError, match="task row"):
        MeasurementStore(tmp_path).add(row, [{**tasks[0], "cand": "b"}])
    assert not list(tmp_path.iterdir())


def test_load_merges_shipped_and_extra_keeping_the_latest(tmp_path: Path) -> None:
    shipped_m = pd.DataFrame([_rows(c)[0] for c in ("s1", "s2")])
    shipped_t = pd.DataFrame([t for c in ("s1", "s2") for t in _rows(c)[1]])
    write_dataset(shipped_m, shipped_t, tmp_path / "shipped")
    store = MeasurementStore(tmp_path / "store")
    store.add(*_rows("new", ms=5.0))
    store.add(*_rows("s2", ms=9.0, date="2026-02-01T00:00:00+00:00"))  # measured again
    copy = MeasurementStore(tmp_path / "copy")
    copy.add(*_rows("new", ms=5.0))  # the same measurement in a second folder
    models, tasks = load_dataset(tmp_path / "shipped", store.directory, copy.directory)
    assert sorted(models["cand"]) == ["new", "s1", "s2"]
    by = models.set_index("cand")["measured_ms"]
    assert by.to_dict() == {"s1": 1.0, "s2": 9.0, "new": 5.0}
    assert len(tasks) == 3 * len(TASKS)
    # the task rows are the winning measurement's, not a mix
    assert tasks[tasks["cand"] == "s2"]["ms"].tolist() == [9.0 / len(TASKS)] * len(TASKS)
    # the shipped folder alone reads as before, and nothing was written to it
    alone, _ = load_dataset(tmp_path / "shipped")
    assert alone["measured_ms"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in (tmp_path / "shipped").iterdir()) == [
        "models.parquet",
        "tasks.parquet",
    ]
    nothing = load_dataset(tmp_path / "missing")
    assert nothing[0].empty
    assert nothing[1].empty


def test_a_broken_parquet_table_is_one_error_naming_it(tmp_path: Path) -> None:
    from voxfit.errors import ConfigError

    row, tasks = _rows("a")
    write_dataset(pd.DataFrame([row]), pd.DataFrame(tasks), tmp_path / "ok")
    good = (tmp_path / "ok" / "models.parquet").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "models.parquet").write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match=r"cut/models.parquet: not a readable parquet"):
        load_dataset(tmp_path / "cut")
    (tmp_path / "other").mkdir()
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "other" / "models.parquet")
    with pytest.raises(ConfigError, match="cand/input: columns missing"):
        load_dataset(tmp_path / "other")


def test_the_shipped_dataset_reads_exactly_as_its_parquet() -> None:
    models, tasks = load_dataset(SHIPPED)
    pd.testing.assert_frame_equal(models, pd.read_parquet(SHIPPED / "models.parquet"))
    pd.testing.assert_frame_equal(tasks, pd.read_parquet(SHIPPED / "tasks.parquet"))


def test_noisy_rows_are_judged_by_their_ratio_spread_when_paired(tmp_path: Path) -> None:
    rows = [  # (cand, raw median, raw IQR, relative, relative IQR)
        ("quiet", 2.0, 0.1, 0.5, 0.01),
        ("loaded-but-paired", 2.0, 1.5, 0.5, 0.02),  # raw spread, steady ratio: kept
        ("unsteady-ratio", 2.0, 0.1, 0.5, 0.3),
        ("unpaired-loaded", 2.0, 1.5, None, None),
    ]
    store = MeasurementStore(tmp_path)
    for cand, ms, iqr, rel, rel_iqr in rows:
        store.add(*_rows(cand, ms, iqr_ms=iqr, relative=rel, relative_iqr=rel_iqr))
    models, tasks = store.load()
    keys = noisy_keys(models, 0.25)
    assert keys == {("unsteady-ratio", "utterance_1s"), ("unpaired-loaded", "utterance_1s")}
    models, tasks = drop_keys(models, tasks, keys)
    assert sorted(models["cand"]) == ["loaded-but-paired", "quiet"]
    assert sorted(set(tasks["cand"])) == ["loaded-but-paired", "quiet"]


# -- collect and fit ------------------------------------------------------------------------


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


class _FakeLocal:
    """Stands in for TvmLocalEstimator: whole-model times, no kernels, no TVM."""

    def __init__(self, profile: Any, work_dir: Any, **kwargs: Any) -> None:
        self.profile = profile

    def __enter__(self) -> _FakeLocal:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def estimate(self, model: Any, inputs: Any) -> list[Any]:
        from voxfit.latency import LatencyResult

        return [
            LatencyResult(
                profile=self.profile.name,
                input=i.name,
                frames=i.frames,
                method="local",
                median_ms=1.0,
                iqr_ms=0.01,
                repeats=3,
                reference_ms=2.0,
                relative=0.5,
                relative_iqr=0.01,
            )
            for i in inputs
        ]


def test_collect_adds_to_the_store_and_skips_what_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voxfit.cost_models import collect
    from voxfit.models import build_model, default_config
    from voxfit.spaces import find_space

    monkeypatch.setattr("voxfit.latency.TvmLocalEstimator", _FakeLocal)
    profile = load_profile(find_profile(SHIPPED_PROFILE))
    base = build_model(default_config("tdnn", 20, "tiny")).eval()
    bound = find_space("tdnn-default").bind(base.structure())
    store = measurements_dir(profile, tmp_path / "work")
    cm_dir = tmp_path / "cm"  # no shipped dataset for this run

    def run(**kw: Any) -> dict[str, Any]:
        return collect(
            base, bound, profile, 3, work_dir=tmp_path / "b", store=store,
            cost_models_dir=cm_dir, **kw,
        )  # fmt: skip

    assert run()["stored"] == 3
    models, tasks = load_dataset(store)
    assert len(models) == 3
    assert len(tasks) == 3 * len(TASKS)
    assert run()["skipped"] == 3
    first = (str(models["cand"][0]), "utterance_1s")
    again = run(remeasure={first})
    assert (again["stored"], again["skipped"]) == (1, 2)
    assert len(MeasurementStore(store).files()) == 4
    assert len(load_dataset(store)[0]) == 3  # the newer measurement replaces the old
    assert not cm_dir.exists()


runner = CliRunner()


def test_collect_and_fit_leave_the_repository_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voxfit.cli import app

    monkeypatch.chdir(ROOT)  # the defaults (cost_models/) point into the repository
    before = _tree_digest(ROOT / "cost_models")
    profile = load_profile(find_profile(SHIPPED_PROFILE))
    work = tmp_path / "work"
    # the space the shipped dataset was sampled from: tdnn-default with float32 activations
    space = yaml.safe_load((SPACES / "tdnn-default.yaml").read_text())
    space["quantization"]["act_bits"] = {"*": [32]}
    space_file = tmp_path / "fp32-acts.yaml"
    space_file.write_text(yaml.safe_dump(space))
    # its first sampled candidate is in the shipped dataset: skipped, no TVM started
    res = runner.invoke(
        app,
        ["cost-model", "collect", "--profile", SHIPPED_PROFILE, "--n", "1", "--work", str(work),
         "--space", str(space_file)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "1 already measured" in res.output
    # two more measurements, copied from shipped rows under new names, in a store
    shipped_m, shipped_t = load_dataset(SHIPPED)
    store = MeasurementStore(measurements_dir(profile, work))
    for cand in shipped_m["cand"][:2]:
        row = shipped_m[shipped_m["cand"] == cand].iloc[0].to_dict()
        ts = shipped_t[shipped_t["cand"] == cand].to_dict(orient="records")
        store.add({**row, "cand": f"x{cand}"}, [{**t, "cand": f"x{cand}"} for t in ts])
    res = runner.invoke(
        app,
        ["cost-model", "fit", "--profile", SHIPPED_PROFILE, "--test-frac", "0",
         "--work", str(work), "--extra", str(store.directory),
         "--dataset-out", str(tmp_path / "merged")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"({len(shipped_m) + 2} candidates)" in res.output
    cm = load_for(profile, directory=fitted_model_dir(profile, work))
    assert cm.card["n_candidates"] == len(shipped_m) + 2
    # the merged dataset, written where asked, reads back as the merge
    merged_m, merged_t = load_dataset(tmp_path / "merged")
    want_m, want_t = load_dataset(SHIPPED, store.directory)
    pd.testing.assert_frame_equal(merged_m, want_m)
    pd.testing.assert_frame_equal(merged_t, want_t)
    # --no-shipped: only the store's measurements (e.g. libraries the shipped rows predate)
    res = runner.invoke(
        app,
        ["cost-model", "fit", "--profile", SHIPPED_PROFILE, "--test-frac", "0", "--no-shipped",
         "--work", str(work), "--extra", str(store.directory), "--out", str(tmp_path / "own")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "(2 candidates)" in res.output
    assert load_for(profile, directory=tmp_path / "own").card["n_candidates"] == 2
    assert _tree_digest(ROOT / "cost_models") == before


def test_fit_refuses_an_extra_folder_without_measurements(tmp_path: Path) -> None:
    from voxfit.cli import app
    from voxfit.errors import ConfigError

    res = runner.invoke(app, ["cost-model", "fit", "--profile", SHIPPED_PROFILE, "--no-shipped"])
    assert isinstance(res.exception, ConfigError)
    assert "--no-shipped: name the measurements" in str(res.exception)

    (tmp_path / "empty").mkdir()
    for extra, why in ((tmp_path / "empty", "no measurements"), (tmp_path / "no", "no such")):
        res = runner.invoke(
            app, ["cost-model", "fit", "--profile", SHIPPED_PROFILE, "--extra", str(extra)]
        )
        assert isinstance(res.exception, ConfigError)
        assert why in str(res.exception)


@pytest.mark.parametrize(
    ("details", "want"),
    [({"seeded_tasks": ["fused_conv1d", "fused_conv1d1"]}, 2), ({"seeded_tasks": []}, 0), ({}, 0)],
)
def test_a_measured_row_counts_the_tasks_run_with_the_seed_profiles_schedules(
    details: dict[str, Any], want: int
) -> None:
    import dataclasses

    from voxfit.compile import CompileResult
    from voxfit.cost_models._dataset import rows_of
    from voxfit.latency import LatencyResult
    from voxfit.models import build_model, default_config
    from voxfit.plan import Candidate

    profile = load_profile(find_profile("x86-64-sse-rpc"))
    model = build_model(default_config("tdnn", 20, "tiny")).eval()
    compiled = CompileResult(profile.name, "utterance_1s", 100, n_tasks=5, details=details)
    r = LatencyResult(profile.name, "utterance_1s", 100, "rpc", median_ms=1.0, compile=compiled)
    row, _ = rows_of(model, Candidate(), r, profile, "onboard")
    assert row["seeded_tasks"] == want
    assert row["task_keys"] is None  # a build that did not report them
    keys = [["fused_conv1d", "123", 2, 1e6]]
    with_keys = dataclasses.replace(compiled, details={**details, "task_keys": keys})
    row, _ = rows_of(model, Candidate(), dataclasses.replace(r, compile=with_keys), profile, "x")
    assert json.loads(row["task_keys"]) == keys
    row, _ = rows_of(model, Candidate(), dataclasses.replace(r, compile=None), profile, "x")
    assert row["seeded_tasks"] is None  # not compiled here: unknown
