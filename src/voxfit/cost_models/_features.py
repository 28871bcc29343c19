"""Per-task features of a compressed model, and the matching per-task measured times.

A *task* here is one segment of the model as TVM runs it. For a backbone of Conv1d layers
(the TDNN family) the segments are the stem conv, each residual block (its convs, fused
batch-norm/ReLU/residual epilogues, and the adapter kernels that run inside it), and the
head (last conv, transpose and log-softmax). For any other model (the Conformer, a user's
model) a segment is the module that holds a group of its quantizable Linear/Conv1d layers --
``blocks.2.ff1``, ``blocks.2.attn``, ``blocks.2.conv``, ``stem``, ``head`` -- and its kind
says what runs there: a feed-forward pair, attention (a declared group of whole heads: the
projections plus the score and value matmuls), a convolution module (a depthwise conv
between pointwise layers), or plain conv layers. Shapes come from one forward pass with
hooks, so any architecture that declares its structure featurizes the same way.

The features are computed from the torch model alone -- shapes, channels, sequence length,
bits, FLOPs, bytes -- so a prediction needs no TVM conversion (microseconds for the conv
backbone, a forward pass of milliseconds otherwise). The labels come from one instrumented
TVM run of the compiled model (``LatencyResult.calls``): every kernel call is attributed to
the segment of the last *anchor* kernel before it -- the convs for the conv backbone, every
matmul and conv for the others -- whose numbers per segment are known from the torch model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from voxfit.errors import ModelError
from voxfit.models import (
    ATTENTION_KERNELS,
    LoRAAdapter,
    ResidualAdapter,
    StructuredModel,
    merge_adapters,
)
from voxfit.plan import plan_of

#: Segment kinds and adapter kinds as numbers (xgboost reads numbers). ``blocks``: the conv
#: backbone's residual blocks (the TDNN's); ``ffn`` to ``conv_block``: the modules of any
#: other model (``conv_block``: plain convs, counted by their matmul/conv anchors), so a
#: cost model that learned only the TDNN flags them as never seen instead of guessing.
KINDS = {
    "stem": 0,
    "blocks": 1,
    "head": 2,
    "ffn": 3,
    "attention": 4,
    "conv_module": 5,
    "conv_block": 6,
}
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
    # how the task's layers mix int8 and float compute (see _mixing): a library that
    # switches between them pays a conversion at each switch, in whichever task's kernels
    # run next to it, so the neighbours' layers count too
    "n_int8",
    "n_packed",
    "mflops_int8",
    "switch_in",
    "switch_inner",
    "switch_out",
)
#: the features a dataset collected before the mixing features lacks (recomputed from the
#: rows' plans by :func:`voxfit.cost_models.refeaturize`)
MIXING = FEATURES[FEATURES.index("n_int8") :]
INPUT_SEGMENT = "input"


#: Kernel names that mark a segment's compute (see :func:`attribute_calls`).
CONV_ANCHORS = ("conv1d",)
# the Conformer's attention products run as their own kernels (voxfit::attention)
ANY_ANCHORS = ("conv1d", "matmul", *ATTENTION_KERNELS)


@dataclass(frozen=True)
class Task:
    """One segment of a model: its name (``stem``, ``blocks.3``, ``blocks.3.attn``,
    ``head``), features, and the compiled kernels that mark it: ``anchors`` of them whose
    name has one of ``anchor_ops`` (0: ``n_convs`` of them)."""

    name: str
    features: dict[str, float]
    anchors: int = 0
    anchor_ops: tuple[str, ...] = CONV_ANCHORS

    @property
    def n_anchors(self) -> int:
        return self.anchors or int(self.features["n_convs"])

    @property
    def kind(self) -> str:
        return self.name.split(".")[0]


def segment_of(module_path: str) -> str:
    """``blocks.3.conv1`` -> ``blocks.3``; ``stem`` -> ``stem``."""
    parts = module_path.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def _convs(model: nn.Module) -> list[tuple[str, nn.Conv1d]] | None:
    """The quantizable layers of a conv backbone (stem/blocks/head of Conv1d layers), or
    None for any other model."""
    if not isinstance(model, StructuredModel):
        raise ModelError(f"{type(model).__name__} does not declare structure()")
    convs = []
    for name in model.structure().quantizable:
        m = model.get_submodule(name)
        if not isinstance(m, nn.Conv1d) or segment_of(name).split(".")[0] not in KINDS:
            return None
        convs.append((name, m))
    return convs


def _t_out(t: int, conv: nn.Conv1d) -> int:
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    p = conv.padding[0] if isinstance(conv.padding, tuple) else 0
    return int(math.floor((t + 2 * int(p) - d * (k - 1) - 1) / s + 1))


def _costs(
    adapter: str,
    adapter_dim: int,
    w_bits: Sequence[int],
    a_bits: Sequence[int],
    flops: float,
    weights: float,
    acts: float,
) -> dict[str, float]:
    """A task's adapter, bits and cost features (both decompositions share them)."""
    return {
        "adapter_kind": float(ADAPTERS[adapter]),
        "adapter_dim": float(adapter_dim),
        "w_bits_min": float(min(w_bits)),
        "a_bits_min": float(min(a_bits)),
        "mflops": flops / 1e6,
        "weight_kb": weights / 1e3,
        "act_kb": acts / 1e3,
    }


