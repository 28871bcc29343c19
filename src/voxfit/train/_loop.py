"""CTC training of the base model and adapter-only speaker adaptation."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from voxfit._progress import progress_bar
from voxfit.data import Batch, FeatureStore, PhoneInventory, Utterance, batches, collate
from voxfit.errors import ConfigError
from voxfit.metrics import phone_error_rate
from voxfit.models import adapter_parameters, freeze_backbone, insert_adapters

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Base-model training.

    The learning rate warms up, then follows a cosine to zero over the training *progress*:
    the larger of (steps done / steps in ``epochs``) and (minutes spent / ``max_minutes``).
    So on a slow machine the schedule still anneals fully before the time cap stops training.
    """

    epochs: int = 20
    max_minutes: float = 18.0
    warmup: float = 0.08  # fraction of progress
    max_batch_s: float = 100.0  # seconds of audio per batch
    lr: float = 2e-3
    weight_decay: float = 1e-2
    spec_augment: bool = True
    seed: int = 0
    threads: int = 2
    schema_version: int = 1


@dataclass(frozen=True, slots=True)
class AdaptConfig:
    """Per-speaker adaptation: residual adapters of ``bottleneck`` at every slot."""

    bottleneck: int = 24
    steps: int = 150
    lr: float = 3e-3
    max_batch_s: float = 30.0
    seed: int = 0
    schema_version: int = 1


@dataclass(slots=True)
class TrainHistory:
    """Loss per epoch and wall time; ``minutes`` excludes feature extraction."""

    epoch_loss: list[float] = field(default_factory=list)
    minutes: float = 0.0
    steps: int = 0


def _spec_augment(feats: torch.Tensor, lengths: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Two frequency masks (<= 10 bins) and time masks (<= 20 frames, ~1 per 2 s) per utterance."""
    x = feats.clone()
    n_mels = x.shape[2]
    for i in range(x.shape[0]):
        for _ in range(2):
            w = int(torch.randint(0, 11, (1,), generator=g))
            f0 = int(torch.randint(0, n_mels - w + 1, (1,), generator=g))
            x[i, :, f0 : f0 + w] = 0.0
        n = int(lengths[i])
        for _ in range(max(1, n // 200)):
            w = int(torch.randint(0, 21, (1,), generator=g))
            t0 = int(torch.randint(0, max(1, n - w), (1,), generator=g))
            x[i, t0 : t0 + w, :] = 0.0
    return x


def _lr(cfg: TrainConfig, progress: float) -> float:
    if progress < cfg.warmup:
        return cfg.lr * max(progress / cfg.warmup, 0.02)
    frac = (progress - cfg.warmup) / (1.0 - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def ctc_loss(model: nn.Module, b: Batch, feats: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CTC loss per target phone of a batch (blank = 0)."""
    lp, lens = model(b.feats if feats is None else feats, b.lengths)
    return F.ctc_loss(
        lp.transpose(0, 1),
        b.targets,
        lens,
        b.target_lengths,
        blank=0,
        reduction="mean",
        zero_infinity=True,
    )


def train_base(
    model: nn.Module,
    train_utts: Sequence[Utterance],
    store: FeatureStore,
    inventory: PhoneInventory,
    cfg: TrainConfig,
    dev_utts: Sequence[Utterance] = (),
) -> TrainHistory:
    """Train ``model`` in place with CTC, AdamW and a one-cycle schedule; show progress.

    The schedule spans ``cfg.epochs``; if ``cfg.max_minutes`` runs out first, training stops
    early (logged) and the model is left as it is.

    Raises:
        ConfigError: no training utterances.
    """
    if not train_utts:
        raise ConfigError("no training utterances (split 'train' is empty)")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = sum(1 for _ in batches(train_utts, cfg.max_batch_s))
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = TrainHistory()
    start = time.monotonic()
    model.train()
    with progress_bar(info=True) as bar:
        task = bar.add_task("training", total=total, info="")
        progress = 0.0
        for epoch in range(cfg.epochs):
            losses = []
            for group in batches(train_utts, cfg.max_batch_s, rng):
                progress = max(
                    hist.steps / total, (time.monotonic() - start) / 60 / cfg.max_minutes
                )
                if progress >= 1.0:
                    break
                for pg in opt.param_groups:
                    pg["lr"] = _lr(cfg, progress)
                b = collate(group, store, inventory)
                feats = _spec_augment(b.feats, b.lengths, g) if cfg.spec_augment else None
                loss = ctc_loss(model, b, feats)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                hist.steps += 1
                losses.append(loss.item())
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {losses[-1]:.3f}")
            if losses:
                hist.epoch_loss.append(sum(losses) / len(losses))
                msg = f"epoch {epoch + 1}: loss {hist.epoch_loss[-1]:.3f}"
                if dev_utts and (epoch % 4 == 3 or progress >= 1.0 or epoch == cfg.epochs - 1):
                    msg += f", dev PER {phone_error_rate(model, dev_utts, store, inventory):.2f}%"
                log.info(msg)
            if progress >= 1.0:
                log.warning(
                    "stopped in epoch %d: max_minutes=%s reached", epoch + 1, cfg.max_minutes
                )
                break
    hist.minutes = (time.monotonic() - start) / 60
    model.eval()
    return hist


def adapt_speaker(
    model: nn.Module,
    adapt_utts: Sequence[Utterance],
    store: FeatureStore,
    inventory: PhoneInventory,
    cfg: AdaptConfig,
    slots: Sequence[str] | None = None,
) -> nn.Module:
    """A copy of ``model`` with its adapters trained on one speaker's utterances.

    A model that already carries adapters (e.g. from ``compress.apply``) has a copy of those
    trained; otherwise residual adapters of ``cfg.bottleneck`` are inserted at ``slots``
    (default: every declared slot). Only adapter parameters train; the backbone stays in eval
    mode (frozen BatchNorm statistics, no dropout), as on a device that personalizes a
    shipped model.

    Args:
        slots: adapter slot names for a model without adapters (default: every slot; pass
            an empty list to measure a plan that has no adapters: nothing is trained).
    """
    if not adapt_utts:
        raise ConfigError("speaker has no adaptation utterances")
    if adapter_parameters(model):
        adapted = copy.deepcopy(model)
    else:
        names = slots if slots is not None else [s.name for s in model.structure().adapter_slots]  # type: ignore[operator]
        adapted = insert_adapters(model, {n: cfg.bottleneck for n in names})
    freeze_backbone(adapted)
    adapted.eval()
    params = adapter_parameters(adapted)
    if not params:
        return adapted
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    groups: list[list[Utterance]] = []
    step = 0
    while step < cfg.steps:
        if not groups:
            groups = list(batches(adapt_utts, cfg.max_batch_s, rng))
        b = collate(groups.pop(), store, inventory)
        loss = ctc_loss(adapted, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    return adapted
