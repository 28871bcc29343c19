"""Synthesize the default multi-speaker corpus with Debian TTS engines and sox.

Training speakers are espeak-ng en-us voice variants and one flite voice, each with its own
pitch, rate and a mild sox perturbation. Held-out "new users" are clearly different: other
espeak-ng accents and other flite voices, with stronger effects. Every utterance is labelled
with the canonical en-us phonemes of its text (see :func:`phonemize`).

Generation is deterministic for a seed, runs on a process pool, writes each wav atomically
(so an interrupted run resumes where it stopped) and lives in a folder named by a hash of
its settings, so the same settings are made once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from voxfit._progress import progress_bar
from voxfit.data._manifest import Utterance, write_manifest
from voxfit.data._phones import LABELS_VERSION, phonemize
from voxfit.errors import ConfigError, SynthesisError

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
# Bump when synthesis changes the audio it makes: it is part of the settings hash.
SYNTH_VERSION = 2
Engine = Literal["espeak", "flite"]


@dataclass(frozen=True, slots=True)
class SpeakerSpec:
    """How one synthetic speaker sounds. Units are in the names; 0 / None mean "off"."""

    name: str
    role: Literal["train", "heldout"]
    engine: Engine
    voice: str  # espeak-ng "lang+variant" or a flite voice name
    pitch: int = 50  # espeak-ng -p, 0..99
    rate_wpm: int = 165  # espeak-ng -s
    pitch_shift_cents: int = 0  # sox pitch
    tempo: float = 1.0  # sox tempo -s
    reverb: int = 0  # sox reverb amount, 0..100
    lowpass_hz: int | None = None
    highpass_hz: int | None = None
    noise_snr_db: float | None = None


@dataclass(frozen=True, slots=True)
class CorpusConfig:
    """A corpus preset: how many speakers and utterances, and the seed."""

    name: str
    n_train_speakers: int
    n_train_utts: int  # per training speaker
    n_dev_utts: int  # per training speaker
    n_heldout_speakers: int
    n_adapt_utts: int  # per held-out speaker
    n_eval_utts: int  # per held-out speaker
    min_words: int = 4
    max_words: int = 10
    seed: int = 0
    schema_version: int = 1


PRESETS: dict[str, CorpusConfig] = {
    "tiny": CorpusConfig("tiny", 4, 14, 3, 2, 6, 4, min_words=3, max_words=6),
    "default": CorpusConfig("default", 24, 95, 10, 8, 30, 30),
}

# espeak-ng en-us variants used for training speakers (all ship with espeak-ng-data).
_TRAIN_VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "Alex",
    "Andy",
    "Annie",
    "Gene",
    "Lee",
    "Mike",
    "adam",
    "belinda",
    "david",
    "edward",
    "grandma",
    "john",
    "linda",
    "max",
)

# Held-out "new users": accents and engines the training set never heard, with voice effects.
_HELDOUT: tuple[SpeakerSpec, ...] = (
    SpeakerSpec("new_scotland", "heldout", "espeak", "en-gb-scotland+m3", pitch=40, rate_wpm=160),
    SpeakerSpec(
        "new_caribbean", "heldout", "espeak", "en-029+f2", pitch=60, rate_wpm=170, reverb=30
    ),
    SpeakerSpec("flite_slt", "heldout", "flite", "slt"),
    SpeakerSpec(
        "new_lancaster",
        "heldout",
        "espeak",
        "en-gb-x-gbclan+f4",
        pitch=70,
        pitch_shift_cents=200,
        lowpass_hz=3800,
        highpass_hz=300,
    ),
    SpeakerSpec("flite_rms", "heldout", "flite", "rms", noise_snr_db=20.0),
    SpeakerSpec("new_nyc", "heldout", "espeak", "en-us-nyc+klatt2", pitch=35, rate_wpm=190),
    SpeakerSpec(
        "new_midlands", "heldout", "espeak", "en-gb-x-gbcwmd+m5", rate_wpm=145, tempo=1.15
    ),
    SpeakerSpec("flite_awb", "heldout", "flite", "awb", reverb=40),
    SpeakerSpec("new_rp_whisper", "heldout", "espeak", "en-gb-x-rp+whisper", rate_wpm=150),
    SpeakerSpec(
        "new_scotland_f", "heldout", "espeak", "en-gb-scotland+f5", pitch=80, noise_snr_db=15.0
    ),
)


def _rng(*parts: object) -> random.Random:
    """A Random seeded from a stable hash of ``parts`` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def speaker_specs(cfg: CorpusConfig) -> list[SpeakerSpec]:
    """The speakers of a preset, deterministic for ``cfg.seed``."""
    if cfg.n_heldout_speakers > len(_HELDOUT):
        raise ConfigError(
            f"corpus preset {cfg.name!r}: n_heldout_speakers={cfg.n_heldout_speakers} "
            f"but only {len(_HELDOUT)} held-out voices are defined"
        )
    specs: list[SpeakerSpec] = []
    for i in range(cfg.n_train_speakers):
        r = _rng(cfg.seed, "train-speaker", i)
        effects = {
            "pitch_shift_cents": r.randint(-150, 150),
            "tempo": round(r.uniform(0.92, 1.08), 3),
            "reverb": r.choice([0, 0, 10, 20]),
        }
        noise = r.choice([None, None, 35.0, 30.0])
        if i % 6 == 5:  # one in six training speakers is flite, so the engine is not new per se
            spec = SpeakerSpec(f"spk{i:02d}", "train", "flite", "kal16", noise_snr_db=noise)
        else:
            variant = _TRAIN_VARIANTS[i % len(_TRAIN_VARIANTS)]
            spec = SpeakerSpec(
                f"spk{i:02d}",
                "train",
                "espeak",
                f"en-us+{variant}",
                pitch=r.randint(25, 75),
                rate_wpm=r.randint(140, 190),
                noise_snr_db=noise,
            )
        specs.append(
            replace(
                spec,
                pitch_shift_cents=int(effects["pitch_shift_cents"]),
                tempo=float(effects["tempo"]),
                reverb=int(effects["reverb"]),
            )
        )
    specs.extend(_HELDOUT[: cfg.n_heldout_speakers])
    return specs


