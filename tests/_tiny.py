"""The tiny model every test builds, defined once (``conftest.py`` wraps it in fixtures;
tests that need several fresh copies call :func:`tiny_tdnn` directly)."""

from __future__ import annotations

import torch
from torch import nn

from voxfit.hw_profiles import HostInfo, describe_host
from voxfit.models import build_model, default_config


def fake_host(name: str, family: int, model: int, flags: str = "avx avx2 fma") -> HostInfo:
    """The host a 2-core AMD CPU of this family/model/name (``/proc/cpuinfo`` as it would
    read) describes: another host than this one, for the tests of host-aware models."""
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
        f"cpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: {name}\nflags\t\t: {flags}\n"
    )
    return describe_host(text, cores=2)


def tiny_tdnn(outputs: int = 12, *, seed: int = 0, varied_bn: bool = True) -> nn.Module:
    """A tiny ``tdnn`` in eval mode, the same weights for the same ``seed``.

    ``varied_bn``: non-trivial BatchNorm statistics, so folding and export are really
    tested (a fresh model's running mean 0 / var 1 would hide a dropped BatchNorm).
    """
    torch.manual_seed(seed)
    m = build_model(default_config("tdnn", outputs, "tiny")).eval()
    if varied_bn:
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


# The smallest real search space over the tiny model (stream pruning, 8/32-bit weights,
# adapters), written as a user would.
CI_TINY_SPACE = """
schema_version: 1
name: ci-tiny
model: tdnn
pruning:
  groups: {stream: [0.5, 1.0]}
quantization:
  weight_bits: {"*": [8, 32]}
adapters:
  slots: {"blocks.*": [0, 8]}
"""


# The same for the tiny conformer: whole attention heads and FFN widths, 8/32-bit weights,
# residual and LoRA adapters.
CI_TINY_CONFORMER_SPACE = """
schema_version: 1
name: ci-tiny-conformer
model: conformer
pruning:
  groups: {"blocks.*.ff1": [0.5, 1.0], "blocks.*.attn.heads": [0.5, 1.0]}
quantization:
  weight_bits: {"*": [8, 32]}
adapters:
  kinds: [residual, lora]
  slots: {"blocks.*": [0, 8]}
"""
