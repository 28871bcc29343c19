"""Speaker adapters: small full-precision modules that personalize a frozen backbone.

Two kinds, both starting as the identity (their up-projection is zero), so inserting one
leaves the model's outputs unchanged until it is trained:

- ``residual``: a bottleneck ``x + up(relu(down(x)))`` at the slot (the block's output);
- ``lora``: a low-rank update ``W x + up(down(x))`` of the slot's declared ``lora_target``
  layer (a 1x1 Conv1d or a Linear), added by a forward hook so module paths stay as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from voxfit.errors import ModelError
from voxfit.models._structure import Layout, StructuredModel, group_size

AdapterKind = Literal["residual", "lora"]


class Adapter(nn.Module):
    """Base class of every adapter kind (what adaptation trains and size counts at fp32)."""

    adapter_kind: str = ""


class ResidualAdapter(Adapter):
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


class LoRAAdapter(Adapter):
    """Low-rank delta ``up(down(x))`` added to a layer's output (zero-initialized ``up``)."""

    adapter_kind = "lora"

    def __init__(self, in_dim: int, out_dim: int, rank: int, channels_first: bool) -> None:
        super().__init__()
        if rank < 1:
            raise ModelError(f"LoRA rank must be >= 1, got {rank}")
        self.channels_first = channels_first
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2) if self.channels_first else x
        h = self.up(self.down(h))
        return h.transpose(1, 2) if self.channels_first else h


def _lora_hook(
    module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
) -> torch.Tensor:
    return out + module.get_submodule("lora")(args[0])


def _attach_lora(layer: nn.Module, rank: int, where: str) -> None:
    if isinstance(layer, nn.Conv1d):
        if layer.kernel_size != (1,) or layer.groups != 1:
            raise ModelError(f"{where}: LoRA needs a 1x1 Conv1d or a Linear")
        lora = LoRAAdapter(layer.in_channels, layer.out_channels, rank, channels_first=True)
    elif isinstance(layer, nn.Linear):
        lora = LoRAAdapter(layer.in_features, layer.out_features, rank, channels_first=False)
    else:
        raise ModelError(f"{where}: LoRA needs a 1x1 Conv1d or a Linear")
    layer.lora = lora
    layer.register_forward_hook(_lora_hook)


def insert_adapters(
    model: nn.Module, sizes: Mapping[str, int], kinds: Mapping[str, AdapterKind] | None = None
) -> nn.Module:
    """A copy of ``model`` with adapters at the named slots (size 0 = no adapter there).

    Args:
        sizes: slot -> bottleneck (residual) or rank (LoRA).
        kinds: slot -> "residual" (default) or "lora".

    Raises:
        ModelError: an unknown slot, a LoRA slot without a ``lora_target``, or a model
            without a structure declaration. The input model is not changed.
    """
    if not isinstance(model, StructuredModel):
        raise ModelError(f"{type(model).__name__} does not declare structure()")
    structure = model.structure()
    slots = {s.name: s for s in structure.adapter_slots}
    unknown = sorted(set(sizes) - set(slots))
    if unknown:
        raise ModelError(f"unknown adapter slot(s) {unknown}; declared: {sorted(slots)}")
    kinds = kinds or {}
    out: nn.Module = copy.deepcopy(model)
    for name, size in sizes.items():
        if size <= 0:
            continue
        slot = slots[name]
        if kinds.get(name, "residual") == "lora":
            if not slot.lora_target:
                raise ModelError(f"adapter slot {name!r} declares no lora_target layer")
            _attach_lora(out.get_submodule(slot.lora_target), size, slot.lora_target)
            continue
        dim = group_size(out, structure.group(slot.group))
        parent_path, _, attr = slot.module.rpartition(".")
        parent = out.get_submodule(parent_path) if parent_path else out
        setattr(parent, attr, ResidualAdapter(dim, size, slot.layout))
    return out


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every adapter in ``model`` (what speaker adaptation trains)."""
    return [p for m in model.modules() if isinstance(m, Adapter) for p in m.parameters()]


def freeze_backbone(model: nn.Module) -> None:
    """Make only adapter parameters trainable."""
    keep = {id(p) for p in adapter_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