def _words() -> list[str]:
    text = resources.files("voxfit.data").joinpath("words.txt").read_text(encoding="utf-8")
    return [w for line in text.splitlines() if not line.startswith("#") for w in line.split()]


@dataclass(frozen=True, slots=True)
class _Job:
    spec: SpeakerSpec
    index: int
    split: str
    text: str
    wav: str


def settings_hash(cfg: CorpusConfig) -> str:
    """Hash of everything that determines the corpus: preset, speakers, vocabulary, engines."""
    payload = {
        "config": asdict(cfg),
        "speakers": [asdict(s) for s in speaker_specs(cfg)],
        "words": hashlib.sha256(" ".join(_words()).encode()).hexdigest(),
        "engines": _engine_versions(),
        "labels_version": LABELS_VERSION,
        "synth_version": SYNTH_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _engine_versions() -> dict[str, str]:
    out = {}
    for cmd in (["espeak-ng", "--version"], ["flite", "--version"], ["sox", "--version"]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as e:
            raise SynthesisError(
                f"{cmd[0]} not found: install espeak-ng, flite and sox "
                "(`make run` does it with apt-get)"
            ) from e
        out[cmd[0]] = (
            (res.stdout or res.stderr).strip().splitlines()[0] if res.stdout or res.stderr else ""
        )
    return out


def _jobs(cfg: CorpusConfig, root: Path) -> list[_Job]:
    words = _words()
    jobs = []
    for spec in speaker_specs(cfg):
        if spec.role == "train":
            splits = ["train"] * cfg.n_train_utts + ["dev"] * cfg.n_dev_utts
        else:
            splits = ["adapt"] * cfg.n_adapt_utts + ["eval"] * cfg.n_eval_utts
        for i, split in enumerate(splits):
            r = _rng(cfg.seed, "text", spec.name, i)
            text = " ".join(
                r.choice(words) for _ in range(r.randint(cfg.min_words, cfg.max_words))
            )
            wav = root / "wavs" / spec.name / f"{i:04d}.wav"
            jobs.append(_Job(spec, i, split, text, str(wav)))
    return jobs


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, capture_output=True, check=True, timeout=120)
    except FileNotFoundError as e:
        raise SynthesisError(f"{cmd[0]} not found (apt-get install {cmd[0]})") from e
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace").strip().splitlines()
        raise SynthesisError(f"{' '.join(cmd[:3])}... failed: {err[-1] if err else e}") from e


def _synthesize(job: _Job) -> tuple[tuple[str, ...], float]:
    """Make one wav (skipped if it exists) and return its phones and duration."""
    phones = tuple(phonemize(job.text))
    dst = Path(job.wav)
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        s = job.spec
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "raw.wav")
            if s.engine == "espeak":
                _run(
                    [
                        "espeak-ng",
                        "-v",
                        s.voice,
                        "-p",
                        str(s.pitch),
                        "-s",
                        str(s.rate_wpm),
                        "-w",
                        raw,
                        job.text,
                    ]
                )
            else:
                _run(["flite", "-voice", s.voice, "-t", job.text, "-o", raw])
            fx = []
            if s.pitch_shift_cents:
                fx += ["pitch", str(s.pitch_shift_cents)]
            if s.tempo != 1.0:
                fx += ["tempo", "-s", str(s.tempo)]
            if s.highpass_hz:
                fx += ["highpass", str(s.highpass_hz)]
            if s.lowpass_hz:
                fx += ["lowpass", str(s.lowpass_hz)]
            if s.reverb:
                fx += ["reverb", str(s.reverb)]
            out = os.path.join(tmp, "out.wav")
            # -R: repeatable mode, so sox's dither noise is the same on every run.
            _run(
                [
                    "sox",
                    "-R",
                    raw,
                    "-r",
                    str(SAMPLE_RATE_HZ),
                    "-c",
                    "1",
                    "-b",
                    "16",
                    out,
                    *fx,
                    "gain",
                    "-n",
                    "-3",
                    "channels",
                    "1",
                ]
            )
            if s.noise_snr_db is not None:
                _add_noise(out, s.noise_snr_db, _rng("noise", job.spec.name, job.index))
            part = dst.with_suffix(".part")
            shutil.move(out, part)
            os.replace(part, dst)  # atomic: a half-written wav never has the final name
    with wave.open(str(dst), "rb") as w:
        duration = w.getnframes() / w.getframerate()
    return phones, duration


