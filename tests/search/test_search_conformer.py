"""The Conformer searched end to end on the tiny setup (real corpus, model, Optuna storage,
TVM): baselines and a sampled candidate measured, a bundle exported and verified by the
CLI, onnxruntime and the TVM library both computing the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests._tiny import CI_TINY_CONFORMER_SPACE
from voxfit.data import Manifest
from voxfit.hw_profiles import host_cpu_flags
from voxfit.latency import features_beyond
from voxfit.search import record_of

pytestmark = [pytest.mark.slow, pytest.mark.tvm]
ROOT = Path(__file__).resolve().parents[2]


def _cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxfit.cli", *args], cwd=ROOT, text=True, capture_output=True,
        timeout=1200, check=False,
    )  # fmt: skip


def test_a_tiny_conformer_study_searches_exports_and_verifies(
    tiny_manifest: Manifest, tmp_path: Path
) -> None:
    prof = yaml.safe_load((ROOT / "hw_profiles" / "x86-avx2-2core.yaml").read_text())
    prof.update(name="ci-cpu", inputs=prof["inputs"][:1], latency_budget_ms=1000.0)
    prof["measurement"].update(repeats=3, min_repeat_ms=5, warmup=1)
    prof["tuning"].update(trials_per_task=0, database_dir=str(tmp_path / "tuning"))
    (tmp_path / "ci-cpu.yaml").write_text(yaml.safe_dump(prof))
    (tmp_path / "space.yaml").write_text(CI_TINY_CONFORMER_SPACE)
    storage = f"sqlite:///{tmp_path}/studies.db"
    common = ["--storage", storage, "--work", str(tmp_path / "work"),
              "--cost-models", str(tmp_path / "cm")]  # fmt: skip
    r = _cli(["search", "--space", str(tmp_path / "space.yaml"),
              "--profile", str(tmp_path / "ci-cpu.yaml"), "--preset", "tiny",
              "--model", "conformer", "--manifest", str(tiny_manifest.source),
              "--trials", "4", "--study", "conf", *common])  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    study = optuna.load_study(study_name="conf", storage=storage)
    assert study.user_attrs["model"] == "conformer"
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    recs = [record_of(t) for t in trials]
    assert [r.baseline for r in recs[:3]] == ["fp32", "int8", "prune50"]
    for rec in recs:
        assert rec.latency.source == "measured"  # no cost model here: every trial measured
        assert rec.accuracy.dev_per is not None
        assert rec.accuracy.post_adapt_per is not None
    assert recs[1].size_mb < recs[0].size_mb / 3  # 8-bit weights
    # the peer, timed back to back with the base's TVM library, scales the front
    peer = study.user_attrs["peer"]
    assert len(peer["rounds"]) == 3
    assert all(r["peer_ms"] > 0 and r["tvm_base_ms"] > 0 for r in peer["rounds"])
    # onnxruntime ran at the profile's ISA (haswell): what this host has beyond it was hidden
    beyond = features_beyond(prof["target"], host_cpu_flags())
    if "cpuid_fault" in host_cpu_flags():
        assert peer["isa"] == {"mcpu": "haswell", "hidden": list(beyond), "beyond_target": []}
    else:
        assert peer["isa"]["beyond_target"] == list(beyond)
    assert "x ORT int8 base" in r.stdout
    from voxfit.search import front_table, peer_latency_ms

    on_scale = peer_latency_ms(study)
    assert on_scale == pytest.approx(
        study.user_attrs["base"]["latency_ms"] * peer["ratio_to_tvm_base"]
    )
    for row in front_table(study):
        assert row["vs_peer"] == pytest.approx(on_scale / row["latency_ms"])
    # the pruned baseline has fewer heads or FFN units: a smaller model
    assert recs[2].params < recs[0].params

    # the int8 baseline: 8-bit weights feeding MatMuls, float activations (the plan)
    n = trials[1].number
    r = _cli(["export", "--study", "conf", "--trial", str(n), "--out", str(tmp_path / "b"),
              *common])  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    bundle = tmp_path / "b" / "conf" / f"trial-{n}"
    rep = json.loads((bundle / "report.json").read_text())
    assert rep["onnx"]["int8_layers"]
    assert rep["onnx"]["max_abs_diff"] < 1e-3  # onnxruntime as the bundle says to run it
    assert rep["tvm"]["max_abs_diff_vs_torch"] < 1e-3
    fe = json.loads((bundle / "frontend.json").read_text())
    assert fe["onnxruntime"]["session_config"]  # how to run model.onnx as planned
    r = _cli(["verify", str(bundle)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "conformance onnxruntime: frame agreement 1.000" in r.stdout
    assert "conformance tvm: frame agreement" in r.stdout
