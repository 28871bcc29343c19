"""Quantized convolutions as opaque ops of the deploy graph, so their weights stay packed.

``voxfit::qconv1d``: a Conv1d whose plan says 8-bit activations and 4- or 8-bit weights is
exported as this op instead of ``aten.conv1d``: its input is rounded to the calibrated uint8
grid, its weight is the int8 grid (per-output-channel scale). TVM's importer turns it into
uint8 x int8 -> int32 compute (``voxfit.compile._import``), or, on a target that cannot run
int8 compute, into a float32 conv that unpacks the int8 weights inside the kernel.

``voxfit::wconv1d``: a Conv1d with 4-, 8- or 16-bit weights and float activations: its
weights travel as the int8 grid (4 and 8 bits, with a float32 scale per output channel) or as
float16. TVM's importer keeps them packed in the library (two 4-bit values per byte) and
unpacks them inside the convolution kernel, so the library is as small as the plan says and
the measured latency includes the unpacking.

``voxfit::qlinear``: the same for a Linear layer (8-bit activations, 4- or 8-bit weights,
the input's last axis the features): the Conformer's projections and FFNs.

In torch all three compute exactly what the fake-quantized layer computes, so the exported program
runs and evaluates like the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxfit.errors import ModelError

OP_NAME = "qconv1d.default"  # how TVM's importer keys a custom op (node.target.__name__)
LINEAR_OP_NAME = "qlinear.default"
W_OP_NAME = "wconv1d.default"


def _conv1d_out(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """The (empty) output of a Conv1d of ``x`` by ``weight`` (O, C, K): the ops' shape."""
    t = (x.shape[2] + 2 * padding - dilation * (weight.shape[2] - 1) - 1) // stride + 1
    return x.new_empty((x.shape[0], weight.shape[0], t))


@torch.library.custom_op("voxfit::qconv1d", mutates_args=())
def qconv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    x_scale: float,
    x_zero: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    """conv1d(dequant(quant_u8(x)), weight * w_scale) + bias; ``weight`` is int8 (O, C, K)."""
    q = torch.clamp(torch.round(x / x_scale) + x_zero, 0, 255)
    w = weight.to(torch.float32) * w_scale[:, None, None]
    return F.conv1d((q - x_zero) * x_scale, w, bias, stride, padding, dilation)


@qconv1d.register_fake
def _qconv1d_shape(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    x_scale: float,
    x_zero: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    return _conv1d_out(x, weight, stride, padding, dilation)


@torch.library.custom_op("voxfit::qlinear", mutates_args=())
def qlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    x_scale: float,
    x_zero: int,
) -> torch.Tensor:
    """linear(dequant(quant_u8(x)), weight * w_scale) + bias; ``weight`` is int8 (O, C)."""
    q = torch.clamp(torch.round(x / x_scale) + x_zero, 0, 255)
    w = weight.to(torch.float32) * w_scale[:, None]
    return F.linear((q - x_zero) * x_scale, w, bias)


