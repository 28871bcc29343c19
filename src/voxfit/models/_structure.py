"""The torch side of a model's structure declaration: validation and physical pruning.

The declaration itself (channel groups, quantizable layers, adapter slots) is plain data in
:mod:`voxfit.structure`, importable without torch; it is re-exported here and from
:mod:`voxfit.models` for existing imports. :func:`prune_group` physically removes channels of
one group; :func:`validate_structure` checks a declaration against a model, so a wrong
declaration fails with a clear message instead of a shape error deep in a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from voxfit.errors import ModelError
from voxfit.structure import (
    AdapterSlot,
    ChannelGroup,
    ChannelMember,
    Layout,
    ModelStructure,
    Side,
)

__all__ = [
    "AdapterSlot",
    "ChannelGroup",
    "ChannelMember",
    "Layout",
    "ModelStructure",
    "Side",
    "StructuredModel",
    "group_size",
    "member_size",
    "prune_group",
    "validate_structure",
]


@runtime_checkable
class StructuredModel(Protocol):
    """An acoustic model voxfit can compress.

    ``forward(feats, lengths)`` takes features (batch, frames, n_mels) and valid frame counts
    (batch,), and returns CTC log-probabilities (batch, frames', n_outputs) with their
    lengths. ``structure()`` declares the compressible structure of the model *as it is now*
    (after pruning, group sizes are smaller).
    """

    def structure(self) -> ModelStructure: ...

    def __call__(
        self, feats: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ModelError(
            f"structure names module {path!r}, which the model does not have"
        ) from None


def member_size(model: nn.Module, m: ChannelMember) -> int:
    """Number of channels ``m`` currently indexes."""
    mod = _module(model, m.module)
    if isinstance(mod, nn.Conv1d):
        if m.side == "depthwise":
            if mod.groups != mod.in_channels or mod.in_channels != mod.out_channels:
                raise ModelError(f"{m.module}: side 'depthwise' needs a depthwise Conv1d")
            return mod.out_channels
        if m.side in ("out", "in"):
            if mod.groups != 1:
                raise ModelError(f"{m.module}: grouped Conv1d must be declared 'depthwise'")
            return mod.out_channels if m.side == "out" else mod.in_channels
    elif isinstance(mod, nn.Linear) and m.side in ("out", "in"):
        return mod.out_features if m.side == "out" else mod.in_features
    elif isinstance(mod, nn.BatchNorm1d) and m.side == "norm":
        return mod.num_features
    elif isinstance(mod, nn.LayerNorm) and m.side == "norm" and len(mod.normalized_shape) == 1:
        return mod.normalized_shape[0]
    raise ModelError(f"{m.module}: side {m.side!r} is not supported on {type(mod).__name__}")


def group_size(model: nn.Module, group: ChannelGroup) -> int:
    """The group's current channel count (all members agree, else ModelError)."""
    sizes = {m.module + ":" + m.side: member_size(model, m) for m in group.members}
    if len(set(sizes.values())) != 1:
        raise ModelError(f"group {group.name!r}: members disagree on channel count: {sizes}")
    size = next(iter(sizes.values()))
    if size % group.unit:
        raise ModelError(
            f"group {group.name!r}: size {size} is not a multiple of unit {group.unit}"
        )
    return size


#: what an elastic (once-for-all) model carries, as an attribute and in its checkpoint's
#: meta: group name -> the keep ratios it was trained for; its groups' channels are in
#: importance order, so ``compress.apply`` keeps prefixes (``compress.train_elastic``)
ELASTIC_ATTR = "elastic_widths"


def reorder_group(model: nn.Module, group: ChannelGroup, order: torch.Tensor) -> None:
    """Permute the channels of ``group`` in every member (in place) so that new channel i is
    old channel ``order[i]``: the model computes exactly what it did.

    Raises:
        ModelError: ``order`` is not a permutation of the group's channels.
    """
    size = group_size(model, group)
    idx = order.to(torch.long).reshape(-1)
    if idx.numel() != size or not torch.equal(torch.sort(idx).values, torch.arange(size)):
        raise ModelError(f"group {group.name!r}: order must be a permutation of {size} channels")
    for m in group.members:
        _slice_member(model, m, idx)


def validate_structure(model: nn.Module, structure: ModelStructure) -> None:
    """Check that every declared module exists and every group is consistent.

    Raises:
        ModelError: naming the group, slot or module at fault.
    """
    names = [g.name for g in structure.groups]
    if len(set(names)) != len(names):
        raise ModelError(f"duplicate channel group names in {names}")
    for g in structure.groups:
        group_size(model, g)
    for q in structure.quantizable:
        if not isinstance(_module(model, q), nn.Conv1d | nn.Linear):
            raise ModelError(f"quantizable layer {q!r} is not a Conv1d or Linear")
    for s in structure.adapter_slots:
        structure.group(s.group)
        mod = _module(model, s.module)
        if not isinstance(mod, nn.Identity) and not hasattr(mod, "adapter_kind"):
            raise ModelError(f"adapter slot {s.name!r}: {s.module} must hold nn.Identity")
        if s.lora_target and not isinstance(_module(model, s.lora_target), nn.Conv1d | nn.Linear):
            raise ModelError(f"adapter slot {s.name!r}: lora_target must be a Conv1d or Linear")


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().index_select(dim, idx).clone(), requires_grad=t.requires_grad)


