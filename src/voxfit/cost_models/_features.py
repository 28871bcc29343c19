"""Per-task features of a compressed model, and the matching per-task measured times.

A *task* here is one segment of the backbone as TVM runs it: the stem conv, each residual
block (its convs, fused batch-norm/ReLU/residual epilogues, and the adapter kernels that run
inside it), and the head (last conv, transpose and log-softmax). The features are computed
from the torch model alone -- shapes, channels, sequence length, bits, FLOPs, bytes -- so a
prediction needs no TVM conversion (microseconds, not seconds). The labels come from one
instrumented TVM run of the compiled model (``LatencyResult.calls``): every kernel call is
attributed to the segment of the backbone conv that ran last before it, which is exact for
models whose backbone is a sequence of convs (the TDNN family).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from voxfit.errors import ModelError
from voxfit.models import LoRAAdapter, ResidualAdapter, StructuredModel
from voxfit.plan import plan_of

#: Segment kinds and adapter kinds as numbers (xgboost reads numbers).
KINDS = {"stem": 0, "blocks": 1, "head": 2}
ADAPTERS = {"none": 0, "residual": 1, "lora": 2}

FEATURES = (
    "kind",
    "c_in",
    "hidden",
    "c_out",
    "kernel",
    "dilation",
    "stride",
    "t_in",
    "t_out",
    "n_convs",
    "adapter_kind",
    "adapter_dim",
    "w_bits_min",
    "a_bits_min",
    "mflops",
    "weight_kb",
    "act_kb",
)
INPUT_SEGMENT = "input"


@dataclass(frozen=True)
class Task:
    """One segment of a model: its name (``stem``, ``blocks.3``, ``head``) and features."""

    name: str
    features: dict[str, float]

    @property
    def kind(self) -> str:
        return self.name.split(".")[0]


def segment_of(module_path: str) -> str:
    """``blocks.3.conv1`` -> ``blocks.3``; ``stem`` -> ``stem``."""
    parts = module_path.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv1d]]:
    if not isinstance(model, StructuredModel):
        raise ModelError(f"{type(model).__name__} does not declare structure()")
    quantizable = model.structure().quantizable
    convs = []
    for name in quantizable:
        m = model.get_submodule(name)
        if not isinstance(m, nn.Conv1d):
            raise ModelError(
                f"cost-model features support conv backbones (the tdnn family); "
                f"{name} is a {type(m).__name__}"
            )
        if segment_of(name).split(".")[0] not in KINDS:
            raise ModelError(f"cost-model features: {name} is not in a stem/blocks/head segment")
        convs.append((name, m))
    return convs


def _t_out(t: int, conv: nn.Conv1d) -> int:
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    p = conv.padding[0] if isinstance(conv.padding, tuple) else 0
    return int(math.floor((t + 2 * int(p) - d * (k - 1) - 1) / s + 1))


def decompose(model: nn.Module, frames: int) -> list[Task]:
    """The model's tasks in execution order, for an input of ``frames`` feature frames.

    Deterministic: the same model and frames give the same features, bit for bit.

    Raises:
        ModelError: a model whose backbone is not a sequence of Conv1d layers.
    """
    plan = plan_of(model)
    bits = {lp.name: (lp.weight_bits, lp.act_bits) for lp in plan.layers}
    convs = _convs(model)
    adapters: dict[str, tuple[str, int]] = {}
    for path, m in model.named_modules():
        if isinstance(m, ResidualAdapter):
            adapters[segment_of(path)] = ("residual", m.down.out_features)
        elif isinstance(m, LoRAAdapter):
            adapters[segment_of(path)] = ("lora", m.down.out_features)  # conv's .lora
    segments: dict[str, list[tuple[str, nn.Conv1d]]] = {}
    for name, conv in convs:
        segments.setdefault(segment_of(name), []).append((name, conv))
    tasks = []
    t = frames
    for seg, members in segments.items():
        t_in = t
        flops = 0.0
        weights = 0.0
        acts = 0.0
        stride = 1
        for _, conv in members:
            t_next = _t_out(t, conv)
            cin, cout, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
            flops += 2.0 * cin * cout * k * t_next
            weights += 4.0 * (cin * cout * k + cout)
            acts += 4.0 * (cin * t + cout * t_next)
            stride *= conv.stride[0]
            t = t_next
        akind, adim = adapters.get(seg, ("none", 0))
        first, last = members[0][1], members[-1][1]
        if adim:
            c = last.out_channels
            flops += 2.0 * 2 * c * adim * t
            weights += 4.0 * 2 * c * adim
            acts += 4.0 * 2 * c * t
        w_bits = [bits.get(n, (32, 32))[0] for n, _ in members]
        a_bits = [bits.get(n, (32, 32))[1] for n, _ in members]
        feats: dict[str, float] = {
            "kind": float(KINDS[seg.split(".")[0]]),
            "c_in": float(first.in_channels),
            "hidden": float(first.out_channels),
            "c_out": float(last.out_channels),
            "kernel": float(max(c.kernel_size[0] for _, c in members)),
            "dilation": float(first.dilation[0]),
            "stride": float(stride),
            "t_in": float(t_in),
            "t_out": float(t),
            "n_convs": float(len(members)),
            "adapter_kind": float(ADAPTERS[akind]),
            "adapter_dim": float(adim),
            "w_bits_min": float(min(w_bits)),
            "a_bits_min": float(min(a_bits)),
            "mflops": flops / 1e6,
            "weight_kb": weights / 1e3,
            "act_kb": acts / 1e3,
        }
        tasks.append(Task(seg, feats))
    return tasks


def attribute_calls(
    calls: Sequence[tuple[str, float]], tasks: Sequence[Task]
) -> tuple[dict[str, float], float]:
    """Split measured kernel times over ``tasks``; returns (ms per task, unattributed ms).

    Backbone convs are the kernels whose name has ``conv1d``; they must appear in the
    tasks' order and number. Kernels before the first conv (input layout) are unattributed.

    Raises:
        ModelError: the compiled model's conv kernels do not line up with the tasks.
    """
    n_convs = [int(t.features["n_convs"]) for t in tasks]
    owners = [t.name for t, n in zip(tasks, n_convs, strict=True) for _ in range(n)]
    conv_calls = [name for name, _ in calls if "conv1d" in name]
    if len(conv_calls) != len(owners):
        raise ModelError(
            f"compiled model runs {len(conv_calls)} conv kernels, the torch model has "
            f"{len(owners)} convs: cannot attribute kernel times"
        )
    out = {t.name: 0.0 for t in tasks}
    loose = 0.0
    current: str | None = None
    i = 0
    for name, ms in calls:
        if "conv1d" in name:
            current = owners[i]
            i += 1
        if current is None:
            loose += ms
        else:
            out[current] += ms
    return out, loose


def feature_rows(tasks: Sequence[Task]) -> list[list[float]]:
    return [[t.features[f] for f in FEATURES] for t in tasks]


def describe(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    return [{"task": t.name, **t.features} for t in tasks]