@qlinear.register_fake
def _qlinear_shape(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    x_scale: float,
    x_zero: int,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _weight_grid(
    layer: nn.Conv1d | nn.Linear, bits: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight as stored in the deploy graph, and its per-output-channel scale:
    the int8 grid at 4 and 8 bits (scale = max|w| / qmax), float16 (scale 1) at 16.

    Raises:
        ModelError: the weights are not already on that grid (``compress.apply`` quantizes
            them last), or ``bits`` has no stored form.
    """
    w = layer.weight.detach().float()
    if bits == 16:
        half = w.to(torch.float16)
        off = (half.float() - w).abs().max().item()
        if off > 0:
            raise ModelError(f"{name}: weights are not float16 values (off by {off:.3g})")
        return half, torch.ones(w.shape[0])
    if bits not in (4, 8):
        raise ModelError(f"{name}: {bits}-bit weights have no packed form (4, 8 or 16)")
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
    grid = torch.round(flat / scale[:, None])
    off = ((grid * scale[:, None] - flat).abs() / scale[:, None]).max().item()
    if off > 1e-3:
        raise ModelError(f"{name}: weights are not on the {bits}-bit grid (off by {off:.3g})")
    return grid.reshape(w.shape).to(torch.int8), scale


class _StoredWeights(nn.Module):
    """A layer's weight (on its ``bits`` grid), per-output-channel scale and bias as buffers
    of a deploy op."""

    def __init__(self, layer: nn.Conv1d | nn.Linear, bits: int, name: str) -> None:
        super().__init__()
        q, scale = _weight_grid(layer, bits, name)
        self.weight: torch.Tensor
        self.w_scale: torch.Tensor
        self.bias: torch.Tensor
        self.register_buffer("weight", q)
        self.register_buffer("w_scale", scale.clone())
        out = q.shape[0]
        b = layer.bias.detach().float() if layer.bias is not None else torch.zeros(out)
        self.register_buffer("bias", b.clone())


class _StoredConv(_StoredWeights):
    """A Conv1d's geometry and its weight, scale and bias as buffers of a deploy op."""

    def __init__(self, conv: nn.Conv1d, bits: int, name: str, what: str) -> None:
        if conv.groups != 1 or not isinstance(conv.padding, tuple):
            raise ModelError(f"{name}: only ungrouped, explicitly padded Conv1d {what}")
        super().__init__(conv, bits, name)
        self.stride = int(conv.stride[0])
        self.padding = int(conv.padding[0])
        self.dilation = int(conv.dilation[0])


def _input_grid(lo: float, hi: float) -> tuple[float, int]:
    """The uint8 input grid (scale, zero point) of an activation range: the same grid as the
    ActivationQuantizer's (float32 arithmetic)."""
    lo_t = torch.clamp(torch.tensor(lo, dtype=torch.float32), max=0.0)
    hi_t = torch.clamp(torch.tensor(hi, dtype=torch.float32), min=0.0)
    x_scale = (hi_t - lo_t).clamp_min(1e-8) / 255.0
    return float(x_scale), int(torch.round(-lo_t / x_scale))


class QConv1d(_StoredConv):
    """The deploy form of a fake-quantized Conv1d (weights on a ``bits`` grid, uint8 input)."""

    def __init__(self, conv: nn.Conv1d, bits: int, lo: float, hi: float, name: str) -> None:
        super().__init__(conv, bits, name, "lower to int8")
        self.x_scale, self.x_zero = _input_grid(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.voxfit.qconv1d(  # type: ignore[no-any-return]
            x,
            self.weight,
            self.w_scale,
            self.bias,
            self.x_scale,
            self.x_zero,
            self.stride,
            self.padding,
            self.dilation,
        )


class QLinear(_StoredWeights):
    """The deploy form of a fake-quantized Linear (weights on a ``bits`` grid, uint8 input)."""

    def __init__(self, linear: nn.Linear, bits: int, lo: float, hi: float, name: str) -> None:
        super().__init__(linear, bits, name)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.x_scale, self.x_zero = _input_grid(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.voxfit.qlinear(  # type: ignore[no-any-return]
            x, self.weight, self.w_scale, self.bias, self.x_scale, self.x_zero
        )


def lower_int8_layers(model: nn.Module, layers: dict[str, int]) -> list[str]:
    """Replace each named calibrated Conv1d or Linear of ``model`` (in place) by a
    :class:`QConv1d` / :class:`QLinear` with ``layers[name]`` weight bits
    (``compile.int8_layers`` picks them); returns the names.

    Raises:
        ModelError: a named layer is not a calibrated, fake-quantized Conv1d or Linear.
    """
    from voxfit.models import ActivationQuantizer

    done = []
    for name, bits in layers.items():
        layer = model.get_submodule(name)
        quant = getattr(layer, "act_quant", None)
        if not isinstance(layer, (nn.Conv1d, nn.Linear)) or not isinstance(
            quant, ActivationQuantizer
        ):
            raise ModelError(f"{name}: not a Conv1d or Linear with an 8-bit activation quantizer")
        if not torch.isfinite(quant.lo):
            raise ModelError(f"{name}: 8-bit activations were never calibrated")
        lo, hi = float(quant.lo), float(quant.hi)
        deploy: nn.Module = (
            QConv1d(layer, bits, lo, hi, name)
            if isinstance(layer, nn.Conv1d)
            else QLinear(layer, bits, lo, hi, name)
        )
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, deploy)
        done.append(name)
    return done


@torch.library.custom_op("voxfit::wconv1d", mutates_args=())
def wconv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    bits: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    """conv1d(x, weight * w_scale) + bias; ``weight`` is int8 (O, C, K) on a ``bits`` grid, or
    float16 (``bits`` 16, ``w_scale`` ones)."""
    w = weight.to(torch.float32) * w_scale[:, None, None]
    return F.conv1d(x, w, bias, stride, padding, dilation)


@wconv1d.register_fake
def _wconv1d_shape(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor,
    bits: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    return _conv1d_out(x, weight, stride, padding, dilation)


class WConv1d(_StoredConv):
    """The deploy form of a Conv1d with 4-, 8- or 16-bit weights and float activations."""

    def __init__(self, conv: nn.Conv1d, bits: int, name: str) -> None:
        super().__init__(conv, bits, name, "pack weights")
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.voxfit.wconv1d(  # type: ignore[no-any-return]
            x,
            self.weight,
            self.w_scale,
            self.bias,
            self.bits,
            self.stride,
            self.padding,
            self.dilation,
        )


def lower_weight_convs(model: nn.Module, layers: dict[str, int]) -> list[str]:
    """Replace each named Conv1d of ``model`` (in place) by a :class:`WConv1d` with
    ``layers[name]`` weight bits (``compile.packed_convs`` picks them); returns the names.

    Raises:
        ModelError: a named layer is not a Conv1d, or its weights are off the grid.
    """
    done = []
    for name, bits in layers.items():
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv1d):
            raise ModelError(f"{name}: not a Conv1d")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, WConv1d(conv, bits, name))
        done.append(name)
    return done
