"""Training the base model, speaker adaptation, checkpoints and the foundation report."""

# Transitional: PER lives in voxfit.metrics; these names stay here until their users
# (compress._sensitivity, search._context, tests) import voxfit.metrics.
from voxfit.metrics import edit_distance, error_counts, greedy_decode, phone_error_rate
from voxfit.train._adapt import (
    AdaptationResult,
    ProxyConfig,
    SpeakerAdaptation,
    adaptation_proxy,
    heldout_speakers,
    measure_adaptation,
    proxy_speakers,
)
from voxfit.train._batches import Batch, batches, collate
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
    "Batch",
    "Checkpoint",
    "FoundationReport",
    "TrainConfig",
    "TrainHistory",
    "adapt_preset",
    "adapt_speaker",
    "batches",
    "collate",
    "ctc_loss",
    "edit_distance",
    "error_counts",
    "evaluate",
    "evaluate_cached",
    "greedy_decode",
    "load_checkpoint",
    "manifest_hash",
    "phone_error_rate",
    "save_checkpoint",
    "train_base",
    "train_cached",
    "train_preset",
]
