"""The search end to end on the tiny setup: real corpus, model, Optuna storage and TVM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from tests._tiny import CI_TINY_SPACE
from voxfit.data import Manifest
from voxfit.models import count_parameters
from voxfit.search import (
    OBJECTIVES,
    AuditLog,
    check_head,
    front,
    keygen,
    read_signature,
    record_of,
    records,
    verify_bundle,
    verify_log,
    write_manifest,
)

pytestmark = [pytest.mark.slow, pytest.mark.tvm]
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SPACE = CI_TINY_SPACE


@pytest.fixture(scope="module")
def setup(tiny_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search")
    prof = yaml.safe_load((ROOT / "hw_profiles" / "x86-avx2-2core.yaml").read_text())
    prof["name"] = "ci-cpu"
    prof["inputs"] = prof["inputs"][:1]
    prof["latency_budget_ms"] = 1000.0  # untuned code: every candidate fits
    prof["measurement"].update(repeats=3, min_repeat_ms=5, warmup=1)
    # no tuning: the CI budget; the tuned path is tested in tests/compile
    prof["tuning"].update(trials_per_task=0, database_dir=str(root / "tuning"))
    (root / "ci-cpu.yaml").write_text(yaml.safe_dump(prof))
    (root / "ci-tiny.yaml").write_text(SPACE)
    return {"root": root, "manifest": tiny_manifest.source}


def _search(s: dict[str, Path], study: str, trials: int, **kw: object) -> subprocess.Popen[str]:
    root = s["root"]
    cmd = [
        sys.executable, "-m", "voxfit.cli", "search",
        "--space", str(root / "ci-tiny.yaml"),
        "--profile", str(root / "ci-cpu.yaml"),
        "--preset", "tiny",
        "--manifest", str(s["manifest"]),
        "--trials", str(trials),
        "--storage", f"sqlite:///{root}/studies.db",
        "--study", study,
        "--work", str(root / "work"),
        "--cost-models", str(root / "cm"),
        "--no-peer",  # the peer is tested in test_search_conformer.py (CI's budget)
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxfit.cli", *args], cwd=cwd, text=True, capture_output=True,
        timeout=900, check=False,
    )  # fmt: skip


def _load(s: dict[str, Path], study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{s['root']}/studies.db")


def test_search_export_verify_report(setup: dict[str, Path]) -> None:
    p = _search(setup, "e2e", 4)
    out, _ = p.communicate(timeout=1500)
    assert p.returncode == 0, out[-3000:]
    assert "Pareto front of e2e" in out
    study = _load(setup, "e2e")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 4
    # baselines first, then sampled candidates; every trial records plan, metrics, latency
    recs = [record_of(t) for t in trials]
    assert [r.baseline for r in recs[:3]] == ["fp32", "int8", "prune50"]
    quietest = float("inf")
    for t, r in zip(trials, recs, strict=True):
        assert set(t.user_attrs) <= {"record", "baseline"}  # one record, nothing loose
        assert r.version == 1
        assert r.latency.source == "measured"  # no cost model for this profile: all measured
        # the ratio to the base timed alongside, at the quietest base time seen so far
        lat = r.latency
        assert lat.basis == "base"
        assert lat.relative_to_base is not None
        assert lat.base_ms is not None
        quietest = min(quietest, lat.base_ms)
        assert t.values[0] == lat.objective_ms == pytest.approx(lat.relative_to_base * quietest)
        assert t.values[3] == r.size_mb  # size is an objective
        assert r.accuracy.dev_per is not None
        assert r.accuracy.post_adapt_per is not None
        assert r.accuracy.per_speaker
        assert r.constraints is not None
        assert len(r.constraints) == 2  # stored once, by Optuna
    assert study.metric_names == list(OBJECTIVES)
    assert recs[1].size_mb < recs[0].size_mb / 3
    assert study.user_attrs["base"]["trial"] == trials[0].number
    # the measurements went to the work folder's store, one file each; nothing into cm/
    stored = list((setup["root"] / "work" / "measurements" / "ci-cpu").glob("*.json"))
    assert len(stored) == len(trials)
    assert not (setup["root"] / "cm" / "ci-cpu" / "dataset").exists()

    bundles = setup["root"] / "bundles"
    root = setup["root"]
    key, pub = keygen(root / "keys")  # `voxfit keygen` itself: tests/search/test_signing.py
    r = _run(["export", "--study", "e2e", "--trial", str(trials[1].number),
              "--storage", f"sqlite:///{root}/studies.db", "--out", str(bundles),
              "--work", str(root / "work"), "--cost-models", str(root / "cm"),
              "--sign-key", str(key)])  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "(signed)" in r.stdout
    b = bundles / "e2e" / f"trial-{trials[1].number}"
    # no recording and no utterance text of the corpus in a bundle (users' data stays home)
    from voxfit.data import load_manifest

    texts = {u.text for u in load_manifest(setup["manifest"]).utterances if len(u.text) >= 12}
    assert [w.name for w in b.rglob("*.wav")] == ["audio.wav"]  # the synthetic test signal
    for f in b.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".py", ".yaml"):
            body = f.read_text()
            assert not [t for t in texts if t in body], f
    for f in ("plan.yaml", "model.onnx", "adapters.npz", "report.json", "manifest.json",
              "tvm/utterance_1s.so", "tvm/load_example.py", "frontend.json", "frontend.py",
              "phones.json", "decode.py", "adapters.md", "conformance/audio.wav",
              "conformance/input.npy", "conformance/input_lengths.npy",
              "conformance/expected_log_probs.npy", "conformance/expected_lengths.npy",
              "conformance/expected.json"):  # fmt: skip
        assert (b / f).is_file(), f
    rep = json.loads((b / "report.json").read_text())
    assert rep["onnx"]["int8_layers"]  # the int8 baseline is QDQ in ONNX
    assert rep["onnx"]["qdq_nodes"] > 0
    assert rep["onnx"]["argmax_agreement"] > 0.9
    assert rep["tvm"]["max_abs_diff_vs_torch"] < 1e-3
    assert rep["latency"]["source"] == "measured"
    assert rep["latency"]["tvm_version"]
    assert abs(rep["dev_per_rebuilt"] - rep["metrics"]["dev_per"]) < 5.0
    described = rep["self_description"]
    manifest = json.loads((b / "manifest.json").read_text())["files"]
    assert set(described["files"]) <= set(manifest)  # listed in the report, hashed
    assert rep["adapters"]["adapter_bytes"] > 0
    assert rep["adapters"]["training_state_bytes"] == 4 * rep["adapters"]["adapter_bytes"]
    phones = json.loads((b / "phones.json").read_text())
    assert len(phones["symbols"]) == np.load(b / "conformance/expected_log_probs.npy").shape[-1]
    ok = _run(["verify", str(b)])
    assert ok.returncode == 0, ok.stderr[-2000:]
    # the front end, onnxruntime and (ci-cpu runs here) the TVM library each reran the pair
    for runtime in ("frontend", "onnxruntime: frame agreement", "tvm: frame agreement"):
        assert f"conformance {runtime}" in ok.stdout, ok.stdout
    assert "signature not checked" in " ".join(ok.stdout.split())
    _check_signed_and_audited(root, b, pub, trials)
    # a conformance output the models no longer reproduce is a problem, even when re-hashed
    lp_file = b / "conformance" / "expected_log_probs.npy"
    saved = lp_file.read_bytes()
    lp = np.load(lp_file)
    np.save(lp_file, lp[:, :, ::-1].copy())
    write_manifest(b)
    bad = _run(["verify", str(b)])
    assert bad.returncode == 2
    assert "onnxruntime: conformance output differs" in bad.stderr
    assert "tvm: conformance output differs" in bad.stderr
    lp_file.write_bytes(saved)
    write_manifest(b)
    (b / "plan.yaml").write_text((b / "plan.yaml").read_text() + "# edited\n")
    bad = _run(["verify", str(b)])
    assert bad.returncode == 2
    assert "plan.yaml: sha256 differs" in bad.stderr

    html = setup["root"] / "report.html"
    r = _run(["report", "--study", "e2e", "--storage", f"sqlite:///{setup['root']}/studies.db",
              "--out", str(html)])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Pareto" in html.read_text()

    # the README's second Python API block: build a front trial's model, export its bundle
    block = README.read_text().split("## Python API", 1)[1].split("```python\n")[2]
    best = min(front(records(study)), key=lambda r: r.accuracy.post_adapt_per)
    scope: dict[str, object] = {"study": study, "best": best}
    here = Path.cwd()
    os.chdir(root)
    try:
        exec(compile(block.split("```")[0], "README.md:Python API 2", "exec"), scope)  # noqa: S102
    finally:
        os.chdir(here)
    bundle = root / str(scope["bundle"])  # relative to the folder the block ran in
    assert bundle.is_dir()
    assert bundle.name == f"trial-{best.number}"
    assert verify_bundle(bundle) == []
    assert count_parameters(scope["model"]) > 0  # type: ignore[arg-type]


def _check_signed_and_audited(
    root: Path, b: Path, pub: Path, trials: list[optuna.trial.FrozenTrial]
) -> None:
    """The signed e2e bundle verifies with its key (a copy: the caller edits b), a changed
    byte does not; the study's audit log holds the search and the export, chain intact,
    with the head the bundle signed."""
    import shutil

    copy = root / "signed-copy"
    shutil.copytree(b, copy)
    assert verify_bundle(copy, key=pub, run_models=False) == []
    log = AuditLog.of_study(root / "work", "e2e")
    assert verify_log(log.path).ok
    entries = list(log.entries())
    assert entries[0]["event"] == "study_created"
    assert entries[0]["data"]["adaptation_data"]["speakers"]
    done = [e for e in entries if e["event"] == "trial_completed"]
    assert sorted(e["data"]["trial"] for e in done) == [t.number for t in trials]
    assert all(e["data"]["speakers"] for e in done)
    (exported,) = [e for e in entries if e["event"] == "bundle_exported"]
    sig = read_signature(copy)
    assert sig is not None
    assert exported["data"]["manifest_sha256"] == sig["manifest_sha256"]
    assert exported["data"]["signed_by"] == sig["key_fingerprint"]
    assert check_head(log.path, sig["audit_head"]["seq"], sig["audit_head"]["hash"]) is None
    r = _run(["audit", "verify", "--study", "e2e", "--work", str(root / "work"),
              "--bundle", str(copy), "--key", str(pub)])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{len(entries)} entries, chain intact" in " ".join(r.stdout.split())
    onnx = copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 1
    onnx.write_bytes(bytes(data))
    assert "model.onnx: sha256 differs from manifest.json" in verify_bundle(
        copy, key=pub, run_models=False
    )


def _complete(db: Path, study: str) -> dict[int, list[float]]:
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "select t.number, v.objective, v.value from trials t join studies s using(study_id) "
            "join trial_values v using(trial_id) where s.study_name=? and t.state='COMPLETE'",
            (study,),
        ).fetchall()
    out: dict[int, list[float]] = {}
    for n, _, v in sorted(rows):
        out.setdefault(n, []).append(v)
    return out


def test_killed_search_resumes_without_losing_trials(setup: dict[str, Path]) -> None:
    db = setup["root"] / "studies.db"
    p = _search(setup, "killed", 12)
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        time.sleep(2)
        if db.exists() and len(_complete(db, "killed")) >= 2:
            break
        assert p.poll() is None, p.communicate()[0][-3000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    before = _complete(db, "killed")
    assert len(before) >= 2
    p2 = _search(setup, "killed", len(before) + 3)
    out, _ = p2.communicate(timeout=1500)
    assert p2.returncode == 0, out[-3000:]
    after = _complete(db, "killed")
    for n, values in before.items():
        assert after[n] == values  # every completed trial is still there, unchanged
    assert len(after) > len(before)


def test_malformed_space_is_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPACE.replace("stream:", "straem:"))
    r = _run(["search", "--space", str(bad), "--profile", str(setup["root"] / "ci-cpu.yaml"),
              "--preset", "tiny", "--manifest", str(setup["manifest"]),
              "--work", str(setup["root"] / "work"), "--trials", "1",
              "--storage", f"sqlite:///{tmp_path}/x.db"])  # fmt: skip
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr  # checked before any corpus or training work
    assert lines[0].startswith("error:")
    assert "bad.yaml: pruning.groups.straem" in lines[0]
