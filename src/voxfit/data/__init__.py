"""The speech corpus: synthesis, manifest, phone labels and log-mel features."""

from voxfit.data._batches import Batch, batches, collate
from voxfit.data._corpus import (
    PRESETS,
    CorpusConfig,
    SpeakerSpec,
    make_corpus,
    preset,
    settings_hash,
    speaker_specs,
)
from voxfit.data._features import (
    FeatureConfig,
    FeatureStore,
    frontend_reference_source,
    frontend_spec,
    log_mel,
)
from voxfit.data._manifest import (
    SPLITS,
    Manifest,
    Utterance,
    load_manifest,
    read_wav,
    write_manifest,
)
from voxfit.data._phones import PhoneInventory, normalize_phone, phonemize

__all__ = [
    "Batch",
    "batches",
    "collate",
    "PRESETS",
    "SPLITS",
    "CorpusConfig",
    "FeatureConfig",
    "FeatureStore",
    "Manifest",
    "PhoneInventory",
    "SpeakerSpec",
    "Utterance",
    "frontend_reference_source",
    "frontend_spec",
    "load_manifest",
    "log_mel",
    "make_corpus",
    "normalize_phone",
    "phonemize",
    "preset",
    "read_wav",
    "settings_hash",
    "speaker_specs",
    "write_manifest",
]
