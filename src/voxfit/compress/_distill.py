"""Recovery after pruning: short knowledge distillation from the base model."""

from __future__ import annotations

import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxfit.data import FeatureStore, PhoneInventory, Utterance, batches, collate
from voxfit.errors import ConfigError

# Teacher posteriors per batch (keyed by the batch's utterance paths), per teacher module. The
# batch order is fixed by the recovery seed, so every distillation from the same teacher
# (one per search trial) sees the same batches; the teacher's forward pass is ~20% of a step.
# The teacher is assumed not to change while it is alive (it is the frozen base model).
_TEACHER_OUT: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, ...], torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True, slots=True)
class Recovery:
    """Data and settings for distillation; the step budget comes from the Candidate.

    The loss is ``kd_weight * KL(teacher || student)`` over frame posteriors at
    ``temperature`` plus ``(1 - kd_weight) * CTC`` on the labels.
    """

    train_utts: Sequence[Utterance]
    store: FeatureStore
    inventory: PhoneInventory
    lr: float = 5e-4
    temperature: float = 2.0
    kd_weight: float = 0.7
    max_batch_s: float = 60.0
    seed: int = 0


def distill(student: nn.Module, teacher: nn.Module, steps: int, rec: Recovery) -> list[float]:
    """Train ``student`` (in place) toward ``teacher`` for ``steps`` steps; returns losses.

    The teacher is not changed. The student is left in eval mode.

    Raises:
        ConfigError: no training utterances.
    """
    if not rec.train_utts:
        raise ConfigError("recovery needs training utterances")
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=rec.lr)
    rng = random.Random(rec.seed)
    groups: list[list[Utterance]] = []
    losses = []
    t = rec.temperature
    for _ in range(steps):
        if not groups:
            groups = list(batches(rec.train_utts, rec.max_batch_s, rng))
        group = groups.pop()
        b = collate(group, rec.store, rec.inventory)
        t_lp = _teacher_out(teacher, group, b.feats, b.lengths)
        s_lp, s_len = student(b.feats, b.lengths)
        mask = (torch.arange(s_lp.shape[1])[None, :] < s_len[:, None]).float()
        kl = F.kl_div(
            F.log_softmax(s_lp / t, -1),
            F.log_softmax(t_lp / t, -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        kd = (kl * mask).sum() / mask.sum() * t * t
        ctc = F.ctc_loss(
            s_lp.transpose(0, 1), b.targets, s_len, b.target_lengths, blank=0, zero_infinity=True
        )
        loss = rec.kd_weight * kd + (1 - rec.kd_weight) * ctc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    student.eval()
    return losses


def _teacher_out(
    teacher: nn.Module, group: Sequence[Utterance], feats: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    cache = _TEACHER_OUT.setdefault(teacher, {})
    key = tuple(u.path for u in group)
    out = cache.get(key)
    if out is None:
        with torch.no_grad():
            out, _ = teacher(feats, lengths)
        cache[key] = out
    return out
