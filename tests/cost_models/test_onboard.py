"""Onboarding a tiny device end to end through the command line: tuned on the device, a few
candidates measured alternating with the base, a transfer model fitted, validated, saved;
a second run resumes (measures nothing again)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._cli import run_voxfit
from tests._tiny import CI_TINY_SPACE
from voxfit.cost_models import MeasurementStore, load_for
from voxfit.cost_models._transfer import TransferModel
from voxfit.data import Manifest
from voxfit.hw_profiles import load_profile

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _tiny_device(tmp_path: Path, *, seeded: bool = True) -> Path:
    """The 1-core AVX2 profile as a new device, 2 trials per task; ``seeded``: its tuning
    seeded from the shipped x86 database (``tuning.seed_from``, the profile's own)."""
    raw = yaml.safe_load((ROOT / "src/voxfit/hw_profiles/shipped/x86-avx2-1core.yaml").read_text())
    raw["name"] = "tiny-1core"
    raw["tuning"].update(trials_per_task=2, trials_per_iter=2)
    if not seeded:
        raw["tuning"].pop("seed_from")
    # a tiny model's timings are noisy on a busy CI host: no repeats for the CV here
    raw["measurement"].update(repeats=5, min_repeat_ms=5, warmup=1, max_cv=1.0)
    f = tmp_path / "tiny-1core.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def _onboard_args(tmp_path: Path, *budget: str, seeded: bool = True) -> list[str]:
    """``voxfit device onboard`` of the tiny device over the CI space: 3 candidates fitted,
    3 validated, then ``budget`` (the tuning and source options)."""
    space = tmp_path / "space.yaml"
    space.write_text(CI_TINY_SPACE)
    device = _tiny_device(tmp_path, seeded=seeded)
    return ["device", "onboard", str(device), "--preset", "tiny",
            "--space", str(space), "--n", "3", "--validate", "3", "--tune-minutes", "30",
            *budget, "--work", str(tmp_path / "work"),
            "--cost-models", str(ROOT / "cost_models")]  # fmt: skip


def _onboarded(
    args: list[str], work: Path, capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch
) -> tuple[dict[str, Any], Path, str]:
    """Run the onboarding ``args``; check what every onboarding of the tiny device writes
    (a transfer card from 3 samples validated on 3, a kernel model over the device's own
    records, tasks tuned there); return the card, the model folder and the output."""
    code, out, err = run_voxfit(args, capsys, mp)
    assert code == 0, err[-3000:]
    assert "onboarded tiny-1core from x86-avx2-2core's model" in out
    model_dir = work / "cost_models" / "tiny-1core" / "model"
    card = yaml.safe_load((model_dir / "card.yaml").read_text())
    assert card["kind"] == "transfer"
    assert card["n_shot"] == 3
    assert card["metrics"]["heldout"]["n"] == 3
    assert card["onboard"]["tuned_tasks"] > 0
    # the kernel model: the shots' kernels summed from the device's own records
    assert card["kernels"]["n_samples"] == 3
    assert card["metrics"]["kernels_heldout"]["n"] == 3
    return card, model_dir, out


def test_onboarding_a_tiny_device_end_to_end_with_a_small_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole command in CI: only the base tuned ahead (each candidate's new kernels are
    tuned as it is measured), 3 fitted, 3 validated, the kernel model from the device's own
    records, and a second run that measures and tunes nothing. The source is named, not
    seeded (the seeded path is the long test's; the tiny model has no task in the seed's
    database)."""
    work = tmp_path / "work"
    args = _onboard_args(
        tmp_path, "--tune-models", "0", "--kernel-models", "0", "--source", "x86-avx2-2core",
        seeded=False,
    )  # fmt: skip
    # the candidates' kernels are tuned on the device while measured: the kernel model fits
    card, model_dir, _ = _onboarded(args, work, capsys, monkeypatch)
    assert card["onboard"]["tuned_models"] == 1  # the base; nothing else ahead
    store = MeasurementStore(work / "measurements" / "tiny-1core")
    measured = len(store.files())
    assert 6 <= measured <= 12  # a noisy one (CV above max_cv) is measured once more
    assert (work / "tuning" / "tiny-1core" / "database_tuning_record.json").stat().st_size > 0
    device = load_profile(tmp_path / "tiny-1core.yaml")  # the one _onboard_args wrote
    assert isinstance(load_for(device, directory=model_dir), TransferModel)
    code, out2, err2 = run_voxfit(args, capsys, monkeypatch)
    assert code == 0, err2[-3000:]
    assert len(store.files()) == measured
    assert "tuned 0 tasks" in out2


@pytest.mark.long
def test_onboarding_a_tiny_device_through_the_cli_fits_validates_and_resumes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_manifest: Manifest,
) -> None:
    """Seeded onboarding with its kernel table, resumed; then a search on the onboarded
    device, whose exported bundle's report says its library was tuned on the device."""
    work = tmp_path / "work"
    args = _onboard_args(tmp_path, "--tune-models", "1", "--kernel-models", "2")
    device = tmp_path / "tiny-1core.yaml"
    card, model_dir, out = _onboarded(args, work, capsys, monkeypatch)
    # the base, one candidate, and two more whose kernels fill the kernel model's table
    assert card["onboard"]["tuned_models"] == 4
    assert card["kernels"]["coef"]["scale"] > 0
    assert (model_dir / "kernels.json").exists()
    assert "kernels" in out
    assert card["host"]["cores"] >= 1
    store = MeasurementStore(work / "measurements" / "tiny-1core")
    # 6 candidates; a noisy one (CV above max_cv on a loaded host) is measured once more
    measured = len(store.files())
    assert 6 <= measured <= 12
    # the tuning records are the device's own (its database under the work folder)
    assert (work / "tuning" / "tiny-1core" / "database_tuning_record.json").stat().st_size > 0
    model = load_for(load_profile(device), directory=model_dir)
    assert isinstance(model, TransferModel)
    # a search's predictor: the kernel model, over the device's records of the base's tasks
    from voxfit.cost_models import load_predictor
    from voxfit.cost_models._estimator import KernelPredictor
    from voxfit.models import build_model, default_config

    pred = load_predictor(load_profile(device), directory=model_dir)
    assert isinstance(pred, KernelPredictor)
    try:
        base = build_model(default_config("tdnn", 55, "tiny")).eval()
        p = pred.predict(base, 100)
    finally:
        pred.close()
    assert pred.counts == {"kernels": 1, "estimated": 0, "transfer": 0}
    assert 0 < p.ms < 100
    assert not p.low_confidence
    # resumed: nothing measured or tuned again
    code, out2, err2 = run_voxfit(args, capsys, monkeypatch)
    assert code == 0, err2[-3000:]
    assert len(store.files()) == measured
    assert "tuned 0 tasks" in out2
    # a search on the onboarded device (its model and records from the work folder), then
    # a bundle: the library runs the device's own schedules, and its report says so
    db = f"sqlite:///{tmp_path}/studies.db"
    common = ["--storage", db, "--work", str(work), "--cost-models", str(ROOT / "cost_models")]
    code, out3, err3 = run_voxfit(
        ["search", "--space", str(tmp_path / "space.yaml"), "--profile", str(device),
         "--preset", "tiny", "--manifest", str(tiny_manifest.source), "--trials", "3",
         "--study", "onboarded", "--no-peer", *common],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, err3[-3000:]
    assert "Pareto front of onboarded" in out3
    code, out4, err4 = run_voxfit(
        ["export", "--study", "onboarded", "--trial", "1", "--out", str(tmp_path / "bundles"),
         *common],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 0, err4[-3000:]
    report = json.loads(
        (tmp_path / "bundles" / "onboarded" / "trial-1" / "report.json").read_text()
    )
    tuning = report["tvm"]["tuning"]
    assert tuning["measured_by"] == "local"  # this device's runner (a local 1-core profile)
    assert tuning["seeded_from"] == "x86-avx2-2core"
    assert tuning["tuned_for_this_device"] > 0
    assert tuning["tuned_for_this_device"] + len(tuning["seeded_tasks"]) == tuning["tasks"]


def test_onboarding_needs_a_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load(_tiny_device(tmp_path).read_text())
    raw["tuning"].pop("seed_from")
    f = tmp_path / "no-source.yaml"
    f.write_text(yaml.safe_dump(raw))
    code, _, err = run_voxfit(["device", "onboard", str(f), "--preset", "tiny"], capsys,
                              monkeypatch)  # fmt: skip
    assert code == 2
    assert "no --source and no tuning.seed_from" in err


def test_onboarding_a_device_that_is_not_there_is_one_line_naming_tracker_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from voxfit.latency._farm import free_port

    raw = yaml.safe_load((ROOT / "src/voxfit/hw_profiles/shipped/x86-64-sse-rpc.yaml").read_text())
    port = free_port()  # nothing listens there
    raw["measurement"]["rpc"].update(tracker_port=port, connect_timeout_s=3)
    f = tmp_path / "gone.yaml"
    f.write_text(yaml.safe_dump(raw))
    code, _, err = run_voxfit(
        ["device", "onboard", str(f), "--preset", "tiny", "--n", "3", "--validate", "0",
         "--work", str(tmp_path / "work"), "--cost-models", str(ROOT / "cost_models")],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in err
    assert "x86-64-sse" in err
    assert "Traceback" not in err, line


class _NoisyOnce:
    """Stands in for the device's estimator: each candidate's first measurement has an
    unsteady ratio to the base (a busy host), the second a steady one."""

    seen: dict[int, int] = {}

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> _NoisyOnce:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def estimate(self, model: object, inputs: object) -> list[object]:
        from voxfit.latency import LatencyResult

        n = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
        times = self.seen[n] = self.seen.get(n, 0) + 1
        return [
            LatencyResult(
                profile="tiny-1core",
                input=i.name,
                frames=i.frames,
                method="local",
                median_ms=1.0,
                iqr_ms=0.01,
                repeats=3,
                reference_ms=2.0,
                relative=0.5,
                relative_iqr=0.4 if times == 1 else 0.01,
            )  # fmt: skip
            for i in inputs  # type: ignore[attr-defined]
        ]


def test_a_noisy_measurement_is_repeated_in_the_same_run_so_a_resume_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voxfit.cost_models import _onboard
    from voxfit.models import build_model, default_config
    from voxfit.spaces import find_space

    monkeypatch.setattr(_onboard, "_estimator", lambda *a, **k: _NoisyOnce())
    _NoisyOnce.seen = {}
    profile = load_profile(_tiny_device(tmp_path))
    base = build_model(default_config("tdnn", 20, "tiny")).eval()
    bound = find_space("tdnn-default").bind(base.structure())
    shots, _ = _onboard.split_candidates(bound, 3, 0, seed=5)
    store = MeasurementStore(tmp_path / "store")
    kw = {"work": tmp_path / "w", "cost_models_dir": tmp_path / "cm"}
    measured, failed = _onboard.measure_candidates(base, shots, profile, store, **kw)
    assert (measured, failed) == (2 * len(shots), 0)  # each once noisy, once steady
    assert len(store.files()) == 2 * len(shots)
    assert len(store.load()[0]) == len(shots)  # the steady measurement replaces the noisy
    assert _onboard.measure_candidates(base, shots, profile, store, **kw) == (0, 0)
