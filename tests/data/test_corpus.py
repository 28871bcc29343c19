from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import NEEDS_TTS
from voxfit.data import Manifest, load_manifest, make_corpus, preset, settings_hash, speaker_specs
from voxfit.errors import ConfigError


def test_default_preset_meets_the_corpus_requirements() -> None:
    cfg = preset("default")
    specs = speaker_specs(cfg)
    train = [s for s in specs if s.role == "train"]
    held = [s for s in specs if s.role == "heldout"]
    assert len(train) >= 20
    assert len(held) >= 6
    assert cfg.n_adapt_utts >= 20
    assert cfg.n_eval_utts >= 20
    # held-out voices are new: no voice (accent+variant or engine voice) is shared with training
    assert not {s.voice for s in held} & {s.voice for s in train}
    assert {s.engine for s in held} == {"espeak", "flite"}
    assert len({(s.voice, s.pitch, s.rate_wpm, s.pitch_shift_cents) for s in train}) == len(train)


def test_settings_hash_depends_on_seed() -> None:
    assert settings_hash(preset("tiny")) == settings_hash(preset("tiny"))
    assert settings_hash(preset("tiny", seed=1)) != settings_hash(preset("tiny"))


def test_unknown_preset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown corpus preset 'huge'"):
        preset("huge")


@NEEDS_TTS
@pytest.mark.slow
def test_tiny_corpus_has_all_splits_and_16k_audio(tiny_manifest: Manifest) -> None:
    cfg = preset("tiny")
    counts = Counter(u.split for u in tiny_manifest.utterances)
    assert counts == {
        "train": cfg.n_train_speakers * cfg.n_train_utts,
        "dev": cfg.n_train_speakers * cfg.n_dev_utts,
        "adapt": cfg.n_heldout_speakers * cfg.n_adapt_utts,
        "eval": cfg.n_heldout_speakers * cfg.n_eval_utts,
    }
    assert all(0.3 < u.duration_s < 10 for u in tiny_manifest.utterances)
    assert all(u.phones for u in tiny_manifest.utterances)


@NEEDS_TTS
@pytest.mark.slow
def test_generation_is_deterministic_and_resumes(tiny_manifest: Manifest, tmp_path: Path) -> None:
    root = tiny_manifest.source.parent
    victim = Path(tiny_manifest.utterances[5].path)
    original = victim.read_bytes()
    # Simulate an interrupted run: no DONE marker, one wav missing.
    (root / "DONE").unlink()
    victim.unlink()
    again = make_corpus(preset("tiny"), root.parent, workers=1)
    assert again == tiny_manifest.source
    assert victim.read_bytes() == original  # same seed, same bytes
    assert load_manifest(again).utterances == tiny_manifest.utterances
