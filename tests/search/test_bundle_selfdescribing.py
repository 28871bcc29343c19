"""A bundle describes itself: front end, phones, decoder, conformance pair, adapters.

A small bundle is written from a tiny compressed model and a synthetic wav (no TTS, no TVM);
its ``frontend.py`` and ``decode.py`` run as a device would run them: ``python -I``, with
numpy alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._tiny import tiny_tdnn
from voxfit.compress import apply, export_onnx
from voxfit.data import (
    FeatureConfig,
    PhoneInventory,
    Utterance,
    frontend_reference_source,
    frontend_spec,
    log_mel,
)
from voxfit.data._features import load_samples
from voxfit.metrics import greedy_decode
from voxfit.plan import AdapterPlan, Candidate, LayerPlan
from voxfit.search import check_bundle, verify_bundle, write_manifest
from voxfit.search._bundle import _adapter_arrays
from voxfit.search._bundle_describe import (
    FEATURES_MAX_ABS_DIFF,
    MAX_ABS_DIFF,
    MAX_PROB_DIFF_ACT_QUANT,
    write_self_description,
)
from voxfit.train import AdaptConfig

FRAMES = 100
PHONES = ("a", "b", "d", "e", "f", "i", "k", "m", "n", "o", "s")


def _wav(path: Path, seconds: float, seed: int = 0) -> Path:
    """A speech-like signal: a gliding tone with noise bursts and a silent gap (int16)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (200 + 800 * t) * t) + 0.05 * rng.standard_normal(t.size)
    x[4000:5600] = 0.0  # digital silence: the log offset matters there
    pcm = np.clip(x * 32768, -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def utt(tmp_path_factory: pytest.TempPathFactory) -> Utterance:
    wav = _wav(tmp_path_factory.mktemp("audio") / "u1.wav", 1.7)
    return Utterance(str(wav), "spk1", "dev", ("a", "b"), "ab", 1.7)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, utt: Utterance) -> Path:
    base = tiny_tdnn(len(PHONES) + 1)
    layers = base.structure().quantizable
    plan = Candidate(
        layers=(LayerPlan(layers[0], 8), LayerPlan(layers[1], 4)),
        adapters=(AdapterPlan(base.structure().adapter_slots[0].name, 4),),
    )
    model = apply(base, plan)
    with torch.no_grad():  # a trained adapter: its output is no longer zero
        for m in model.modules():
            if hasattr(m, "up") and isinstance(m.up, torch.nn.Linear):
                m.up.weight.normal_(0, 0.1)
    b = tmp_path_factory.mktemp("bundle") / "trial-0"
    b.mkdir()
    export_onnx(model, b / "model.onnx")
    arrays = _adapter_arrays(model)
    np.savez(b / "adapters.npz", **arrays)  # type: ignore[arg-type]
    info = write_self_description(
        b,
        model,
        cand=plan,
        inventory=PhoneInventory(PHONES),
        feature_cfg=FeatureConfig(),
        frames=FRAMES,
        adapters=arrays,
        adapt=AdaptConfig(),
    )
    (b / "info.json").write_text(json.dumps(info))
    write_manifest(b)
    return b


