"""The quantizers of a compressed model: the activation quantizer it carries before each
quantized layer, and the weight fake-quantizer.

They live with the model family (like the adapters) because they are part of what a
compressed model *is*: sizes (``voxfit.metrics``), exporters and compilers recognize the
activation quantizer, and an adapter merged into a quantized layer (``merged_lora``)
requantizes that layer's weight in its forward; ``voxfit.compress`` inserts and calibrates
them.
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


#: |a| + |b| of two same-signed 8-bit weights that u8 x s8 pair instructions (AVX2's
#: vpmaddubsw: two products summed into a saturating int16) can take for any uint8 input:
#: 255 * 128 = 32640 <= 32767.
PAIR_BOUND = 32767 // 255


def _pair_safe(q: torch.Tensor) -> torch.Tensor:
    """Integer conv weights (O, C, K) with every pair of input channels (2p, 2p+1) of one
    tap and output channel brought within :data:`PAIR_BOUND` where both have one sign: the
    smaller of the two shrinks (on a tie the first; the larger, so each row's max, stays)."""
    o, c, k = q.shape
    if c % 2:
        q = torch.cat([q, q.new_zeros(o, 1, k)], dim=1)
    pairs = q.reshape(o, -1, 2, k)
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    over = (a * b > 0) & (a.abs() + b.abs() > PAIR_BOUND)
    a_small = a.abs() <= b.abs()
    room = PAIR_BOUND - torch.maximum(a.abs(), b.abs())
    a = torch.where(over & a_small, a.sign() * room, a)
    b = torch.where(over & ~a_small, b.sign() * room, b)
    return torch.stack([a, b], dim=2).reshape(o, -1, k)[:, :c]


def quantize_weight(w: torch.Tensor, bits: int, pair_safe: bool = False) -> torch.Tensor:
    """Fake-quantized copy of a Conv1d/Linear weight (output channels on dim 0).

    ``pair_safe`` (8-bit conv weights whose layer computes in int8): no pair of adjacent
    input channels can saturate a u8 x s8 pair instruction (:func:`_pair_safe`), so the
    int8 kernels compute exactly what this fake-quantized weight computes."""
    if bits == 32:
        return w.clone()
    if bits == 16:
        return w.half().float()
    if bits not in (4, 8):
        raise ConfigError(f"weight_bits: {bits} not in (4, 8, 16, 32)")
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / qmax
    q = torch.round(flat / scale[:, None]).clamp(-qmax, qmax).reshape(w.shape)
    if pair_safe and bits == 8 and w.dim() == 3:
        q = _pair_safe(q)
    return q * scale.reshape(-1, *([1] * (w.dim() - 1)))
