"""What a model declares about its compressible structure: plain frozen data, no torch.

A model that voxfit can search declares, in one place (its ``structure()`` method):

- **channel groups**: sets of layer sides that share one channel axis and must be pruned
  together (a conv's output channels, the BatchNorm after it, the next conv's input channels,
  every residual branch writing into the same stream);
- **quantizable layers**: the Conv1d/Linear modules whose weights may be quantized;
- **adapter slots**: one per block, a module attribute holding ``nn.Identity`` that an
  adapter replaces, with the channel group whose width it sees.

These declarations live here, beside :mod:`voxfit.plan`, so that search spaces can resolve
their patterns against them without importing torch (loading a space must be instant). The
torch side -- checking a declaration against real modules and pruning -- is in
:mod:`voxfit.models`, which re-exports these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from voxfit.errors import ModelError

__all__ = [
    "FAMILIES",
    "AdapterSlot",
    "ChannelGroup",
    "ChannelMember",
    "Layout",
    "ModelStructure",
    "Side",
    "is_factory",
]

#: the shipped model families; any other model is named by its factory (``module:function``,
#: ``voxfit.models.build_named``)
FAMILIES: tuple[str, ...] = ("tdnn", "conformer")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory(ref: str) -> bool:
    """Whether ``ref`` names a model factory (``package.module:function``), not a family."""
    return bool(_FACTORY_RE.match(ref))


Side = Literal["out", "in", "norm", "depthwise"]
Layout = Literal["BCT", "BTC"]


@dataclass(frozen=True, slots=True)
class ChannelMember:
    """One side of one module that indexes a group's channels.

    ``side``: "out" = output channels of a Conv1d/Linear; "in" = input channels;
    "norm" = a BatchNorm1d/LayerNorm's features; "depthwise" = a depthwise Conv1d
    (in = out = groups).
    """

    module: str
    side: Side


@dataclass(frozen=True, slots=True)
class ChannelGroup:
    """Channels pruned together. ``unit`` > 1 prunes whole blocks (e.g. attention heads)."""

    name: str
    members: tuple[ChannelMember, ...]
    unit: int = 1


@dataclass(frozen=True, slots=True)
class AdapterSlot:
    """Where an adapter may go.

    A residual adapter replaces ``module`` (an nn.Identity at the block's output) and is as
    wide as ``group``; a LoRA adapter adds a low-rank delta to ``lora_target`` (a 1x1 Conv1d
    or a Linear of the same block; "" = LoRA not offered here).
    """

    name: str
    module: str
    group: str
    layout: Layout
    lora_target: str = ""


@dataclass(frozen=True, slots=True)
class ModelStructure:
    """Everything compression and search need to know about a model's layers."""

    groups: tuple[ChannelGroup, ...]
    quantizable: tuple[str, ...]
    adapter_slots: tuple[AdapterSlot, ...]

    def group(self, name: str) -> ChannelGroup:
        """The group called ``name``.

        Raises:
            ModelError: no such group (lists the declared ones).
        """
        for g in self.groups:
            if g.name == name:
                return g
        raise ModelError(
            f"unknown channel group {name!r}; declared: {', '.join(g.name for g in self.groups)}"
        )
