from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from voxfit.data import FeatureConfig, FeatureStore, load_manifest, log_mel
from voxfit.data._features import load_samples, mel_filterbank
from voxfit.errors import DataError


def test_log_mel_shape_and_per_utterance_normalization() -> None:
    x = torch.randn(16000) * 0.1
    f = log_mel(x)
    assert f.shape == (1 + 16000 // 160, 80)
    assert torch.allclose(f.mean(0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(f.std(0), torch.ones(80), atol=1e-2)


def test_mel_filterbank_is_nonnegative_and_covers_the_band() -> None:
    fb = mel_filterbank(FeatureConfig())
    assert fb.shape == (80, 257)
    assert bool((fb >= 0).all())
    assert bool((fb.sum(1) > 0).all())  # every filter sees at least one FFT bin


def test_a_tone_peaks_in_the_mel_band_of_its_frequency() -> None:
    cfg = FeatureConfig()
    t = torch.arange(16000) / 16000
    fb = mel_filterbank(cfg)
    for hz in (300.0, 1000.0, 3000.0):
        window = torch.hann_window(cfg.win_samples)
        spec = (
            torch.stft(
                torch.sin(2 * math.pi * hz * t),
                cfg.n_fft,
                cfg.hop_samples,
                cfg.win_samples,
                window,
                return_complex=True,
            )
            .abs()
            .pow(2)
        )
        peak_bin = int((fb @ spec).mean(1).argmax())
        fft_bin = round(hz / (cfg.sample_rate_hz / cfg.n_fft))
        assert int(fb[:, fft_bin].argmax()) in (peak_bin - 1, peak_bin, peak_bin + 1)


def _manifest(tmp_path: Path, wav: Path) -> Path:
    row = {
        "path": str(wav),
        "speaker": "a",
        "split": "train",
        "phones": "a",
        "text": "a",
        "duration_s": 0.5,
    }
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps(row) + "\n")
    return p


def test_feature_store_caches_and_rekeys_on_manifest_change(
    tmp_path: Path, wav_file: Path
) -> None:
    p = _manifest(tmp_path, wav_file)
    store = FeatureStore(load_manifest(p), tmp_path / "cache")
    utt = store.manifest.utterances[0]
    feats = store[utt]
    assert feats.shape == (1 + 8000 // 160, 80)
    mtime = store.path.stat().st_mtime_ns
    again = FeatureStore(load_manifest(p), tmp_path / "cache")
    assert again.path == store.path
    assert again.path.stat().st_mtime_ns == mtime
    assert torch.equal(again[utt], feats)
    p.write_text(p.read_text().replace('"text": "a"', '"text": "b"'))
    assert FeatureStore(load_manifest(p), tmp_path / "cache").path != store.path


def test_wrong_sample_rate_is_a_clear_error(tmp_path: Path, wav_file: Path) -> None:
    store_cfg = FeatureConfig(sample_rate_hz=8000)
    utt = load_manifest(_manifest(tmp_path, wav_file)).utterances[0]
    with pytest.raises(DataError, match=r"tone\.wav: sample rate 16000 Hz, expected 8000 Hz"):
        load_samples(utt, store_cfg)


def test_not_a_wav_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    utt = load_manifest(_manifest(tmp_path, bad)).utterances[0]
    with pytest.raises(DataError, match=r"bad\.wav: unreadable wav"):
        load_samples(utt, FeatureConfig())
