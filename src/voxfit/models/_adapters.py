"""Speaker adapters: small full-precision modules that personalize a frozen backbone.

Three kinds, all starting as the identity (their up-projection is zero), so inserting one
leaves the model's outputs unchanged until it is trained:

- ``residual``: a bottleneck ``x + up(relu(down(x)))`` at the slot (the block's output);
- ``lora``: a low-rank update ``W x + up(down(x))`` of the slot's declared ``lora_target``
  layer (a 1x1 Conv1d or a Linear), added by a forward hook so module paths stay as they are;
- ``merged_lora``: the same low-rank update merged into that layer's weight: the layer
  computes with ``quantize(W + up @ down)`` at its own weight bit-width (straight-through
  gradients). A speaker's model is then the backbone with that layer's weights replaced
  (:func:`merge_adapters`): nothing runs beside it, so int8 layers stay int8 and the
  personalized library runs exactly as fast as the shipped one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from voxfit.errors import ModelError
from voxfit.models._quantizer import quantize_weight
from voxfit.models._structure import Layout, StructuredModel, group_size
from voxfit.plan import AdapterKind


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


class MergedLoRAAdapter(LoRAAdapter):
    """A LoRA delta that lives in its layer's weight: the layer computes with
    :meth:`merged` of its weight, requantized at ``weight_bits`` (``pair_safe``: as
    ``quantize_weight`` keeps int8 conv weights pair-safe) -- what a device computes after
    folding the trained arrays into the weight and rebuilding. ``weight_bits`` is the
    layer's plan (``compress.apply`` sets it; 32: the merge is exact)."""

    adapter_kind = "merged_lora"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        channels_first: bool,
        weight_bits: int = 32,
        pair_safe: bool = False,
    ) -> None:
        super().__init__(in_dim, out_dim, rank, channels_first)
        self.weight_bits = weight_bits
        self.pair_safe = pair_safe

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out, in[, 1]) plus ``up @ down``, on the layer's quantization grid
        (per output channel, recomputed from the merged rows); gradients pass straight
        through the rounding to the adapter's arrays."""
        w = weight + (self.up.weight @ self.down.weight).reshape(weight.shape)
        if self.weight_bits == 32:
            return w
        q = quantize_weight(w.detach(), self.weight_bits, pair_safe=self.pair_safe)
        return w + (q - w).detach()


def _lora_hook(
    module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
) -> torch.Tensor:
    return out + module.get_submodule("lora")(args[0])


def _merged_lora_hook(
    module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
) -> torch.Tensor | None:
    """``out`` (the layer with its own weight ``W``) plus the layer applied with
    ``merged(W) - W`` and no bias: the layer computed with its merged weight."""
    lora = getattr(module, "lora", None)
    if not isinstance(lora, MergedLoRAAdapter):
        return None  # merged into the weight for deployment (merge_adapters)
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if not torch.is_grad_enabled() and not bool(lora.up.weight.any()):
        return None  # the identity: merged(W) == W (W already on its grid)
    dw = lora.merged(weight) - weight
    if isinstance(module, nn.Linear):
        return out + F.linear(args[0], dw)
    assert isinstance(module, nn.Conv1d)
    return out + F.conv1d(args[0], dw, None, module.stride, module.padding, module.dilation)


def _attach_lora(layer: nn.Module, rank: int, where: str, merged: bool = False) -> None:
    kind = MergedLoRAAdapter if merged else LoRAAdapter
    if isinstance(layer, nn.Conv1d):
        if layer.kernel_size != (1,) or layer.groups != 1:
            raise ModelError(f"{where}: LoRA needs a 1x1 Conv1d or a Linear")
        lora = kind(layer.in_channels, layer.out_channels, rank, channels_first=True)
    elif isinstance(layer, nn.Linear):
        lora = kind(layer.in_features, layer.out_features, rank, channels_first=False)
    else:
        raise ModelError(f"{where}: LoRA needs a 1x1 Conv1d or a Linear")
    layer.lora = lora
    layer.register_forward_hook(_merged_lora_hook if merged else _lora_hook)


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight ``layer`` computes with: merged with its ``merged_lora`` adapter, if any."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    lora = getattr(layer, "lora", None)
    return lora.merged(weight) if isinstance(lora, MergedLoRAAdapter) else weight


def merge_adapters(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no ``merged_lora`` adapter; else a copy in which each
    is folded into its layer's weight and removed: the graph a device runs after adapting
    (at the identity, the shipped backbone). Every exporter and compiler lowers this."""
    if not any(isinstance(m, MergedLoRAAdapter) for m in model.modules()):
        return model
    out = copy.deepcopy(model)
    for layer in list(out.modules()):
        lora = getattr(layer, "lora", None)
        if isinstance(lora, MergedLoRAAdapter):
            weight = layer.weight
            assert isinstance(weight, torch.Tensor)
            with torch.no_grad():
                weight.copy_(lora.merged(weight))
            del layer.lora  # its hook now passes the output through
    return out


def has_unmerged_lora(layer: nn.Module) -> bool:
    """Whether ``layer`` carries a LoRA branch that runs beside it (``lora``, not
    ``merged_lora``): such a layer keeps float compute when lowered."""
    lora = getattr(layer, "lora", None)
    return isinstance(lora, LoRAAdapter) and not isinstance(lora, MergedLoRAAdapter)


def insert_adapters(
    model: nn.Module, sizes: Mapping[str, int], kinds: Mapping[str, AdapterKind] | None = None
) -> nn.Module:
    """A copy of ``model`` with adapters at the named slots (size 0 = no adapter there).

    Args:
        sizes: slot -> bottleneck (residual) or rank (LoRA).
        kinds: slot -> "residual" (default), "lora" or "merged_lora" (its ``weight_bits``
            is 32 until set: ``compress.apply`` sets the layer's).

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
        kind = kinds.get(name, "residual")
        if kind in ("lora", "merged_lora"):
            if not slot.lora_target:
                raise ModelError(f"adapter slot {name!r} declares no lora_target layer")
            target = out.get_submodule(slot.lora_target)
            _attach_lora(target, size, slot.lora_target, merged=kind == "merged_lora")
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
