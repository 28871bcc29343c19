"""Shared fixtures: the tiny synthesized corpus and its features (made once per session),
the tiny model and the structure of the default-sized one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import nn

from tests._tiny import tiny_tdnn
from voxfit.data import FeatureStore, Manifest, PhoneInventory, load_manifest, make_corpus, preset
from voxfit.search._postgres import PostgresMissing, PostgresServer, find_postgres, local_postgres
from voxfit.structure import ModelStructure

NEEDS_TTS = pytest.mark.skipif(
    not all(shutil.which(c) for c in ("espeak-ng", "flite", "sox")),
    reason="needs espeak-ng, flite and sox (make test installs them)",
)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server, started once per session in a fresh folder under /tmp on a
    free port, stopped and removed afterwards; skipped (with the reason) only where the
    server programs are not installed."""
    try:
        find_postgres()
    except PostgresMissing as e:
        pytest.skip(str(e))
    with local_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    if not all(shutil.which(c) for c in ("espeak-ng", "flite", "sox")):
        pytest.skip("needs espeak-ng, flite and sox (make test installs them)")
    root = tmp_path_factory.mktemp("corpus")
    return load_manifest(make_corpus(preset("tiny"), root, workers=2))


@pytest.fixture(scope="session")
def tiny_store(tiny_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    return FeatureStore(tiny_manifest, tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="session")
def tiny_inventory(tiny_manifest: Manifest) -> PhoneInventory:
    return PhoneInventory.from_sequences(u.phones for u in tiny_manifest.utterances)


@pytest.fixture
def wav_file(tmp_path: Path) -> Path:
    """A 0.5 s 440 Hz mono 16-bit wav at 16 kHz."""
    import wave

    import numpy as np

    t = np.arange(8000) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    p = tmp_path / "tone.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return p


@pytest.fixture
def tiny_model() -> nn.Module:
    """A fresh tiny ``tdnn`` (12 outputs, seed 0, varied BatchNorm statistics)."""
    return tiny_tdnn()


@pytest.fixture(scope="session")
def tdnn_structure() -> ModelStructure:
    """The declared structure of a tiny ``tdnn`` with the corpus's 55 outputs."""
    return tiny_tdnn(55, varied_bn=False).structure()
