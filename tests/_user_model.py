"""A model a user writes for voxfit, outside its families: a small residual conv encoder
with a Linear CTC head. All voxfit needs is this file's factory (``build``), named on the
command line as ``module:function`` (``voxfit train --model mymodel:build``).

The contract: ``build(n_outputs=, size=)`` returns a torch module with
``forward(feats (B, T, n_mels), lengths (B,)) -> (log-probs (B, T', n_outputs), lengths')``
and ``structure()`` declaring its channel groups, quantizable layers and adapter slots; its
``n_mels`` attribute says how many log-mel bins it takes (this one: 40; default 80).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxfit.structure import AdapterSlot, ChannelGroup, ChannelMember, ModelStructure


class _Block(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.expand = nn.Conv1d(width, inner, 3, padding=1)
        self.expand_bn = nn.BatchNorm1d(inner)
        self.project = nn.Conv1d(inner, width, 1)
        self.adapter: nn.Module = nn.Identity()  # the slot an adapter replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.expand_bn(self.expand(x)))
        return self.adapter(F.relu(x + self.project(y)))  # type: ignore[no-any-return]


class ConvCtc(nn.Module):
    def __init__(
        self, n_outputs: int, width: int, inner: int, n_layers: int, n_mels: int = 40
    ) -> None:
        super().__init__()
        self.n_mels = n_mels  # voxfit computes this many log-mel bins for it
        self.stem = nn.Conv1d(n_mels, width, 5, stride=2, padding=2)
        self.layers = nn.ModuleList(_Block(width, inner) for _ in range(n_layers))
        self.head = nn.Linear(width, n_outputs)

    def structure(self) -> ModelStructure:
        n = len(self.layers)
        stream = [ChannelMember("stem", "out"), ChannelMember("head", "in")]
        for i in range(n):
            stream += [
                ChannelMember(f"layers.{i}.expand", "in"),
                ChannelMember(f"layers.{i}.project", "out"),
            ]
        inner = [
            ChannelGroup(
                f"layers.{i}.inner",
                (
                    ChannelMember(f"layers.{i}.expand", "out"),
                    ChannelMember(f"layers.{i}.expand_bn", "norm"),
                    ChannelMember(f"layers.{i}.project", "in"),
                ),
            )
            for i in range(n)
        ]
        return ModelStructure(
            groups=(ChannelGroup("stream", tuple(stream)), *inner),
            quantizable=(
                "stem",
                *(f"layers.{i}.{c}" for i in range(n) for c in ("expand", "project")),
                "head",
            ),
            adapter_slots=tuple(
                AdapterSlot(
                    f"layers.{i}",
                    f"layers.{i}.adapter",
                    "stream",
                    "BCT",
                    lora_target=f"layers.{i}.project",
                )  # fmt: skip
                for i in range(n)
            ),
        )

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.stem(feats.transpose(1, 2)))
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x.transpose(1, 2))
        return F.log_softmax(logits, dim=-1), torch.div(lengths - 1, 2, rounding_mode="floor") + 1


def build(n_outputs: int, size: str = "default") -> ConvCtc:
    """The factory voxfit calls."""
    if size == "tiny":
        return ConvCtc(n_outputs, width=32, inner=48, n_layers=2)
    return ConvCtc(n_outputs, width=128, inner=192, n_layers=4)
