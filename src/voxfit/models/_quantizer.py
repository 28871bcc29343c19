"""The activation quantizer a compressed model carries before each quantized layer.

It lives with the model family (like the adapters) because it is part of what a compressed
model *is*: sizes (``voxfit.metrics``), exporters and compilers recognize it; ``voxfit.
compress`` inserts and calibrates it.
"""

from __future__ import annotations

import torch
from torch import nn

from voxfit.errors import ConfigError


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
        scale, zero = self.grid()
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
        # straight-through: gradients pass as if unquantized (adapters train through it)
        return x + ((q - zero) * scale - x).detach()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of the uint8 grid: the calibrated range widened to hold 0."""
        if not torch.isfinite(self.lo):
            raise ConfigError("8-bit activations need calibration data (none was given)")
        lo = torch.clamp(self.lo, max=0.0)
        hi = torch.clamp(self.hi, min=0.0)
        scale = (hi - lo).clamp_min(1e-8) / 255.0
        return scale, torch.round(-lo / scale)