def decompose(model: nn.Module, frames: int) -> list[Task]:
    """The model's tasks in execution order, for an input of ``frames`` feature frames.

    Deterministic: the same model and frames give the same features, bit for bit.

    Raises:
        ModelError: a model without a structure declaration, or one whose layers cannot be
            traced (see :func:`_decompose_traced`).
    """
    plan = plan_of(model)
    bits = {lp.name: (lp.weight_bits, lp.act_bits) for lp in plan.layers}
    # what the deployed library runs: a merged LoRA adapter is its layer's weight, no op
    model = merge_adapters(model)
    convs = _convs(model)
    if convs is None:
        return _decompose_traced(model, frames, bits)
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
    layers: list[list[_Layer]] = []
    t = frames
    for seg, members in segments.items():
        t_in = t
        flops = 0.0
        weights = 0.0
        acts = 0.0
        stride = 1
        layers.append([])
        for name, conv in members:
            t_next = _t_out(t, conv)
            cin, cout, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
            layers[-1].append(_layer(bits.get(name, (32, 32)), 2.0 * cin * cout * k * t_next))
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
            **_costs(akind, adim, w_bits, a_bits, flops, weights, acts),
        }
        tasks.append(Task(seg, feats))
    for task, mix in zip(tasks, _mixing(layers), strict=True):
        task.features.update(mix)
    return tasks


def _parent(name: str) -> str:
    """``blocks.2.attn.q`` -> ``blocks.2.attn``; a top-level layer is its own segment."""
    return name.rpartition(".")[0] or name


@dataclass
class _Traced:
    """One Linear/Conv1d call of a traced forward pass."""

    name: str
    module: nn.Linear | nn.Conv1d
    t_in: int = 0
    t_out: int = 0

    @property
    def dims(self) -> tuple[int, int]:
        m = self.module
        if isinstance(m, nn.Linear):
            return m.in_features, m.out_features
        return m.in_channels, m.out_channels

    def costs(self) -> tuple[float, float, float]:
        """(FLOPs, weight bytes at float32, activation bytes at float32)."""
        m = self.module
        c_in, c_out = self.dims
        per_out = c_in if isinstance(m, nn.Linear) else c_in // m.groups * m.kernel_size[0]
        weights = sum(p.numel() for p in m.parameters(recurse=False))
        return (
            2.0 * per_out * c_out * self.t_out,
            4.0 * weights,
            4.0 * (c_in * self.t_in + c_out * self.t_out),
        )