def _slice_member(model: nn.Module, m: ChannelMember, idx: torch.Tensor) -> None:
    mod = _module(model, m.module)
    n = int(idx.numel())
    if isinstance(mod, nn.Conv1d | nn.Linear):
        if m.side in ("out", "depthwise"):
            mod.weight = _take(mod.weight, 0, idx)
            if mod.bias is not None:
                mod.bias = _take(mod.bias, 0, idx)
        else:
            mod.weight = _take(mod.weight, 1, idx)
        if isinstance(mod, nn.Linear):
            if m.side == "out":
                mod.out_features = n
            else:
                mod.in_features = n
        elif m.side == "depthwise":
            mod.in_channels = mod.out_channels = mod.groups = n
        elif m.side == "out":
            mod.out_channels = n
        else:
            mod.in_channels = n
    elif isinstance(mod, nn.BatchNorm1d):
        if mod.weight is not None:
            mod.weight = _take(mod.weight, 0, idx)
            mod.bias = _take(mod.bias, 0, idx)
        if mod.running_mean is not None and mod.running_var is not None:
            mod.running_mean = mod.running_mean.index_select(0, idx).clone()
            mod.running_var = mod.running_var.index_select(0, idx).clone()
        mod.num_features = n
    elif isinstance(mod, nn.LayerNorm):
        if mod.weight is not None:
            mod.weight = _take(mod.weight, 0, idx)
        if mod.bias is not None:
            mod.bias = _take(mod.bias, 0, idx)
        mod.normalized_shape = (n,)


def prune_group(model: nn.Module, group: ChannelGroup, keep: Sequence[int]) -> None:
    """Physically keep only channels ``keep`` of ``group`` in every member (in place).

    ``keep`` are channel indices; with ``unit`` > 1 they must cover whole units (for
    attention heads: all of a head's channels or none).

    Raises:
        ModelError: empty or out-of-range ``keep``, or partial units.
    """
    size = group_size(model, group)
    idx = torch.tensor(sorted(set(int(k) for k in keep)), dtype=torch.long)
    if idx.numel() == 0:
        raise ModelError(f"group {group.name!r}: cannot prune every channel")
    if int(idx[0]) < 0 or int(idx[-1]) >= size:
        raise ModelError(f"group {group.name!r}: keep indices must be in [0, {size})")
    if group.unit > 1:
        units = idx // group.unit
        counts = torch.bincount(units, minlength=size // group.unit)
        if bool(((counts != 0) & (counts != group.unit)).any()):
            raise ModelError(f"group {group.name!r}: keep whole units of {group.unit} channels")
    for m in group.members:
        _slice_member(model, m, idx)
