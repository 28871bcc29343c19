"""Fake quantization: per-output-channel symmetric weights, per-tensor activations.

Weights at 8 or 4 bits are rounded to a symmetric integer grid per output channel
(scale = max|w| / (2^(b-1) - 1)); at 16 bits they are rounded to float16; at 32 bits they
are left alone. Activations (a layer's input) at 8 bits are rounded to an asymmetric uint8
grid whose range was calibrated on training data; at 16 bits to float16. Optionally
(``pair_safe``) 8-bit conv weights are kept within what a u8 x s8 pair instruction can add
without saturating, for int8 kernels that must compute the fake-quantized model exactly;
or (``attach_pair_saturation``) the model computes what such kernels compute, saturation
included, so the accuracy a search judges is the deployed library's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from voxfit.errors import ModelError
from voxfit.models import PAIR_BOUND, ActivationQuantizer, effective_weight


@contextmanager
def fake_quant_off(model: nn.Module, only: Iterable[str] | None = None) -> Iterator[None]:
    """Within the block every ActivationQuantizer of ``model`` (``only``: those of these
    layers, their ``act_quant``) passes its input through.

    The weights stay as they are (already rounded by ``apply``), so the model computes what
    a deployment with float activations computes: the graph exporters (ONNX, torch.export)
    and the checks against their output use it. The bit-widths are restored on exit, also
    after an exception.
    """
    if only is None:
        quants = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    else:
        found = (getattr(model.get_submodule(n), "act_quant", None) for n in only)
        quants = [q for q in found if isinstance(q, ActivationQuantizer)]
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


#: int16 range a u8 x s8 pair instruction (AVX2's vpmaddubsw) saturates its pair sums to
INT16 = (-32768.0, 32767.0)


def attach_pair_saturation(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Make each named Conv1d or Linear with 8-bit weights and an 8-bit activation quantizer
    compute what an int8 kernel built on a u8 x s8 pair instruction computes (AVX2 without VNNI:
    ``vpmaddubsw`` sums the two products of adjacent input channels of one tap into a
    saturating int16, ``vpmaddwd`` adds those pairs exactly). A forward hook adds the
    saturation's effect to the float conv's output; it is off while the quantizer is
    (``fake_quant_off``: exporters and compilers never see it). Returns the names it hooked.
    """
    hooked = []
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, (nn.Conv1d, nn.Linear)) and isinstance(
            getattr(layer, "act_quant", None), ActivationQuantizer
        ):
            layer.register_forward_hook(_saturate_pairs)
            layer.int8_pair_saturation = True  # type: ignore[assignment]
            hooked.append(name)
    return hooked


@contextmanager
def pair_saturation_off(model: nn.Module) -> Iterator[list[str]]:
    """Within the block the layers :func:`attach_pair_saturation` hooked compute the plain
    fake-quantized conv (what onnxruntime's int8 computes); yields their names."""
    hooked = [n for n, m in model.named_modules() if getattr(m, "int8_pair_saturation", False)]
    for n in hooked:
        setattr(model.get_submodule(n), "int8_pair_saturation", False)  # noqa: B010
    try:
        yield hooked
    finally:
        for n in hooked:
            setattr(model.get_submodule(n), "int8_pair_saturation", True)  # noqa: B010


def _saturate_pairs(
    module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
) -> torch.Tensor | None:
    if not getattr(module, "int8_pair_saturation", False):
        return None
    quant = module.get_submodule("act_quant")
    if not isinstance(quant, ActivationQuantizer) or quant.bits != 8 or quant.calibrating:
        return None
    scale, zero = quant.grid()
    linear = isinstance(module, nn.Linear)
    with torch.no_grad():
        x = args[0]
        # a Linear is a one-tap conv over its input's other axes (features last)
        x = x.reshape(1, -1, x.shape[-1]).transpose(1, 2) if linear else x
        weight = effective_weight(module)  # a merged LoRA's weight is what deploys
        weight = weight[:, :, None] if linear else weight
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
        w_scale = weight.abs().amax(dim=(1, 2)) / 127.0
        wq = torch.round(weight / w_scale.clamp_min(1e-30)[:, None, None])
        if isinstance(module, nn.Conv1d):
            geometry = (module.stride[0], _int(module.padding), module.dilation[0])
        else:
            geometry = (1, 0, 1)  # one tap
        excess = pair_saturation_excess(q, wq, float(zero), *geometry)
    if excess is None:
        return None
    delta = excess * (scale * w_scale)[None, :, None]
    if linear:
        return output + delta.transpose(1, 2).reshape(output.shape)
    return output + delta


def _int(padding: object) -> int:
    if isinstance(padding, tuple):
        return int(padding[0])
    raise ModelError(f"conv padding {padding!r}: pair saturation needs a number")


def pair_saturation_excess(
    q: torch.Tensor, wq: torch.Tensor, zero: float, stride: int, padding: int, dilation: int
) -> torch.Tensor | None:
    """What saturating each pair sum to int16 changes in an integer conv1d's accumulators:
    ``sum over taps and channel pairs (clamp(p) - p)`` with ``p = q[2j] w[2j] + q[2j+1]
    w[2j+1]``, for ``q`` (N, C, T) uint8 values (time padded with ``zero``, as the int8
    kernels pad) and ``wq`` (O, C, K) int8 values; None where no pair of ``wq`` can saturate
    (only same-signed pairs with ``|a| + |b| > 128`` can)."""
    n, c, t = q.shape
    o, _, k = wq.shape
    if c % 2:  # the kernels pad channels with zero inputs and weights
        q = F.pad(q, (0, 0, 0, 1))
        wq = F.pad(wq, (0, 0, 0, 1))
    a, b = wq[:, 0::2], wq[:, 1::2]  # (O, C/2, K)
    risky = (a * b > 0) & (a.abs() + b.abs() > PAIR_BOUND)
    if not bool(risky.any()):
        return None
    qp = F.pad(q, (padding, padding), value=zero)
    t_out = (t + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    excess = q.new_zeros(n, o, t_out)
    for tap in range(k):
        ro, rj = torch.nonzero(risky[:, :, tap], as_tuple=True)
        if not len(ro):
            continue
        start = tap * dilation
        xk = qp[:, :, start : start + stride * (t_out - 1) + 1 : stride]  # (N, C, T_out)
        p = (
            xk[:, 2 * rj] * a[ro, rj, tap][None, :, None]
            + xk[:, 2 * rj + 1] * b[ro, rj, tap][None, :, None]
        )
        excess.index_add_(1, ro, p.clamp(*INT16) - p)
    return excess
