"""Speaker adapters: small modules inserted at a model's adapter slots.

A residual bottleneck adapter computes ``x + up(relu(down(x)))`` on the channel axis. ``up``
starts at zero, so inserting an adapter leaves the model's outputs unchanged until it is
trained. Adapters stay in full precision; only they are trained when a speaker adapts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from voxfit.errors import ModelError
from voxfit.models._structure import Layout, StructuredModel, group_size


class ResidualAdapter(nn.Module):
    """Bottleneck adapter ``x + up(relu(down(x)))`` over channels (zero-initialized ``up``)."""

    adapter_kind = "residual"

    def __init__(self, dim: int, bottleneck: int, layout: Layout) -> None:
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ModelError(
                f"adapter needs dim >= 1 and bottleneck >= 1, got {dim}, {bottleneck}"
            )
        self.layout = layout
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2) if self.layout == "BCT" else x
        h = self.up(torch.relu(self.down(h)))
        return x + (h.transpose(1, 2) if self.layout == "BCT" else h)


def insert_adapters(model: nn.Module, sizes: Mapping[str, int]) -> nn.Module:
    """A copy of ``model`` with residual adapters at the named slots (0 = no adapter there).

    The input model is not changed.

    Raises:
        ModelError: an unknown slot name, or a model without a structure declaration.
    """
    if not isinstance(model, StructuredModel):
        raise ModelError(f"{type(model).__name__} does not declare structure()")
    structure = model.structure()
    slots = {s.name: s for s in structure.adapter_slots}
    unknown = sorted(set(sizes) - set(slots))
    if unknown:
        raise ModelError(f"unknown adapter slot(s) {unknown}; declared: {sorted(slots)}")
    out = copy.deepcopy(model)
    for name, bottleneck in sizes.items():
        if bottleneck <= 0:
            continue
        slot = slots[name]
        dim = group_size(out, structure.group(slot.group))
        parent_path, _, attr = slot.module.rpartition(".")
        parent = out.get_submodule(parent_path) if parent_path else out
        setattr(parent, attr, ResidualAdapter(dim, bottleneck, slot.layout))
    return out


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every adapter in ``model`` (what speaker adaptation trains)."""
    return [p for m in model.modules() if isinstance(m, ResidualAdapter) for p in m.parameters()]


def freeze_backbone(model: nn.Module) -> None:
    """Make only adapter parameters trainable."""
    keep = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
