"""Reference log-mel front end of a voxfit model, in numpy only (no torch, no voxfit).

Every number comes from ``frontend.json`` beside this file; port this to the device and
check it against the bundle's conformance pair:

    python frontend.py conformance/audio.wav features.npy   # writes (1, frames, n_mels)

Computed in float64 and returned as float32; voxfit's own features (torch, float32) agree
to about 1e-5 (voxfit's bundle tests allow 1e-4).
"""

from __future__ import annotations

import json
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np


def load_spec(path: str | Path | None = None) -> dict[str, Any]:
    """The front-end spec (default: ``frontend.json`` beside this file)."""
    path = Path(path) if path is not None else Path(__file__).with_name("frontend.json")
    spec: dict[str, Any] = json.loads(path.read_text())
    if spec.get("schema_version") != 1:
        raise ValueError(f"{path}: frontend schema_version {spec.get('schema_version')}, need 1")
    return spec


def read_wav(path: str | Path, spec: dict[str, Any]) -> np.ndarray:
    """Mono 16-bit PCM at the spec's rate as float32 samples (``samples / 32768``)."""
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: need mono 16-bit PCM")
        if w.getframerate() != spec["audio"]["sample_rate_hz"]:
            raise ValueError(
                f"{path}: {w.getframerate()} Hz, need {spec['audio']['sample_rate_hz']} Hz"
            )
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def mel_filterbank(spec: dict[str, Any]) -> np.ndarray:
    """Triangular HTK filters, (n_mels, n_fft // 2 + 1), float64."""
    mel, sr = spec["mel"], spec["audio"]["sample_rate_hz"]
    scale, brk = mel["mel_scale"], mel["mel_break_hz"]

    def hz_to_mel(f: float) -> float:
        return float(scale * np.log10(1.0 + f / brk))

    mels = np.linspace(hz_to_mel(mel["fmin_hz"]), hz_to_mel(mel["fmax_hz"]), mel["n_mels"] + 2)
    edges = brk * (10.0 ** (mels / scale) - 1.0)
    freqs = np.linspace(0.0, sr / 2, spec["stft"]["onesided_bins"])
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(np.minimum(up, down), 0.0)


def log_mel(samples: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Normalized log-mel features (frames, n_mels), float32, of float samples in [-1, 1]."""
    st = spec["stft"]
    n_fft, win, hop = st["n_fft"], st["win_samples"], st["hop_samples"]
    x = np.asarray(samples, dtype=np.float64)
    x = np.pad(x, n_fft // 2, mode="reflect")  # center=True
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left : left + win] = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win) / win)
    n_frames = 1 + (len(x) - n_fft) // hop
    frames = np.stack([x[t * hop : t * hop + n_fft] for t in range(n_frames)])
    spectrum = np.fft.rfft(frames * window, n=n_fft, axis=1)  # (frames, bins)
    power = spectrum.real**2 + spectrum.imag**2
    mel = power @ mel_filterbank(spec).T
    feats = np.log(mel + spec["log"]["offset"])
    mean = feats.mean(axis=0, keepdims=True)
    std = np.maximum(feats.std(axis=0, ddof=1, keepdims=True), spec["normalization"]["std_floor"])
    return ((feats - mean) / std).astype(np.float32)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python frontend.py in.wav out.npy", file=sys.stderr)
        return 2
    spec = load_spec()
    feats = log_mel(read_wav(argv[1], spec), spec)
    np.save(argv[2], feats[None])  # (1, frames, n_mels): the model's input layout
    print(f"{argv[2]}: {feats.shape[0]} frames x {feats.shape[1]} mel bins")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