def _trace(model: nn.Module, frames: int) -> list[_Traced]:
    """Every Linear/Conv1d call of one forward pass over ``frames`` zero frames, in call order,
    with its input and output lengths (tokens for a Linear). The model is not changed."""
    import torch

    from voxfit.models import n_mels_of

    names = {id(m): n for n, m in model.named_modules()}
    calls: list[_Traced] = []
    open_: dict[int, list[_Traced]] = {}

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        rec = _Traced(names[id(mod)], mod)  # type: ignore[arg-type]
        calls.append(rec)
        open_.setdefault(id(mod), []).append(rec)

    def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        rec = open_[id(mod)].pop()
        x = args[0]
        if isinstance(mod, nn.Linear):
            rec.t_in = x.numel() // x.shape[0] // mod.in_features
            rec.t_out = out.numel() // out.shape[0] // mod.out_features
        else:
            rec.t_in, rec.t_out = int(x.shape[-1]), int(out.shape[-1])

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            hooks.append(m.register_forward_pre_hook(pre))
            hooks.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, frames, n_mels_of(model)), torch.tensor([frames]))
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is named
        raise ModelError(
            f"cost-model features: {type(model).__name__} failed a forward pass of {frames} "
            f"frames ({type(e).__name__}: {e})"
        ) from e
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return calls


def _kind(seg: str, members: Sequence[_Traced], heads: bool) -> str:
    if seg in ("stem", "head"):
        return seg
    if heads:
        return "attention"
    convs = [r.module for r in members if isinstance(r.module, nn.Conv1d)]
    if any(c.groups > 1 and c.groups == c.in_channels for c in convs):
        return "conv_module"
    return "conv_block" if convs else "ffn"


@dataclass(frozen=True)
class _Layer:
    """One quantizable layer as the mixing features see it."""

    int8: bool  # 8-bit (or fewer) activations: int8 compute where the target has it
    packed: bool  # packed weights computed in float (unpacked in the kernel)
    flops: float


def _layer(bits: tuple[int, int], flops: float) -> _Layer:
    w, a = bits
    return _Layer(a <= 8, w < 32 and a > 8, flops)


def _mixing(per_task: Sequence[Sequence[_Layer]]) -> list[dict[str, float]]:
    """Per task (in execution order): its int8 layers, packed float layers, int8 MFLOPs, and
    the int8/float switches at its input (against the previous task's last layer; the
    model's input is float), between its layers, and at its output (against the next
    task's first layer; the model's output is float)."""
    flat = [x.int8 for layers in per_task for x in layers]
    out, i = [], 0
    for layers in per_task:
        kinds = [x.int8 for x in layers]
        before = flat[i - 1] if i > 0 else False
        after = flat[i + len(layers)] if i + len(layers) < len(flat) else False
        i += len(layers)
        out.append(
            {
                "n_int8": float(sum(kinds)),
                "n_packed": float(sum(x.packed for x in layers)),
                "mflops_int8": sum(x.flops for x in layers if x.int8) / 1e6,
                "switch_in": float(bool(kinds) and kinds[0] != before),
                "switch_inner": float(sum(a != b for a, b in zip(kinds, kinds[1:], strict=False))),
                "switch_out": float(bool(kinds) and kinds[-1] != after),
            }
        )
    return out


