"""Training the base model, speaker adaptation, checkpoints and the foundation report."""

from voxfit.train._adapt import (
    AdaptationResult,
    ProxyConfig,
    SpeakerAdaptation,
    adaptation_proxy,
    heldout_speakers,
    measure_adaptation,
    proxy_speakers,
)
from voxfit.train._loop import (
    AdaptConfig,
    TrainConfig,
    TrainHistory,
    adapt_speaker,
    ctc_loss,
    train_base,
)
from voxfit.train._pipeline import (
    Checkpoint,
    FoundationReport,
    adapt_preset,
    evaluate,
    evaluate_cached,
    feature_store,
    load_checkpoint,
    manifest_hash,
    save_checkpoint,
    train_cached,
    train_preset,
)

__all__ = [
    "AdaptationResult",
    "ProxyConfig",
    "SpeakerAdaptation",
    "adaptation_proxy",
    "heldout_speakers",
    "measure_adaptation",
    "proxy_speakers",
    "AdaptConfig",
    "Checkpoint",
    "FoundationReport",
    "TrainConfig",
    "TrainHistory",
    "adapt_preset",
    "adapt_speaker",
    "ctc_loss",
    "evaluate",
    "evaluate_cached",
    "load_checkpoint",
    "manifest_hash",
    "save_checkpoint",
    "train_base",
    "feature_store",
    "train_cached",
    "train_preset",
]
