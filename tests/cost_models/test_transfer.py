"""The transfer model of a new device: recovers per-kind scales from few samples, beats a
model from scratch on the same samples, saves and loads as a stand-in for a cost model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests._tiny import fake_host
from voxfit.compress import apply
from voxfit.cost_models import (
    CostModel,
    CostModelPredictor,
    decompose,
    load_for,
    metrics,
    sample_candidates,
)
from voxfit.cost_models._transfer import (
    TransferModel,
    fit_scratch,
    fit_transfer,
    source_groups,
    task_group,
)
from voxfit.errors import ConfigError
from voxfit.hw_profiles import find_profile, load_profile
from voxfit.models import build_model, default_config
from voxfit.spaces import find_space

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "cost_models" / "x86-avx2-2core" / "model"
# a device where each kind of kernel runs at its own speed relative to the source
SCALES = {
    "stem": 1.5,
    "blocks/w32": 1.9,
    "blocks/int8": 1.7,
    "blocks/w8": 2.7,
    "blocks/w4": 3.1,
    "head": 1.3,
}


@pytest.fixture(scope="module")
def candidates() -> list[nn.Module]:
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", 55, "default")).eval()
    space = find_space("tdnn-default").bind(base.structure())
    calib = [(torch.randn(2, 100, 80), torch.full((2,), 100))]
    return [
        apply(base, c, channel_multiple=8, calibration=calib)
        for c in sample_candidates(space, 24, seed=5, levelled=16)
    ]


@pytest.fixture(scope="module")
def candidates_tasks(candidates: list[nn.Module]) -> list[list]:  # type: ignore[type-arg]
    return [decompose(m, 100) for m in candidates]


def _device_ms(src: CostModel, tasks: list, rng: random.Random) -> float:  # type: ignore[type-arg]
    p = src.predict_tasks(tasks)
    total = 0.25 + 1.4 * p.overhead_ms
    for t in tasks:
        g = task_group(t)
        total += p.tasks[t.name] * SCALES.get(g, SCALES.get(g.split("/")[0], 1.0))
    return total * (1.0 + rng.gauss(0.0, 0.02))  # 2% measurement noise


def test_groups_sum_the_source_prediction(candidates_tasks: list) -> None:  # type: ignore[type-arg]
    src = CostModel.load(SHIPPED)
    sums, p = source_groups(src, candidates_tasks[0])
    assert sum(sums.values()) == pytest.approx(p.ms, rel=1e-6)  # float32 per task
    assert "overhead" in sums
    assert any(k.startswith("blocks/") for k in sums)


def test_twenty_samples_recover_a_device_and_beat_a_model_from_scratch(
    candidates_tasks: list,  # type: ignore[type-arg]
) -> None:
    src = CostModel.load(SHIPPED)
    profile = load_profile(find_profile("x86-64-sse-rpc"))
    rng = random.Random(1)
    rows = [(t, _device_ms(src, t, rng)) for t in candidates_tasks]
    shots, held = rows[:20], rows[20:]
    model = fit_transfer(src, shots, profile)
    ys = [y for _, y in held]
    mine = metrics([model.predict_tasks(t).ms for t, _ in held], ys)
    assert mine["within_10pct"] >= 0.95, mine
    assert mine["spearman"] >= 0.9, mine
    for name, f in fit_scratch(shots).items():
        theirs = metrics([f(t) for t, _ in held], ys)
        assert mine["mape"] < theirs["mape"], (name, mine, theirs)
    # the blocks' scales are found, not the common one (int8 kernels are a kind of their own)
    coef = model.card["coef"]
    assert coef["blocks/w8"] > coef["blocks/int8"] * 1.15
    assert model.card["n_shot"] == 20
    assert model.card["hardware_key"].startswith("x86-64-sse-rpc@")


def test_a_saved_transfer_model_loads_for_its_profile_only(
    candidates_tasks: list,  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    src = CostModel.load(SHIPPED)
    profile = load_profile(find_profile("x86-64-sse-rpc"))
    rng = random.Random(2)
    rows = [(t, _device_ms(src, t, rng)) for t in candidates_tasks[:8]]
    model = fit_transfer(src, rows, profile)
    d = model.save(tmp_path / "m")
    card = yaml.safe_load((d / "card.yaml").read_text())
    assert card["kind"] == "transfer"
    assert not Path(card["source"]["directory"]).is_absolute()  # moves with its folder
    back = load_for(profile, directory=d)
    assert isinstance(back, TransferModel)
    t = candidates_tasks[9]
    assert back.predict_tasks(t).ms == pytest.approx(model.predict_tasks(t).ms, rel=1e-12)
    with pytest.raises(ConfigError, match="onboard this profile"):
        load_for(load_profile(find_profile("x86-avx2-1core")), directory=d)
    # the source changed under it: refused, naming the file
    card["source"]["model_sha256"] = "0" * 64
    (d / "card.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(ConfigError, match="changed since"):
        load_for(profile, directory=d)


def test_too_few_or_bad_samples_are_refused(candidates_tasks: list) -> None:  # type: ignore[type-arg]
    src = CostModel.load(SHIPPED)
    profile = load_profile(find_profile("x86-64-sse-rpc"))
    with pytest.raises(ConfigError, match="at least 3"):
        fit_transfer(src, [(candidates_tasks[0], 1.0)], profile)
    bad = [(t, float("nan") if i == 1 else 1.0) for i, t in enumerate(candidates_tasks[:4])]
    with pytest.raises(ConfigError, match="positive number"):
        fit_transfer(src, bad, profile)


def test_an_unseen_kind_of_task_is_low_confidence(candidates_tasks: list) -> None:  # type: ignore[type-arg]
    src = CostModel.load(SHIPPED)
    profile = load_profile(find_profile("x86-64-sse-rpc"))
    kinds = [{task_group(x) for x in t} for t in candidates_tasks]
    # a kind some candidates have and at least 3 others lack
    g = next(
        k for k in sorted(set().union(*kinds)) if 3 <= sum(k not in s for s in kinds) < len(kinds)
    )
    without = [t for t, s in zip(candidates_tasks, kinds, strict=True) if g not in s]
    with_g = next(t for t, s in zip(candidates_tasks, kinds, strict=True) if g in s)
    rng = random.Random(3)
    model = fit_transfer(src, [(t, _device_ms(src, t, rng)) for t in without[:8]], profile)
    p = model.predict_tasks(with_g)
    assert p.low_confidence
    assert any(f"{g}: no task of this kind" in r for r in p.reasons), p.reasons
    assert p.ms > 0
    assert not any("no task of this kind" in r for r in model.predict_tasks(without[0]).reasons)


def test_a_model_from_another_host_calibrates_to_this_one_from_the_measurements(
    candidates: list[nn.Module],
    candidates_tasks: list,  # type: ignore[type-arg]
) -> None:
    src = CostModel.load(SHIPPED)
    src.card["host"] = fake_host("AMD EPYC 7B12", 23, 49).as_dict()
    here = fake_host("AMD EPYC 9B14", 25, 17)
    profile = load_profile(find_profile("x86-avx2-2core"))
    pred = CostModelPredictor(src, current_host=here, profile=profile, min_samples=8)
    assert pred.calibrating
    first = pred.predict(candidates[0], 100)
    assert first.low_confidence
    assert any("another host" in r for r in first.reasons)
    rng = random.Random(4)
    truth = [_device_ms(src, t, rng) for t in candidates_tasks]
    for m, y in zip(candidates[:7], truth[:7], strict=True):
        pred.observe(m, 100, y)
    assert pred.calibration is not None
    assert not pred.calibration["active"]  # 7 of 8
    pred.observe(candidates[7], 100, truth[7])
    cal = pred.calibration
    assert cal is not None
    assert (cal["active"], cal["samples"], cal["host"]["cpu_model"]) == (True, 8, "AMD EPYC 9B14")
    later = [pred.predict(m, 100) for m in candidates[8:]]
    assert not any(any("another host" in r for r in p.reasons) for p in later)
    rel = [abs(p.ms - y) / y for p, y in zip(later, truth[8:], strict=True)]
    assert sum(r <= 0.10 for r in rel) / len(rel) >= 0.9, rel
    # the same model on its own host is not calibrated
    same = CostModelPredictor(
        src, current_host=fake_host("AMD EPYC 7B12", 23, 49), profile=profile
    )
    assert not same.calibrating
    assert same.calibration is None