def _add_noise(path: str, snr_db: float, r: random.Random) -> None:
    with wave.open(path, "rb") as w:
        params = w.getparams()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    power = float(np.mean(x**2)) if x.size else 0.0
    noise = np.random.default_rng(r.getrandbits(32)).normal(size=x.shape)
    y = x + noise * np.sqrt(power / 10 ** (snr_db / 10))
    with wave.open(path, "wb") as w:
        w.setparams(params)
        w.writeframes(np.clip(y, -32768, 32767).astype(np.int16).tobytes())


def make_corpus(
    cfg: CorpusConfig, out_dir: str | os.PathLike[str], workers: int | None = None
) -> Path:
    """Synthesize ``cfg`` under ``out_dir/<name>-<hash>/`` and return its manifest path.

    Re-running with the same settings returns at once; an interrupted run resumes.

    Raises:
        SynthesisError: an engine is missing or fails.
    """
    root = Path(out_dir).resolve() / f"{cfg.name}-{settings_hash(cfg)}"
    manifest = root / "manifest.jsonl"
    if (root / "DONE").exists() and manifest.exists():
        log.info("corpus %s already made", root)
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    jobs = _jobs(cfg, root)
    workers = workers or min(4, os.cpu_count() or 1)
    results: list[tuple[tuple[str, ...], float]] = []
    with (
        progress_bar() as bar,
        ProcessPoolExecutor(max_workers=workers) as pool,
    ):
        task = bar.add_task(f"synthesizing {cfg.name}", total=len(jobs))
        for res in pool.map(_synthesize, jobs, chunksize=8):
            results.append(res)
            bar.advance(task)
    utts = [
        Utterance(j.wav, j.spec.name, j.split, phones, j.text, round(dur, 3))
        for j, (phones, dur) in zip(jobs, results, strict=True)
    ]
    write_manifest(manifest, utts)
    (root / "settings.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "speakers": [asdict(s) for s in speaker_specs(cfg)],
                "engines": _engine_versions(),
            },
            indent=2,
        )
    )
    (root / "DONE").write_text("ok\n")
    return manifest


def preset(name: str, seed: int | None = None) -> CorpusConfig:
    """Look up a corpus preset by name.

    Raises:
        ConfigError: unknown preset.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown corpus preset {name!r} (choose from {', '.join(PRESETS)})")
    cfg = PRESETS[name]
    return cfg if seed is None else replace(cfg, seed=seed)
