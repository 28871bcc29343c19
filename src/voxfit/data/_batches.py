"""Length-bucketed, padded batches of (features, labels) for CTC training."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from voxfit.data._features import FeatureStore
from voxfit.data._manifest import Utterance
from voxfit.data._phones import PhoneInventory


@dataclass(frozen=True, slots=True)
class Batch:
    """Padded features (B, T, F) with frame counts, and concatenated CTC targets."""

    feats: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    utts: tuple[Utterance, ...]


def collate(utts: Sequence[Utterance], store: FeatureStore, inventory: PhoneInventory) -> Batch:
    """Pad a list of utterances into one batch."""
    feats = [store[u] for u in utts]
    lengths = torch.tensor([f.shape[0] for f in feats])
    padded = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        padded[i, : f.shape[0]] = f
    labels = [inventory.encode(u.phones, where=u.path) for u in utts]
    return Batch(
        feats=padded,
        lengths=lengths,
        targets=torch.tensor([x for lab in labels for x in lab], dtype=torch.long),
        target_lengths=torch.tensor([len(lab) for lab in labels]),
        utts=tuple(utts),
    )


def batches(
    utts: Sequence[Utterance],
    max_batch_s: float,
    rng: random.Random | None = None,
) -> Iterator[list[Utterance]]:
    """Groups of similar-length utterances, each under ``max_batch_s`` seconds of audio.

    With ``rng`` the groups are formed from a shuffled-then-sorted order and yielded in
    random order (training); without it, in a fixed order (evaluation).
    """
    order = list(utts)
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda u: u.duration_s)
    groups: list[list[Utterance]] = []
    cur: list[Utterance] = []
    for u in order:
        if cur and (len(cur) + 1) * max(u.duration_s, cur[-1].duration_s) > max_batch_s:
            groups.append(cur)
            cur = []
        cur.append(u)
    if cur:
        groups.append(cur)
    if rng is not None:
        rng.shuffle(groups)
    yield from groups
