"""Adaptation-aware channel saliency: keep first what the adapted model relies on.

For each held-out speaker, fresh residual adapters are trained briefly on their adaptation
set; then the first-order Taylor saliency |w * dL/dw| of every backbone channel is taken
for that *adapted* model's CTC loss on the same data. Channels whose removal would most
raise the adapted loss of new speakers — the paths that carry voice identity through to the
adapters — score highest. Scores are normalized per speaker (mean 1) and summed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from voxfit.compress._prune import taylor_scores
from voxfit.data import FeatureStore, PhoneInventory, Utterance, batches, collate
from voxfit.errors import ConfigError
from voxfit.models import StructuredModel, group_size
from voxfit.train import AdaptConfig, adapt_speaker, ctc_loss


def adaptation_saliency(
    model: nn.Module,
    speakers: Mapping[str, Sequence[Utterance]],
    store: FeatureStore,
    inventory: PhoneInventory,
    cfg: AdaptConfig,
) -> dict[str, torch.Tensor]:
    """Per-group, per-channel adaptation-aware importance of ``model``'s channels.

    Args:
        speakers: speaker -> adaptation utterances (held-out speakers' ``adapt`` split).
        cfg: the short adaptation run before the gradients are taken.

    Returns:
        group name -> scores of shape (group size,), higher = keep first.

    Raises:
        ConfigError: no speakers.
    """
    if not isinstance(model, StructuredModel):
        raise ConfigError(f"{type(model).__name__} does not declare structure()")
    if not speakers:
        raise ConfigError("adaptation saliency needs at least one held-out speaker")
    structure = model.structure()
    totals = {g.name: torch.zeros(group_size(model, g)) for g in structure.groups}
    for utts in speakers.values():
        adapted = adapt_speaker(model, utts, store, inventory, cfg)
        for p in adapted.parameters():
            p.requires_grad_(True)
            p.grad = None
        for group in batches(utts, cfg.max_batch_s):
            ctc_loss(adapted, collate(group, store, inventory)).backward()
        for g in structure.groups:
            s = taylor_scores(adapted, g)
            totals[g.name] += s / s.mean().clamp_min(1e-12)
    return totals
