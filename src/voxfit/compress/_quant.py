"""Fake quantization: per-output-channel symmetric weights, per-tensor activations.

Weights at 8 or 4 bits are rounded to a symmetric integer grid per output channel
(scale = max|w| / (2^(b-1) - 1)); at 16 bits they are rounded to float16; at 32 bits they
are left alone. Activations (a layer's input) at 8 bits are rounded to an asymmetric uint8
grid whose range was calibrated on training data; at 16 bits to float16.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from voxfit.errors import ConfigError


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized copy of a Conv1d/Linear weight (output channels on dim 0)."""
    if bits == 32:
        return w.clone()
    if bits == 16:
        return w.half().float()
    if bits not in (4, 8):
        raise ConfigError(f"weight_bits: {bits} not in (4, 8, 16, 32)")
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / qmax
    q = torch.round(flat / scale[:, None]).clamp(-qmax, qmax)
    return (q * scale[:, None]).reshape(w.shape)


class ActivationQuantizer(nn.Module):
    """Rounds a tensor to ``bits`` (8: uint8 over a calibrated [lo, hi]; 16: float16)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if bits not in (8, 16, 32):
            raise ConfigError(f"act_bits: {bits} not in (8, 16, 32)")
        self.bits = bits
        self.lo: torch.Tensor
        self.hi: torch.Tensor
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.lo = torch.minimum(self.lo, x.detach().min())
            self.hi = torch.maximum(self.hi, x.detach().max())
            return x
        if self.bits == 32:
            return x
        if self.bits == 16:
            return x.half().float()
        if not torch.isfinite(self.lo):
            raise ConfigError("8-bit activations need calibration data (none was given)")
        lo = torch.clamp(self.lo, max=0.0)
        hi = torch.clamp(self.hi, min=0.0)
        scale = (hi - lo).clamp_min(1e-8) / 255.0
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
        # straight-through: gradients pass as if unquantized (adapters train through it)
        return x + ((q - zero) * scale - x).detach()


@contextmanager
def fake_quant_off(model: nn.Module) -> Iterator[None]:
    """Within the block every ActivationQuantizer of ``model`` passes its input through.

    The weights stay as they are (already rounded by ``apply``), so the model computes what
    a deployment with float activations computes: the graph exporters (ONNX, torch.export)
    and the checks against their output use it. The bit-widths are restored on exit, also
    after an exception.
    """
    quants = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    saved = [q.bits for q in quants]
    for q in quants:
        q.bits = 32
    try:
        yield
    finally:
        for q, b in zip(quants, saved, strict=True):
            q.bits = b


def attach_activation_quantizers(model: nn.Module, bits: dict[str, int]) -> None:
    """Quantize the *input* of each named layer with a forward pre-hook (32 bits: nothing)."""
    for name, b in bits.items():
        if b == 32:
            continue
        layer = model.get_submodule(name)
        quant = ActivationQuantizer(b)
        layer.act_quant = quant  # a submodule: moves with the model, saved in state_dict
        layer.register_forward_pre_hook(_pre_hook)


def _pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    quant = module.get_submodule("act_quant")
    return (quant(args[0]), *args[1:])


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Record activation ranges over ``batches`` of (feats, lengths); returns batches seen."""
    quants = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    if not quants:
        return 0
    was = model.training
    model.eval()
    for q in quants:
        q.calibrating = True
    n = 0
    try:
        for feats, lengths in batches:
            model(feats, lengths)
            n += 1
    finally:
        for q in quants:
            q.calibrating = False
        model.train(was)
    return n
