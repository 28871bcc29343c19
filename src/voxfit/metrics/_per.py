"""Phone error rate (PER) with greedy CTC decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from voxfit.data import FeatureStore, PhoneInventory, Utterance, batches, collate


def edit_distance(ref: Sequence[object], hyp: Sequence[object]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path per utterance: argmax, merge repeats, drop blanks (id 0)."""
    best = log_probs.argmax(dim=-1)
    out = []
    for row, n in zip(best, lengths, strict=True):
        ids = torch.unique_consecutive(row[: int(n)])
        out.append([int(i) for i in ids if i != 0])
    return out


@torch.no_grad()
def error_counts(
    model: nn.Module,
    utts: Sequence[Utterance],
    store: FeatureStore,
    inventory: PhoneInventory,
    max_batch_s: float = 120.0,
) -> tuple[int, int]:
    """(edit operations, reference phones) summed over ``utts``; the model is run in eval mode."""
    was_training = model.training
    model.eval()
    errors = total = 0
    for group in batches(utts, max_batch_s):
        b = collate(group, store, inventory)
        lp, lens = model(b.feats, b.lengths)
        for u, hyp in zip(group, greedy_decode(lp, lens), strict=True):
            ref = inventory.encode(u.phones, where=u.path)
            errors += edit_distance(ref, hyp)
            total += len(ref)
    model.train(was_training)
    return errors, total


def phone_error_rate(
    model: nn.Module, utts: Sequence[Utterance], store: FeatureStore, inventory: PhoneInventory
) -> float:
    """PER in percent: total edits / total reference phones x 100 (0 for no utterances)."""
    errors, total = error_counts(model, utts, store, inventory)
    return 100.0 * errors / total if total else 0.0
