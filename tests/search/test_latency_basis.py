"""Predicted and measured latency objectives of one study share the cost model's speed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from voxfit.compress import apply
from voxfit.cost_models import CostModelPredictor, decompose, fit, model_dir, reference_key
from voxfit.hw_profiles import HardwareProfile, pick_local_profile
from voxfit.latency import LatencyResult, PredictedEstimator, always
from voxfit.models import build_model, default_config
from voxfit.plan import Candidate, GroupPlan
from voxfit.search._study import SearchSettings, _latency_record, make_latency
from voxfit.spaces import find_space

ROOT = Path(__file__).resolve().parents[2]
REF_MS = 4.0  # the reference model's typical time in the (synthetic) dataset


class _SlowHost:
    """A measurer on a host running 2x slower than when the dataset was collected."""

    def __init__(self, relative: float) -> None:
        self.relative = relative

    def estimate(self, model: Any, inputs: Any) -> list[LatencyResult]:
        (spec,) = inputs
        return [
            LatencyResult(
                profile="p",
                input=spec.name,
                frames=spec.frames,
                method="local",
                median_ms=self.relative * REF_MS * 2.0,
                reference_ms=REF_MS * 2.0,
                relative=self.relative,
                repeats=15,
            )
        ]

    def close(self) -> None:
        pass


def _cost_model(profile: HardwareProfile, base: torch.nn.Module, root: Path) -> None:
    """A cost model whose card knows ``base`` as its reference at REF_MS."""
    frames = profile.primary_input.frames
    models, tasks = [], []
    for i, keep in enumerate((0.25, 0.5, 0.75, 1.0) * 3):
        cand = Candidate(groups=(GroupPlan("blocks.0.hidden", keep),))
        ts = decompose(apply(base, cand, channel_multiple=8), frames)
        ms = [0.01 + 0.02 * t.features["mflops"] for t in ts]
        models.append(
            {
                "cand": f"c{i}",
                "input": profile.primary_input.name,
                "measured_ms": sum(ms),
                "kernels_ms": sum(ms),
                "loose_ms": 0.0,
                "reference_ms": REF_MS,
                "relative": sum(ms) / REF_MS,
                "reference": reference_key(base),
                "profile_hash": profile.stable_hash(),
                "tvm_version": "0.27.0",
            }
        )
        tasks += [
            {"cand": f"c{i}", "input": profile.primary_input.name, **t.features, "ms": v}
            for t, v in zip(ts, ms, strict=True)
        ]
    cm = fit(pd.DataFrame(models), pd.DataFrame(tasks), profile)
    cm.save(model_dir(profile, root))


@pytest.mark.parametrize("same_reference", [True, False])
def test_measured_objective_is_put_on_the_cost_models_speed(
    tmp_path: Path, same_reference: bool
) -> None:
    profile = pick_local_profile(ROOT / "hw_profiles")
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", 20, "tiny")).eval()
    _cost_model(profile, base, tmp_path / "cm")
    space = find_space(ROOT / "spaces" / "tdnn-default.yaml").bind(base.structure())
    cm, work = tmp_path / "cm", tmp_path / "work"  # not the checkout's work folder
    s = SearchSettings(profile, space, "sqlite://", "t", 1, cost_models_dir=cm, work=work)
    other = build_model(default_config("tdnn", 21, "tiny")).eval()  # another parameter count
    lat = make_latency(s, reference=base if same_reference else other)
    lat.measurer = _SlowHost(relative=0.5)  # type: ignore[assignment]
    (r,) = lat.estimate(base, (profile.primary_input,), promote=always)
    out = _latency_record(r, profile)
    assert out.source == "measured"
    assert out.measured_ms == pytest.approx(4.0)  # raw: half the base on a 2x slower host
    if same_reference:
        # half the base at the speed the cost model predicts for: comparable with predictions
        assert out.basis == "reference"
        assert out.measured_ref_ms == pytest.approx(0.5 * REF_MS)
        assert out.objective_ms == pytest.approx(2.0)
    else:  # the card's reference is another model: no common scale, the raw median
        assert out.basis == "raw"
        assert out.measured_ref_ms is None
        assert out.objective_ms == pytest.approx(4.0)
    assert out.predicted_ms is not None


def test_a_predicted_objective_says_which_speed_its_card_predicts_at(tmp_path: Path) -> None:
    from dataclasses import replace

    profile = pick_local_profile(ROOT / "hw_profiles")
    profile = replace(profile, measurement=replace(profile.measurement, method="predicted"))
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", 20, "tiny")).eval()
    _cost_model(profile, base, tmp_path / "cm")
    space = find_space(ROOT / "spaces" / "tdnn-default.yaml").bind(base.structure())
    cm, work = tmp_path / "cm", tmp_path / "work"  # not the checkout's work folder
    s = SearchSettings(profile, space, "sqlite://", "t", 1, cost_models_dir=cm, work=work)
    lat = make_latency(s, reference=base)
    assert lat.measurer is None  # a predicted profile never measures, baselines included
    (r,) = lat.estimate(base, (profile.primary_input,), promote=always)
    out = _latency_record(r, profile)
    assert out.source == "predicted"
    assert out.objective_ms == out.predicted_ms
    assert out.basis == "reference"
    assert lat.predictor is not None
    cm = lat.predictor.predictor.model  # type: ignore[attr-defined]
    del cm.card["reference_ms"]  # a card fitted on raw medians
    (r,) = PredictedEstimator(profile, CostModelPredictor(cm)).estimate(
        base, (profile.primary_input,)
    )
    assert _latency_record(r, profile).basis == "raw"


def test_a_search_predicts_with_a_user_fitted_cost_model(tmp_path: Path) -> None:
    profile = pick_local_profile(ROOT / "hw_profiles")
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", 20, "tiny")).eval()
    _cost_model(profile, base, tmp_path / "fitted")
    space = find_space(ROOT / "spaces" / "tdnn-default.yaml").bind(base.structure())
    cm, work = tmp_path / "none", tmp_path / "work"  # not the checkout's work folder
    s = SearchSettings(profile, space, "sqlite://", "t", 1, cost_models_dir=cm, work=work)
    lat = make_latency(s, reference=base)
    assert lat.predictor is None  # nothing shipped under cost_models_dir: every trial measured
    lat.close()
    s.cost_model = model_dir(profile, tmp_path / "fitted")
    lat = make_latency(s, reference=base)
    assert lat.predictor is not None
    (r,) = lat.estimate(base, (profile.primary_input,))
    assert r.method == "predicted"
    lat.close()


def test_a_torn_host_kernel_table_is_set_aside_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A torn kernel table of this host (a `voxfit device time-kernels` run killed mid-write)
    costs the predictor its calibration, not the search: it warns, naming the file."""
    from dataclasses import replace

    from voxfit.compile._database import RECORDS, WORKLOADS
    from voxfit.cost_models._host_kernels import host_kernels_dir

    profile = pick_local_profile(ROOT / "hw_profiles")
    profile = replace(profile, measurement=replace(profile.measurement, method="predicted"))
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", 20, "tiny")).eval()
    _cost_model(profile, base, tmp_path / "cm")
    table = host_kernels_dir(profile, tmp_path / "work")
    table.mkdir(parents=True)
    (table / WORKLOADS).write_text('["k0", {}]\n')
    (table / RECORDS).write_text('[0, [[0.001], "torn')  # no closing line
    space = find_space(ROOT / "spaces" / "tdnn-default.yaml").bind(base.structure())
    cm, work = tmp_path / "cm", tmp_path / "work"
    s = SearchSettings(profile, space, "sqlite://", "t", 1, cost_models_dir=cm, work=work)
    with caplog.at_level("WARNING"):
        lat = make_latency(s, reference=base)
    assert lat.predictor is not None
    assert any(RECORDS in r.getMessage() and "not used" in r.getMessage() for r in caplog.records)
    (r,) = lat.estimate(base, (profile.primary_input,), promote=always)
    assert r.method == "predicted"
    assert r.median_ms is not None
    assert r.median_ms > 0
