"""Every command the README documents, run for real on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from voxfit.cli import app
from voxfit.data import Manifest

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _work_with_tiny_corpus(tmp_path: Path, tiny_manifest: Manifest) -> Path:
    """A work folder whose corpus cache holds the session's tiny corpus (no re-synthesis)."""
    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / tiny_manifest.source.parent.name).symlink_to(tiny_manifest.source.parent)
    return work


def test_help_lists_the_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("data", "train", "evaluate"):
        assert cmd in res.output


@pytest.mark.slow
def test_data_make_tiny_prints_the_split_table(tmp_path: Path, tiny_manifest: Manifest) -> None:
    res = runner.invoke(app, ["data", "make", "--preset", "tiny", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "manifest:" in res.output
    for split in ("train", "dev", "adapt", "eval"):
        assert split in res.output
    made = next(tmp_path.glob("tiny-*/manifest.jsonl"))
    # same settings, same corpus as the session fixture made elsewhere
    assert made.parent.name == tiny_manifest.source.parent.name


@pytest.mark.slow
def test_train_then_evaluate_tiny(tmp_path: Path, tiny_manifest: Manifest) -> None:
    out = tmp_path / "models"
    res = runner.invoke(
        app,
        [
            "train",
            "--preset",
            "tiny",
            "--manifest",
            str(tiny_manifest.source),
            "--out",
            str(out),
            "--epochs",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "foundation summary" in res.output
    assert "dev PER" in res.output
    ckpt = next(out.glob("tdnn-*/checkpoint.pt"))
    res = runner.invoke(
        app,
        [
            "evaluate",
            str(ckpt),
            "--manifest",
            str(tiny_manifest.source),
            "--preset",
            "tiny",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "held-out speakers" in res.output


def test_unknown_model_kind_is_a_parameter_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "--model", "rnn", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "rnn" in res.output


def test_search_takes_the_space_of_its_model_and_refuses_a_mismatch(tmp_path: Path) -> None:
    from voxfit.errors import ConfigError

    # a space for the other model: refused before any corpus or training
    res = runner.invoke(
        app,
        ["search", "--model", "tdnn", "--space", "conformer-default", "--work", str(tmp_path)],
    )
    assert isinstance(res.exception, ConfigError)
    assert "model: conformer but --model is tdnn" in str(res.exception)
    # --model alone picks <model>-default: an unknown preset fails after that choice (no work)
    res = runner.invoke(
        app, ["search", "--model", "conformer", "--preset", "huge", "--work", str(tmp_path)]
    )
    assert isinstance(res.exception, ConfigError)
    assert "--preset" in str(res.exception)
    res = runner.invoke(app, ["search", "--model", "rnn", "--work", str(tmp_path)])
    assert isinstance(res.exception, ConfigError)  # no rnn-default space
    assert "rnn-default" in str(res.exception)
    missing = tmp_path / "no-such" / "checkpoint.pt"
    res = runner.invoke(app, ["search", "--checkpoint", str(missing), "--work", str(tmp_path)])
    assert isinstance(res.exception, ConfigError)
    assert f"--checkpoint: {missing} is not a file" in str(res.exception)
    res = runner.invoke(app, ["export", "--trial", "3", "--at-most", "4", "--work", str(tmp_path)])
    assert isinstance(res.exception, ConfigError)
    assert "--at-most: only with --pareto" in str(res.exception)
    assert not list(tmp_path.iterdir())  # nothing was made


@pytest.mark.slow
def test_foundation_benchmark_writes_its_figures(tmp_path: Path, tiny_manifest: Manifest) -> None:
    out = tmp_path / "foundation.json"
    # another family's figures, written by an earlier run, stay beside the new ones
    out.write_text(json.dumps({"by_model": {"conformer": {"dev_per": 9.5}}}))
    work = _work_with_tiny_corpus(tmp_path, tiny_manifest)
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "foundation.py"),
            "--preset",
            "tiny",
            "--work",
            str(work),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    figures = json.loads(out.read_text())
    for key in (
        "dev_per",
        "heldout_per_before",
        "heldout_per_after",
        "adapter_param_fraction",
        "train_minutes",
        "n_train_speakers",
        "n_heldout_speakers",
    ):
        assert key in figures
    assert figures["n_train_speakers"] == len(tiny_manifest.speakers("train"))
    assert figures["n_heldout_speakers"] == len(tiny_manifest.speakers("eval"))
    assert 0 < figures["adapter_param_fraction"] < 0.05
    assert figures["by_model"]["conformer"] == {"dev_per": 9.5}
    assert figures["by_model"]["tdnn"]["dev_per"] == figures["dev_per"]


@pytest.mark.long
@pytest.mark.slow
def test_sensitivity_tiny_writes_table_and_heatmap(
    tmp_path: Path, tiny_manifest: Manifest
) -> None:
    corpus = _work_with_tiny_corpus(tmp_path, tiny_manifest) / "corpus"
    report = tmp_path / "sens"
    res = runner.invoke(
        app,
        [
            "sensitivity",
            "--preset",
            "tiny",
            "--corpus-dir",
            str(corpus),
            "--out",
            str(tmp_path / "models"),
            "--report-dir",
            str(report),
            "--keep-ratios",
            "0.5",
            "--weight-bits",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (report / "sensitivity.csv").exists()
    assert (report / "sensitivity.html").exists()
    assert "most sensitive for personalization" in res.output
    bad = runner.invoke(app, ["sensitivity", "--preset", "tiny", "--weight-bits", "4,x"])
    assert bad.exit_code == 2


@pytest.mark.long
@pytest.mark.slow
def test_adaptation_proxy_benchmark_tiny(tmp_path: Path, tiny_manifest: Manifest) -> None:
    work = _work_with_tiny_corpus(tmp_path, tiny_manifest)
    out = tmp_path / "ap.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "adaptation_proxy.py"),
            "--preset",
            "tiny",
            "--work",
            str(work),
            "--out",
            str(out),
            "--channel-multiple",
            "4",
            "--kd-steps",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["n_candidates"] >= 16
    assert len(r["rows"]) == r["n_candidates"]
    for key in (
        "spearman",
        "dev_per_spearman",
        "proxy_cost_fraction",
        "aware_post_adapt_per",
        "magnitude_post_adapt_per",
        "packed_size_ratio_4bit",
    ):
        assert key in r
    assert r["packed_size_ratio_4bit"] <= 1 / 6
    names = [row["name"] for row in r["rows"]]
    assert len(set(names)) == len(names)


def test_profile_check_explains_a_profile_and_rejects_a_broken_one(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["profile", "check", str(ROOT / "hw_profiles" / "arm-cortex-a72-rpi4.yaml")]
    )
    assert res.exit_code == 0, res.output
    for text in ("valid", "rpi4", "aarch64", "TVM target", "cannot run this target"):
        assert text in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nname: x\ntarget: 'llvm -mcpu=haswell'\n")
    res = subprocess.run(
        [str(Path(sys.executable).parent / "voxfit"), "profile", "check", str(bad), "--no-tvm"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert f"{bad}: target:" in res.stderr


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.tvm
def test_latency_benchmark_tiny_without_tuning(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "latency.py"),
            "--size",
            "tiny",
            "--trials",
            "0",
            "--repeats",
            "5",
            "--work",
            str(tmp_path / "work"),
            "--cost-models",
            str(tmp_path / "cm"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    figures = json.loads(out.read_text())
    for key in ("warm_remeasure_s", "pruned50_speedup", "tvm_vs_ort_ratio", "cold_tune_s"):
        assert figures[key] > 0 or key == "cold_tune_s"
    runtimes = {(r["model"], r["runtime"]) for r in figures["rows"]}
    models = {m for m, _ in runtimes}
    assert {"base-fp32", "all50", "w8a8", "hidden25"} <= models
    assert runtimes == {(m, rt) for m in models for rt in ("torch", "onnxruntime", "tvm")}
    assert all(r["median_ms"] > 0 for r in figures["rows"])
    assert out.with_suffix(".html").exists()


def test_shipped_spaces_and_profiles_are_found_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voxfit.errors import ConfigError
    from voxfit.hw_profiles import find_profile, pick_local_profile
    from voxfit.spaces import find_space

    monkeypatch.chdir(tmp_path)  # no spaces/ or hw_profiles/ here
    assert find_space("tdnn-default").name == "tdnn-default"
    assert find_profile("x86-avx2-2core").is_file()
    assert pick_local_profile().measurement.method == "local"
    res = subprocess.run(
        [str(Path(sys.executable).parent / "voxfit"), "profile", "check", "x86-avx2-2core",
         "--no-tvm"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no hardware profile"):
        pick_local_profile(empty)
