"""A user's own model, through the command line alone: a module beside the user with a
factory (``tests/_user_model.py`` copied as ``mymodel.py``), a space over its declared
groups, then ``voxfit train``, ``search``, ``export`` and ``verify`` from that folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from voxfit.data import Manifest
from voxfit.search import record_of

pytestmark = [pytest.mark.slow, pytest.mark.tvm]
ROOT = Path(__file__).resolve().parents[2]
SPACE = """
schema_version: 1
name: my-space
model: mymodel:build
pruning:
  groups: {"layers.*.inner": [0.5, 1.0]}
quantization:
  weight_bits: {"*": [8, 32]}
adapters:
  slots: {"layers.*": [0, 8]}
"""


def test_a_users_model_is_trained_searched_exported_and_verified_by_the_cli(
    tiny_manifest: Manifest, tmp_path: Path
) -> None:
    shutil.copy(ROOT / "tests" / "_user_model.py", tmp_path / "mymodel.py")
    (tmp_path / "space.yaml").write_text(SPACE)
    prof = yaml.safe_load((ROOT / "hw_profiles" / "x86-avx2-2core.yaml").read_text())
    prof.update(name="ci-cpu", inputs=prof["inputs"][:1], latency_budget_ms=1000.0)
    prof["measurement"].update(repeats=3, min_repeat_ms=5, warmup=1)
    prof["tuning"].update(trials_per_task=0, database_dir=str(tmp_path / "tuning"))
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(prof))
    voxfit = str(Path(sys.executable).parent / "voxfit")

    def cli(*args: str) -> str:
        r = subprocess.run(
            [voxfit, *args], cwd=tmp_path, text=True, capture_output=True, timeout=900,
            check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    data = ["--preset", "tiny", "--manifest", str(tiny_manifest.source)]
    out = cli("train", "--model", "mymodel:build", *data, "--out", "work/models")
    assert "held-out PER after adaptation" in out
    (ckpt,) = (tmp_path / "work" / "models").glob("build-*/checkpoint.pt")
    storage = "sqlite:///studies.db"
    out = cli("search", "--model", "mymodel:build", "--space", "space.yaml",
              "--profile", "cpu.yaml", *data, "--trials", "4", "--study", "mine",
              "--storage", storage, "--cost-models", "cm")  # fmt: skip
    assert "Pareto front of mine" in out
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path}/studies.db")
    assert study.user_attrs["model"] == "mymodel:build"
    # the model voxfit train made (the study records it relative to where search ran)
    assert (tmp_path / study.user_attrs["checkpoint"]).resolve() == ckpt.resolve()
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    pruned = record_of(trials[2])  # the prune50 baseline: half of every inner width
    assert pruned.baseline == "prune50"
    assert pruned.params is not None
    assert record_of(trials[0]).params is not None
    assert pruned.params < record_of(trials[0]).params
    n = trials[2].number
    cli("export", "--study", "mine", "--trial", str(n), "--storage", storage,
        "--cost-models", "cm", "--out", "bundles")  # fmt: skip
    bundle = tmp_path / "bundles" / "mine" / f"trial-{n}"
    rep = json.loads((bundle / "report.json").read_text())
    assert rep["tvm"]["max_abs_diff_vs_torch"] < 1e-3
    # the model declares 40 log-mel bins: features, the TVM library and the bundle's front
    # end all use 40
    fe = json.loads((bundle / "frontend.json").read_text())
    assert fe["model_input"]["feats"]["shape"] == ["batch", "frames", 40]
    loader = (bundle / "tvm" / "load_example.py").read_text()
    assert ", 40), dtype=" in loader
    # the loader runs the library with the threads its latency was measured with (TVM's own
    # default is 1 on a 2-core EPYC VM), unless the caller set them
    assert f'setdefault("TVM_NUM_THREADS", "{prof["cores"]}")' in loader
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    said = "\nprint('threads', os.environ['TVM_NUM_THREADS'])"
    (lib,) = (bundle / "tvm").glob("*.so")
    ran = subprocess.run(
        [sys.executable, "-c", loader + said, str(lib)],
        text=True, capture_output=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert f"threads {prof['cores']}" in ran.stdout
    assert "log-probs (1, " in ran.stdout
    out = cli("verify", str(bundle))
    assert "conformance onnxruntime: frame agreement 1.000" in out
    assert "conformance tvm: frame agreement 1.000" in out
    assert "every file matches manifest.json" in out
