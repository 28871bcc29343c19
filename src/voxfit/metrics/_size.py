"""What a device stores: parameter bytes at the planned bit-widths, packed."""

from __future__ import annotations

import math

from torch import nn

from voxfit.models import ActivationQuantizer, Adapter
from voxfit.plan import plan_of


def packed_size_bytes(model: nn.Module) -> int:
    """Bytes to store ``model`` as planned (its Candidate from ``compress.apply``).

    Quantized weights are packed at their bit-width (4-bit: two per byte) plus one float32
    scale per output channel (8 and 4 bits) — float16 weights need none. Everything else
    (biases, norms, BatchNorm statistics, adapters, activation ranges) is float32.
    """
    plan = plan_of(model)
    bits = {x.name: x.weight_bits for x in plan.layers}
    adapters = [n + "." for n, m in model.named_modules() if isinstance(m, Adapter)]
    total = 0
    for mod_name, mod in model.named_modules():
        is_adapter_part = (mod_name + ".").startswith(tuple(adapters))
        for pname, p in mod.named_parameters(recurse=False):
            b = bits.get(mod_name, 32) if pname == "weight" and not is_adapter_part else 32
            total += math.ceil(p.numel() * b / 8)
            if b in (4, 8):
                total += 4 * p.shape[0]
        for bname, buf in mod.named_buffers(recurse=False):
            if bname == "num_batches_tracked":
                continue
            if isinstance(mod, ActivationQuantizer) and mod.bits != 8:
                continue
            total += 4 * buf.numel()
    return total
