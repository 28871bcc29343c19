"""Channel importance and structured pruning to a plan's keep ratios."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from voxfit.errors import ConfigError
from voxfit.models import ChannelGroup, ChannelMember, group_size, prune_group


def _member_weights(model: nn.Module, m: ChannelMember) -> list[tuple[torch.Tensor, int]]:
    """(tensor, channel dim) pairs that ``m`` indexes, for scoring."""
    mod = model.get_submodule(m.module)
    tensors = [(getattr(mod, "weight", None), 1 if m.side == "in" else 0)]
    if m.side != "in":
        tensors.append((getattr(mod, "bias", None), 0))
    return [(t, d) for t, d in tensors if isinstance(t, torch.Tensor)]


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares over every axis but ``dim``."""
    return t.detach().pow(2).transpose(0, dim).reshape(t.shape[dim], -1).sum(1)


def magnitude_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Per-channel L2 weight magnitude, each member normalized to mean 1, then summed."""
    n = group_size(model, group)
    total = torch.zeros(n)
    for m in group.members:
        for t, dim in _member_weights(model, m):
            s = _per_channel(t, dim).sqrt()
            total += s / s.mean().clamp_min(1e-12)
    return total


def taylor_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Per-channel first-order Taylor saliency |w * dL/dw| from the gradients in ``.grad``.

    Each member is normalized to mean 1 before summing. Call after a backward pass of the
    loss whose sensitivity matters (for adaptation-aware pruning: the adapted model's CTC
    loss on held-out speakers).
    """
    n = group_size(model, group)
    total = torch.zeros(n)
    for m in group.members:
        for t, dim in _member_weights(model, m):
            if t.grad is None:
                continue
            s = (t.detach() * t.grad).abs().transpose(0, dim).reshape(t.shape[dim], -1).sum(1)
            total += s / s.mean().clamp_min(1e-12)
    return total


def kept_channels(size: int, unit: int, keep_ratio: float, channel_multiple: int) -> int:
    """How many channels a group keeps: whole units, rounded to ``channel_multiple``.

    At least one unit (or one multiple) and never more than ``size``. Unit groups (heads)
    round in units; plain groups round to the nearest multiple of ``channel_multiple``.
    """
    if not 0 < keep_ratio <= 1:
        raise ConfigError(f"keep_ratio {keep_ratio} not in (0, 1]")
    if keep_ratio == 1.0:
        return size
    if unit > 1:
        units = size // unit
        return unit * min(units, max(1, round(units * keep_ratio)))
    step = max(1, channel_multiple)
    k = step * round(size * keep_ratio / step)
    return min(size, max(step, k)) if size >= step else size


def prune_to_plan(
    model: nn.Module,
    groups: Mapping[ChannelGroup, float],
    scores: Mapping[str, torch.Tensor],
    channel_multiple: int = 1,
) -> dict[str, list[int]]:
    """Prune each group to its keep ratio, keeping the highest-scoring channels (in place).

    Args:
        groups: group -> keep ratio.
        scores: group name -> per-channel importance (computed on the unpruned model).
        channel_multiple: kept channel counts round to this (the hardware profile's).

    Returns:
        group name -> sorted kept channel indices (of the original model).
    """
    kept: dict[str, list[int]] = {}
    for g, ratio in groups.items():
        size = group_size(model, g)
        k = kept_channels(size, g.unit, ratio, channel_multiple)
        if k == size:
            continue
        s = scores[g.name]
        if g.unit > 1:  # rank whole units by their summed score
            unit_scores = s.reshape(-1, g.unit).sum(1)
            top = torch.topk(unit_scores, k // g.unit).indices
            idx = sorted(int(u) * g.unit + j for u in top for j in range(g.unit))
        else:
            idx = sorted(int(i) for i in torch.topk(s, k).indices)
        prune_group(model, g, idx)
        kept[g.name] = idx
    return kept
