"""80-dim log-mel filterbank features in plain torch, cached per manifest.

torchaudio cannot be installed beside torch 2.13, so the STFT and mel filters are computed
here. Features are normalized per utterance (zero mean, unit variance per mel bin) so
loudness and channel differences between engines do not become speaker identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxfit._progress import progress_bar
from voxfit.data._manifest import Manifest, Utterance, read_wav
from voxfit.errors import DataError

log = logging.getLogger(__name__)

# The fixed parts of the front end (not settings: changing one changes every feature).
# ``log_mel`` and ``frontend_spec`` both read them, so the bundle's spec cannot drift.
MEL_SCALE = 2595.0  # HTK: mel = MEL_SCALE * log10(1 + hz / MEL_BREAK_HZ)
MEL_BREAK_HZ = 700.0
LOG_OFFSET = 1e-6  # log(mel power + LOG_OFFSET): finite on digital silence
STD_FLOOR = 1e-3  # per-utterance std is clamped to at least this before dividing
FRONTEND_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class FeatureConfig:
    """Log-mel settings. Window and hop are in samples at ``sample_rate_hz``."""

    sample_rate_hz: int = 16000
    n_mels: int = 80
    n_fft: int = 512
    win_samples: int = 400  # 25 ms
    hop_samples: int = 160  # 10 ms
    fmin_hz: float = 20.0
    fmax_hz: float = 7600.0
    schema_version: int = 1


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return MEL_SCALE * torch.log10(1.0 + f / MEL_BREAK_HZ)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return MEL_BREAK_HZ * (10.0 ** (m / MEL_SCALE) - 1.0)


def _mel_edges_hz(cfg: FeatureConfig) -> torch.Tensor:
    """The n_mels + 2 filter edges (Hz, float64): equally spaced in mel from fmin to fmax."""
    mels = torch.linspace(
        _hz_to_mel(torch.tensor(cfg.fmin_hz)).item(),
        _hz_to_mel(torch.tensor(cfg.fmax_hz)).item(),
        cfg.n_mels + 2,
        dtype=torch.float64,
    )
    return _mel_to_hz(mels)


def mel_filterbank(cfg: FeatureConfig) -> torch.Tensor:
    """Triangular HTK mel filters, shape (n_mels, n_fft // 2 + 1)."""
    n_freqs = cfg.n_fft // 2 + 1
    freqs = torch.linspace(0, cfg.sample_rate_hz / 2, n_freqs, dtype=torch.float64)
    edges = _mel_edges_hz(cfg)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def log_mel(samples: torch.Tensor, cfg: FeatureConfig | None = None) -> torch.Tensor:
    """Normalized log-mel features of a mono waveform.

    Args:
        samples: float waveform in [-1, 1], shape (n_samples,), at ``cfg.sample_rate_hz``.

    Returns:
        Tensor (n_frames, n_mels), float32, each mel bin with zero mean and unit variance
        over the utterance. n_frames = 1 + n_samples // hop (centered STFT).
    """
    cfg = cfg or FeatureConfig()
    window = torch.hann_window(cfg.win_samples, dtype=torch.float32)
    spec = torch.stft(
        samples.float(),
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_samples,
        win_length=cfg.win_samples,
        window=window,
        center=True,
        return_complex=True,
    )
    power = spec.abs().pow(2)  # (freq, frames)
    mel = mel_filterbank(cfg) @ power
    feats = torch.log(mel + LOG_OFFSET).T
    mean = feats.mean(dim=0, keepdim=True)
    std = feats.std(dim=0, keepdim=True).clamp_min(STD_FLOOR)
    return (feats - mean) / std


def frontend_spec(cfg: FeatureConfig | None = None) -> dict[str, Any]:
    """Every setting :func:`log_mel` uses, as plain JSON data (a bundle's ``frontend.json``).

    Enough to reproduce the features from 16-bit PCM without voxfit: ``voxfit.data``'s
    numpy reference (:func:`frontend_reference_source`) computes them from this dict alone.
    Built from ``cfg`` and this module's constants, so it cannot disagree with ``log_mel``.
    """
    cfg = cfg or FeatureConfig()
    hop_ms = 1000.0 * cfg.hop_samples / cfg.sample_rate_hz
    return {
        "schema_version": FRONTEND_SCHEMA_VERSION,
        "feature_config": asdict(cfg),
        "audio": {
            "sample_rate_hz": cfg.sample_rate_hz,
            "channels": 1,
            "sample_format": "int16 PCM (little-endian wav)",
            "to_float": "samples / 32768.0 (float32, in [-1, 1))",
            "other_rates": "resample first; a wav at another rate is an error",
        },
        "stft": {
            "n_fft": cfg.n_fft,
            "win_samples": cfg.win_samples,
            "hop_samples": cfg.hop_samples,
            "window": "hann, periodic: 0.5 - 0.5 * cos(2 * pi * n / win_samples), "
            "n = 0..win_samples-1, zero-padded equally on both sides to n_fft "
            "(left pad (n_fft - win_samples) // 2)",
            "center": True,
            "pad_mode": "reflect (no edge repeat), n_fft // 2 samples at each end",
            "onesided_bins": cfg.n_fft // 2 + 1,
            "magnitude": "power: re^2 + im^2",
            "n_frames": "1 + n_samples // hop_samples",
        },
        "mel": {
            "n_mels": cfg.n_mels,
            "fmin_hz": cfg.fmin_hz,
            "fmax_hz": cfg.fmax_hz,
            "scale": "htk",
            "mel_scale": MEL_SCALE,
            "mel_break_hz": MEL_BREAK_HZ,
            "hz_to_mel": "mel_scale * log10(1 + hz / mel_break_hz)",
            "mel_to_hz": "mel_break_hz * (10 ** (mel / mel_scale) - 1)",
            "edges": "n_mels + 2 points equally spaced in mel from hz_to_mel(fmin_hz) to "
            "hz_to_mel(fmax_hz), mapped back to Hz (float64)",
            "edges_hz": [float(e) for e in _mel_edges_hz(cfg)],
            "bin_hz": "linspace(0, sample_rate_hz / 2, onesided_bins) (float64)",
            "filter": "filter m (edges lo, mid, hi = edges_hz[m], [m+1], [m+2]) at bin "
            "frequency f: max(0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid))); "
            "no area normalization; computed in float64, applied in float32",
            "apply": "mel[m, t] = sum_k filter[m, k] * power[k, t]",
        },
        "log": {"function": "natural log", "offset": LOG_OFFSET, "formula": "log(mel + offset)"},
        "normalization": {
            "kind": "per utterance, per mel bin, over all frames of the utterance",
            "mean": "mean over frames",
            "std": "sample std over frames (ddof=1), clamped to at least std_floor",
            "std_floor": STD_FLOOR,
            "formula": "(x - mean) / max(std, std_floor)",
        },
        "output": {
            "shape": ["frames", cfg.n_mels],
            "dtype": "float32",
            "frame_shift_ms": hop_ms,
            "frame_rate_hz": 1000.0 / hop_ms,
            "window_ms": 1000.0 * cfg.win_samples / cfg.sample_rate_hz,
            "note": "voxfit caches training features as float16; the model was trained and "
            "measured on those, a device computes float32 (the difference is far below "
            "the model's sensitivity)",
        },
    }


def frontend_reference_source() -> str:
    """Source of a numpy-only implementation of :func:`log_mel` driven by
    :func:`frontend_spec`'s dict (a bundle's ``frontend.py``; it imports nothing of voxfit)."""
    return (Path(__file__).with_name("_frontend_reference.py")).read_text()


def load_samples(utt: Utterance, cfg: FeatureConfig) -> torch.Tensor:
    """The utterance's waveform as float32 in [-1, 1].

    Raises:
        DataError: unreadable wav or a sample rate other than ``cfg.sample_rate_hz``.
    """
    if not os.path.isfile(utt.path):
        raise DataError(f"{utt.path}: audio file not found")
    pcm, rate = read_wav(utt.path)
    if rate != cfg.sample_rate_hz:
        raise DataError(
            f"{utt.path}: sample rate {rate} Hz, expected {cfg.sample_rate_hz} Hz "
            f"(resample with `sox in.wav -r {cfg.sample_rate_hz} out.wav`)"
        )
    return torch.from_numpy(np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0)


class FeatureStore:
    """Features of every utterance of a manifest, computed once and cached on disk.

    The cache file name is a hash of the manifest (its resolved path and bytes), the size and
    mtime of every wav it names, and the feature config, so an edited manifest, re-made audio
    or new settings never reuse stale features. Frames are stored as float16
    in one array (memory-mapped on load) with per-utterance offsets.
    """

    def __init__(
        self,
        manifest: Manifest,
        cache_dir: str | os.PathLike[str],
        cfg: FeatureConfig | None = None,
    ) -> None:
        self.cfg = cfg or FeatureConfig()
        self.manifest = manifest
        h = hashlib.sha256(str(manifest.source.resolve()).encode())
        h.update(manifest.source.read_bytes())
        for u in manifest.utterances:
            st = os.stat(u.path) if os.path.exists(u.path) else None
            h.update(
                f"{u.path}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode()
            )
        h.update(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        self.key = h.hexdigest()[:16]
        self.path = Path(cache_dir) / f"features-{self.key}.npz"
        self._index = {u.path: i for i, u in enumerate(manifest.utterances)}
        if not self.path.exists():
            self._compute()
        with np.load(self.path) as z:
            self._frames = z["frames"]
            self._offsets = z["offsets"]

    def _compute(self) -> None:
        utts = self.manifest.utterances
        chunks: list[np.ndarray] = []
        offsets = [0]
        with progress_bar() as bar:
            task = bar.add_task("log-mel features", total=len(utts))
            for u in utts:
                f = log_mel(load_samples(u, self.cfg), self.cfg).numpy().astype(np.float16)
                chunks.append(f)
                offsets.append(offsets[-1] + f.shape[0])
                bar.advance(task)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.stem + ".tmp.npz")
        np.savez(tmp, frames=np.concatenate(chunks), offsets=np.asarray(offsets, np.int64))
        os.replace(tmp, self.path)
        log.info("wrote %s (%d utterances)", self.path, len(utts))

    def __getitem__(self, utt: Utterance) -> torch.Tensor:
        """Features of one utterance of the manifest: float32 (n_frames, n_mels)."""
        i = self._index[utt.path]
        return torch.from_numpy(
            self._frames[self._offsets[i] : self._offsets[i + 1]].astype(np.float32)
        )
