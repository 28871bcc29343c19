"""The README's "Python API" block runs, on a study made here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from voxfit.plan import Candidate, LayerPlan
from voxfit.search import AccuracyRecord, LatencyRecord, TrialRecord

README = Path(__file__).resolve().parents[2] / "README.md"


def _api_block() -> str:
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README: no python block under '## Python API'"
    return m.group(1)


def test_readme_python_api_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "work" / "search").mkdir(parents=True)
    st = optuna.create_study(
        storage="sqlite:///" + str(tmp_path / "work" / "search" / "voxfit.db"),
        study_name="make-run",
        directions=["minimize"] * 4,
    )
    plans = [Candidate(), Candidate(layers=(LayerPlan("blocks.0.conv", 8),))]
    for i, (plan, vals) in enumerate(zip(plans, ([3.0, 20.0, 4.0, 5.0], [2.0, 22.0, 4.5, 1.5]),
                                         strict=True)):  # fmt: skip
        rec = TrialRecord(
            number=i,
            state="COMPLETE",
            plan=plan,
            seed=i,
            accuracy=AccuracyRecord(post_adapt_per=vals[1], dev_per=vals[2]),
            latency=LatencyRecord(objective_ms=vals[0], source="measured", basis="reference"),
            size_mb=vals[3],
        )
        st.add_trial(
            create_trial(
                values=vals,
                user_attrs={"record": rec.to_attr()},
                system_attrs={"constraints": [-1.0, -1.0]},
                state=TrialState.COMPLETE,
            )
        )
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        scope: dict[str, object] = {}
        exec(compile(_api_block(), "README.md:Python API", "exec"), scope)  # noqa: S102
    finally:
        os.chdir(here)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("#1 2.00 ms")  # fastest first
    assert "latency measured/reference" in out[0]
    assert len(out) == 2
    assert scope["plan"] == plans[0]  # the lower post-adaptation PER