def _decompose_traced(
    model: nn.Module, frames: int, bits: dict[str, tuple[int, int]]
) -> list[Task]:
    """:func:`decompose` for any model that declares its structure: segments are the parents
    of its quantizable layers, in the order a forward pass first reaches them; a Linear/Conv1d
    that is not quantizable (an adapter's, a LoRA's) belongs to the segment that ran last.

    Raises:
        ModelError: the forward pass fails, or a quantizable layer never runs.
    """
    assert isinstance(model, StructuredModel)
    structure = model.structure()
    quantizable = set(structure.quantizable)
    # a group of whole heads (unit > 1) marks its projections' module as attention, which
    # also runs the score and value matmuls (two more anchors)
    head_segments = {
        _parent(m.module): g.unit
        for g in structure.groups
        if g.unit > 1
        for m in g.members
        if m.side == "out"
    }
    segments: dict[str, list[_Traced]] = {}
    extra: dict[str, list[_Traced]] = {}
    adapters: dict[str, tuple[str, int]] = {}
    current: str | None = None
    adapter_of = {
        f"{n}.{sub}": m
        for n, m in model.named_modules()
        if isinstance(m, (ResidualAdapter, LoRAAdapter))
        for sub in ("down", "up")
    }
    for rec in _trace(model, frames):
        if rec.name in quantizable:
            current = _parent(rec.name)
            segments.setdefault(current, []).append(rec)
            continue
        seg = current if current is not None else _parent(rec.name)
        extra.setdefault(seg, []).append(rec)
        segments.setdefault(seg, [])
        adapter = adapter_of.get(rec.name)
        if adapter is not None:
            adapters[seg] = (adapter.adapter_kind, adapter.down.out_features)
    missing = sorted(quantizable - {r.name for rs in segments.values() for r in rs})
    if missing:
        raise ModelError(f"cost-model features: layer(s) {missing} never ran in a forward pass")
    tasks = []
    layers: list[list[_Layer]] = []
    for seg, members in segments.items():
        layers.append([_layer(bits.get(r.name, (32, 32)), r.costs()[0]) for r in members])
        runs = members + extra.get(seg, [])
        if not members:  # non-quantizable layers before any quantizable one
            members = runs
        flops = weights = acts = 0.0
        for r in runs:
            f, w, act = r.costs()
            flops, weights, acts = flops + f, weights + w, acts + act
        first, last = members[0], members[-1]
        n_anchors = len(runs)
        unit = head_segments.get(seg)
        if unit:
            t, width = first.t_out, first.dims[1]
            flops += 2 * 2.0 * t * t * width  # q k^T and the weights times v
            acts += 4.0 * (width // unit) * t * t  # one score matrix per head
            n_anchors += 2
        convs = [r.module for r in members if isinstance(r.module, nn.Conv1d)]
        stride = 1
        for c in convs:
            stride *= c.stride[0]
        akind, adim = adapters.get(seg, ("none", 0))
        w_bits = [bits.get(r.name, (32, 32))[0] for r in members]
        a_bits = [bits.get(r.name, (32, 32))[1] for r in members]
        feats: dict[str, float] = {
            "kind": float(KINDS[_kind(seg, members, bool(unit))]),
            "c_in": float(first.dims[0]),
            "hidden": float(first.dims[1]),
            "c_out": float(last.dims[1]),
            "kernel": float(max((c.kernel_size[0] for c in convs), default=1)),
            "dilation": float(convs[0].dilation[0] if convs else 1),
            "stride": float(stride),
            "t_in": float(first.t_in),
            "t_out": float(last.t_out),
            "n_convs": float(n_anchors),
            **_costs(akind, adim, w_bits, a_bits, flops, weights, acts),
        }
        tasks.append(Task(seg, feats, anchors=n_anchors, anchor_ops=ANY_ANCHORS))
    for task, mix in zip(tasks, _mixing(layers), strict=True):
        task.features.update(mix)
    return tasks


def attribute_calls(
    calls: Sequence[tuple[str, float]], tasks: Sequence[Task]
) -> tuple[dict[str, float], float]:
    """Split measured kernel times over ``tasks``; returns (ms per task, unattributed ms).

    Anchors are the kernels whose name has one of the tasks' ``anchor_ops`` (``conv1d`` for
    a conv backbone; ``matmul`` or ``conv1d`` otherwise); they must appear in the tasks'
    order and number. Kernels before the first anchor (input layout) are unattributed.

    Raises:
        ModelError: the compiled model's conv kernels do not line up with the tasks.
    """
    ops = tasks[0].anchor_ops if tasks else CONV_ANCHORS
    owners = [t.name for t in tasks for _ in range(t.n_anchors)]

    def anchor(name: str) -> bool:
        return any(op in name for op in ops)

    n_calls = sum(anchor(name) for name, _ in calls)
    if n_calls != len(owners):
        what = "conv" if ops == CONV_ANCHORS else "matmul/conv"
        raise ModelError(
            f"compiled model runs {n_calls} {what} kernels, the torch model has "
            f"{len(owners)}: cannot attribute kernel times"
        )
    out = {t.name: 0.0 for t in tasks}
    loose = 0.0
    current: str | None = None
    i = 0
    for name, ms in calls:
        if anchor(name):
            current = owners[i]
            i += 1
        if current is None:
            loose += ms
        else:
            out[current] += ms
    return out, loose


def feature_rows(tasks: Sequence[Task], names: Sequence[str] = FEATURES) -> list[list[float]]:
    return [[t.features[f] for f in names] for t in tasks]


def describe(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    return [{"task": t.name, **t.features} for t in tasks]
