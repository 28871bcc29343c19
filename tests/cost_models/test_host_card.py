"""A cost model knows the host it was fitted on; predictions on another kind of host are
low-confidence (so they get measured), unless the predictor is told to ignore it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd
import pytest

import voxfit.cost_models._estimator as _estimator
from tests._tiny import fake_host, tiny_tdnn
from voxfit.compress import apply
from voxfit.cost_models import (
    CostModel,
    CostModelPredictor,
    decompose,
    fit,
    load_for,
    model_dir,
    predicted_estimator,
)
from voxfit.errors import ConfigError
from voxfit.hw_profiles import HardwareProfile, HostInfo, describe_host, load_profile
from voxfit.plan import Candidate, GroupPlan

ROOT = Path(__file__).resolve().parents[2]
FRAMES = 100


ZEN2 = fake_host("AMD EPYC 7B12", 23, 49)
ZEN3 = fake_host("AMD EPYC 7B13", 25, 1)


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    return load_profile(ROOT / "hw_profiles" / "x86-avx2-2core.yaml")


def _fit(profile: HardwareProfile, host: HostInfo | None = None) -> CostModel:
    """A model fitted on a few candidates whose task times follow a known law."""
    base = tiny_tdnn(20, varied_bn=False)
    models, tasks = [], []
    for i, keep in enumerate((0.25, 0.5, 0.75, 1.0) * 2):
        ts = decompose(apply(base, Candidate(groups=(GroupPlan("stream", keep),))), FRAMES)
        ms = [0.02 + 0.05 * t.features["mflops"] for t in ts]
        models.append(
            {
                "cand": f"c{i}",
                "input": "utterance_1s",
                "measured_ms": sum(ms),
                "kernels_ms": sum(ms),
                "loose_ms": 0.0,
                "relative": None,
                "reference": None,
                "reference_ms": None,
                "profile_hash": profile.stable_hash(),
                "tvm_version": "0.27.0",
            }
        )
        tasks += [
            {"cand": f"c{i}", "input": "utterance_1s", "task": t.name, **t.features, "ms": v}
            for t, v in zip(ts, ms, strict=True)
        ]
    return fit(pd.DataFrame(models), pd.DataFrame(tasks), profile, host=host)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # the warning is once per process; each test sees its own
    monkeypatch.setattr(_estimator, "_warned", set())


def test_a_fitted_card_records_this_host_and_keeps_it_on_disk(
    profile: HardwareProfile, tmp_path: Path
) -> None:
    cm = _fit(profile)
    assert cm.card["host"] == describe_host().as_dict()
    assert cm.host == describe_host()
    same, why = cm.host_check()
    assert same
    assert "one kind" in why
    loaded = CostModel.load(cm.save(tmp_path / "m"))
    assert loaded.host == describe_host()
    assert _fit(profile, host=ZEN2).host == ZEN2


def test_another_kind_of_host_makes_predictions_low_confidence_with_the_reason(
    profile: HardwareProfile, caplog: pytest.LogCaptureFixture
) -> None:
    cm = _fit(profile, host=ZEN2)
    same, why = cm.host_check(ZEN3)
    assert not same
    assert why.startswith(
        "fitted on AMD EPYC 7B12 (zen2, 2 cores), running on AMD EPYC 7B13 (zen3, 2 cores)"
    )
    base = tiny_tdnn(20, varied_bn=False)
    assert not CostModelPredictor(cm, current_host=ZEN2).predict(base, FRAMES).low_confidence
    with caplog.at_level(logging.WARNING, logger=_estimator.__name__):
        pred = CostModelPredictor(cm, current_host=ZEN3)
        p = pred.predict(base, FRAMES)
        CostModelPredictor(cm, current_host=ZEN3)  # the same mismatch again: no new warning
    assert p.low_confidence
    assert p.reasons == (f"cost model from another host: {why}",)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "AMD EPYC 7B12 (zen2, 2 cores)" in warnings[0]
    assert "AMD EPYC 7B13 (zen3, 2 cores)" in warnings[0]


def test_ignore_uses_the_predictions_as_they_are_but_still_says_so(
    profile: HardwareProfile, caplog: pytest.LogCaptureFixture
) -> None:
    cm = _fit(profile, host=ZEN2)
    base = tiny_tdnn(20, varied_bn=False)
    with caplog.at_level(logging.WARNING, logger=_estimator.__name__):
        p = CostModelPredictor(cm, "ignore", current_host=ZEN3).predict(base, FRAMES)
    assert any("host_mismatch='ignore'" in r.getMessage() for r in caplog.records)
    flagged = CostModelPredictor(cm, current_host=ZEN3).predict(base, FRAMES)
    assert not p.low_confidence
    assert p.reasons == ()
    assert p.ms == flagged.ms
    assert flagged.low_confidence
    with pytest.raises(ConfigError, match="host_mismatch"):
        CostModelPredictor(cm, "warn")  # type: ignore[arg-type]


def test_a_card_without_a_host_is_unknown_not_different(profile: HardwareProfile) -> None:
    cm = _fit(profile, host=ZEN2)
    del cm.card["host"]
    assert cm.host is None
    same, why = cm.host_check(ZEN3)
    assert same
    assert why.startswith("host unknown")
    p = CostModelPredictor(cm, current_host=ZEN3).predict(tiny_tdnn(20, varied_bn=False), FRAMES)
    assert not p.low_confidence


def test_the_shipped_card_has_no_host_and_is_not_flagged(profile: HardwareProfile) -> None:
    card = model_dir(profile, ROOT / "cost_models") / "card.yaml"
    before = hashlib.sha256(card.read_bytes()).hexdigest()
    cm = load_for(profile, ROOT / "cost_models")
    assert cm.host is None
    assert cm.host_check(ZEN3)[1].startswith("host unknown")
    (r,) = predicted_estimator(profile, model=cm).estimate(
        tiny_tdnn(20, varied_bn=False), profile.inputs[:1]
    )
    assert r.median_ms is not None
    assert hashlib.sha256(card.read_bytes()).hexdigest() == before