def _run(bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-I", *args], cwd=bundle, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r


def test_frontend_json_holds_every_feature_setting_and_the_layouts(bundle: Path) -> None:
    spec = json.loads((bundle / "frontend.json").read_text())
    assert spec == json.loads(json.dumps({**frontend_spec(), **spec}))  # spec is a superset
    assert spec["feature_config"] == asdict(FeatureConfig())
    assert spec["schema_version"] == 1
    assert len(spec["mel"]["edges_hz"]) == 82
    assert spec["output"]["frame_shift_ms"] == 10.0
    assert spec["model_output"]["frame_shift_ms"] == 20.0
    assert spec["model_input"]["feats"]["shape"] == ["batch", "frames", 80]
    assert spec["model_input"]["lengths"]["dtype"] == "int64"
    assert (bundle / "frontend.py").read_text() == frontend_reference_source()


def test_numpy_frontend_in_isolation_reproduces_voxfits_features(
    bundle: Path, utt: Utterance, tmp_path: Path
) -> None:
    """Only numpy, frontend.json and frontend.py: features of the whole utterance and of the
    conformance wav equal voxfit's within FEATURES_MAX_ABS_DIFF (measured ~1e-5)."""
    probe = (
        "import sys, runpy; ns = runpy.run_path('frontend.py', run_name='frontend');"
        "import numpy as np; spec = ns['load_spec']();"
        "np.save(sys.argv[2], ns['log_mel'](ns['read_wav'](sys.argv[1], spec), spec));"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'voxfit')];"
        "assert not bad, bad"
    )
    _run(bundle, "-c", probe, utt.path, str(tmp_path / "whole.npy"))
    want = log_mel(load_samples(utt, FeatureConfig())).numpy()
    got = np.load(tmp_path / "whole.npy")
    assert got.shape == want.shape == (1 + 27200 // 160, 80)
    assert np.max(np.abs(got - want)) <= FEATURES_MAX_ABS_DIFF
    # the bundle's CLI, on its conformance wav: the model input it ships
    _run(bundle, "frontend.py", "conformance/audio.wav", str(tmp_path / "conf.npy"))
    conf = np.load(bundle / "conformance" / "input.npy")
    assert conf.shape == (1, FRAMES, 80)
    assert np.max(np.abs(np.load(tmp_path / "conf.npy") - conf)) <= FEATURES_MAX_ABS_DIFF


def test_the_frontend_follows_the_config_it_is_given() -> None:
    """One source of truth: another FeatureConfig changes the spec and the numpy result alike."""
    ns: dict[str, object] = {}
    exec(compile(frontend_reference_source(), "frontend.py", "exec"), ns)  # noqa: S102
    cfg = FeatureConfig(n_mels=40, n_fft=400, hop_samples=80, fmax_hz=8000.0)
    spec = json.loads(json.dumps(frontend_spec(cfg)))
    x = np.random.default_rng(1).standard_normal(9000).astype(np.float32) * 0.1
    got = ns["log_mel"](x, spec)  # type: ignore[operator]
    want = log_mel(torch.from_numpy(x), cfg).numpy()
    assert got.shape == want.shape == (1 + 9000 // 80, 40)
    assert np.max(np.abs(got - want)) <= FEATURES_MAX_ABS_DIFF


def test_phones_json_is_the_inventory_with_the_blank_first(bundle: Path) -> None:
    phones = json.loads((bundle / "phones.json").read_text())
    assert phones["blank_index"] == 0
    assert phones["symbols"] == ["<blank>", *PHONES]
    lp = np.load(bundle / "conformance" / "expected_log_probs.npy")
    assert phones["n_outputs"] == lp.shape[-1] == len(PHONES) + 1


def test_decode_py_gives_voxfits_greedy_decoding_of_the_conformance_output(bundle: Path) -> None:
    conf = "conformance/expected"
    r = _run(bundle, "decode.py", f"{conf}_log_probs.npy", f"{conf}_lengths.npy")
    lp = torch.from_numpy(np.load(bundle / "conformance" / "expected_log_probs.npy"))
    lens = torch.from_numpy(np.load(bundle / "conformance" / "expected_lengths.npy"))
    (ids,) = greedy_decode(lp, lens)
    want = PhoneInventory(PHONES).decode(ids)
    assert len(want) >= 2  # a non-trivial sequence, not an all-blank output
    assert r.stdout.split() == want
    assert json.loads((bundle / "conformance" / "expected.json").read_text())["phones"] == want


def test_decoder_equals_greedy_decode_on_random_outputs(bundle: Path) -> None:
    ns: dict[str, object] = {}
    exec(compile((bundle / "decode.py").read_text(), "decode.py", "exec"), ns)  # noqa: S102
    rng = np.random.default_rng(0)
    for _ in range(50):
        # few classes and peaky frames: many repeats and blanks to merge and drop
        lp = rng.standard_normal((2, 30, 4)).astype(np.float32) * 3
        lens = rng.integers(0, 31, size=2)
        want = greedy_decode(torch.from_numpy(lp), torch.from_numpy(lens))
        got = [ns["greedy_ctc"](lp[i], lens[i], 0) for i in range(2)]  # type: ignore[operator]
        assert got == want


def test_an_intact_bundle_conforms_and_a_changed_output_is_a_problem(bundle: Path) -> None:
    checked = check_bundle(bundle)
    assert checked.problems == []
    by = {c.runtime: c for c in checked.conformance}
    assert by["frontend"].max_abs_diff is not None
    assert by["frontend"].max_abs_diff <= FEATURES_MAX_ABS_DIFF
    assert by["onnxruntime"].frame_agreement == 1.0
    assert by["onnxruntime"].max_abs_diff is not None
    assert by["onnxruntime"].max_abs_diff <= MAX_ABS_DIFF
    assert by["tvm"].skipped  # no report.json, no library: said, not silently dropped
    assert verify_bundle(bundle, run_models=False) == []


def test_a_changed_expected_output_or_audio_is_reported(bundle: Path, tmp_path: Path) -> None:
    import shutil

    b = tmp_path / "copy"
    shutil.copytree(bundle, b)
    lp_path = b / "conformance" / "expected_log_probs.npy"
    lp = np.load(lp_path)
    lp[0, :5] = lp[0, :5, ::-1]  # five frames with another best class
    np.save(lp_path, lp)
    wav = b / "conformance" / "audio.wav"
    _wav(wav, (FRAMES - 1) * 160 / 16000, seed=7)
    write_manifest(b)  # the files are listed as they are: only the models can tell
    problems = verify_bundle(b)
    assert any(p.startswith("onnxruntime: conformance output differs") for p in problems)
    assert any(p.startswith("frontend: frontend.py's features") for p in problems)
    assert all("\n" not in p for p in problems)


def test_adapters_md_names_every_array_and_the_bytes_per_user(bundle: Path) -> None:
    arrays = dict(np.load(bundle / "adapters.npz"))
    assert arrays
    text = (bundle / "adapters.md").read_text()
    info = json.loads((bundle / "info.json").read_text())
    state = info["adapter_state"]
    assert state["adapter_bytes"] == sum(a.size for a in arrays.values()) * 4
    assert state["training_state_bytes"] == 4 * state["adapter_bytes"]
    for name, a in arrays.items():
        assert f"`{name}` | {' x '.join(map(str, a.shape))}" in text
    assert f"{state['adapter_bytes']} bytes" in text
    assert "CTC" in text
    assert f"learning rate {AdaptConfig().lr}" in text
    assert set(info["files"]) >= {"frontend.json", "phones.json", "conformance/input.npy"}


def test_a_bundle_carries_no_recording_and_no_utterance_text(bundle: Path, utt: Utterance) -> None:
    wavs = [w.relative_to(bundle).as_posix() for w in bundle.rglob("*.wav")]
    assert wavs == ["conformance/audio.wav"]  # the synthetic test signal, nothing else
    expected = json.loads((bundle / "conformance" / "expected.json").read_text())
    assert expected["source"].startswith("synthetic test signal")
    corpus_pcm = Path(utt.path).read_bytes()[44:]
    signal = (bundle / "conformance" / "audio.wav").read_bytes()[44:]
    assert signal[:400] not in corpus_pcm  # not a cut of the corpus audio
    for f in bundle.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".py", ".yaml"):
            text = f.read_text()
            assert Path(utt.path).name not in text, f
            assert utt.speaker not in text, f


def test_runtimes_that_compute_otherwise_are_held_to_their_own_reference(
    tmp_path: Path,
) -> None:
    """A plan whose 8-bit pairs the TVM kernels saturate (onnxruntime does not) and with 8-bit
    activations over float weights (the library does not round that input): each runtime
    gets the reference of what it computes, the torch model's stays what the search scored,
    and a reference outside conformance/ is refused."""
    import shutil

    from voxfit.compress import fake_quant_off, pair_saturation_off

    base = tiny_tdnn(len(PHONES) + 1)
    layers = base.structure().quantizable
    plan = Candidate(layers=(LayerPlan(layers[0], 8, 8), LayerPlan(layers[1], 32, 8)))
    g = torch.Generator().manual_seed(0)
    calib = [(3 * torch.randn(2, 120, 80, generator=g), torch.tensor([120, 90]))]
    model = apply(base, plan, calibration=calib, int8_pair_saturation=True)
    b = tmp_path / "trial-0"
    b.mkdir()
    export_onnx(model, b / "model.onnx")
    write_self_description(
        b,
        model,
        cand=plan,
        inventory=PhoneInventory(PHONES),
        feature_cfg=FeatureConfig(),
        frames=FRAMES,
        adapters={},
        adapt=AdaptConfig(),
        tvm_unrounded=[layers[1]],
    )
    write_manifest(b)
    conf = b / "conformance"
    refs = json.loads((conf / "expected.json").read_text())["references"]
    assert refs["onnxruntime"]["file"] == "expected_log_probs_onnxruntime.npy"
    assert refs["tvm"]["file"] == "expected_log_probs_tvm.npy"
    assert layers[1] in refs["tvm"]["why"]
    x = torch.from_numpy(np.load(conf / "input.npy"))
    n = torch.from_numpy(np.load(conf / "input_lengths.npy"))
    with torch.no_grad():
        searched = model(x, n)[0].numpy()
        with pair_saturation_off(model):
            plain = model(x, n)[0].numpy()
        with fake_quant_off(model, only=[layers[1]]):
            unrounded = model(x, n)[0].numpy()
    np.testing.assert_array_equal(np.load(conf / "expected_log_probs.npy"), searched)
    np.testing.assert_array_equal(np.load(conf / "expected_log_probs_onnxruntime.npy"), plain)
    np.testing.assert_array_equal(np.load(conf / "expected_log_probs_tvm.npy"), unrounded)
    assert np.abs(unrounded - searched).max() > 1e-4  # rounding the input is seen
    by = {c.runtime: c for c in check_bundle(b).conformance}
    assert by["onnxruntime"].error is None, by["onnxruntime"].line()
    assert by["onnxruntime"].max_abs_diff is not None
    assert by["onnxruntime"].max_abs_diff <= 0.1
    bad = tmp_path / "bad"
    shutil.copytree(b, bad)
    exp = json.loads((bad / "conformance" / "expected.json").read_text())
    exp["references"]["tvm"]["file"] = "../model.onnx"
    (bad / "conformance" / "expected.json").write_text(json.dumps(exp))
    write_manifest(bad)
    (problem,) = [c for c in check_bundle(bad).conformance if c.error]
    assert problem.runtime == "conformance"
    assert "references must name files in conformance/" in problem.error


def test_quantized_activation_plans_are_held_to_their_posteriors() -> None:
    """Rounding flips move unlikely classes' log-probs by tenths and the posteriors by
    hundredths: such a plan conforms; a wrong output does not, on either rule."""
    from voxfit.search._bundle_describe import _compare, _Reference

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (1, 50, 20)).astype(np.float32)
    logits[0, np.arange(50), rng.integers(0, 20, 50)] += 8.0  # a clear class per frame
    want = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
    got = want.copy()
    low = want < -5  # classes with p < 0.007 move by up to 0.15 nats
    got[low] += rng.uniform(-0.15, 0.15, low.sum()).astype(np.float32)
    quant = {"min_frame_agreement": 0.99, "max_prob_diff": MAX_PROB_DIFF_ACT_QUANT}
    old = {"min_frame_agreement": 0.99, "max_abs_diff": 0.1}  # bundles written before
    ok = _compare("onnxruntime", got, _Reference(want, 50, quant))
    assert ok.error is None, ok.line()
    assert ok.max_abs_diff is not None
    assert ok.max_abs_diff > 0.1
    assert ok.max_prob_diff is not None
    assert ok.max_prob_diff < 0.01
    assert "max |diff| 0.1" in str(_compare("onnxruntime", got, _Reference(want, 50, old)).error)
    wrong = want[:, :, ::-1].copy()  # classes scrambled: an export that lost its head order
    for tol in (quant, old):
        assert _compare("onnxruntime", wrong, _Reference(want, 50, tol)).error
    shifted = np.log(np.clip(np.exp(want) + 0.08 * (np.arange(20) == 3), 1e-9, None))
    bad = _compare("onnxruntime", shifted.astype(np.float32), _Reference(want, 50, quant))
    assert "max posterior |diff|" in str(bad.error)
