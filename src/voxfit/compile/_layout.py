"""Time-major int8 chains: the transposes between int8 conv kernels, cancelled in Relax.

The deploy graph is NCW (torch's Conv1d layout), but an int8 conv kernel reads its input
time-major (one time step's channels are one instruction operand) and accumulates
time-major (``_int8.qconv1d_int8``). In NCW every such kernel transposes twice: its uint8
input gathers one channel per row, its float output scatters one. For the pruned convs a
search keeps that costs about as much as the multiply-adds: a 64 -> 256 channel 1x1 conv
over 100 frames took 84 us in NCW and 44 us time-major, tuned alike (an ad hoc script, 64
trials each, AVX2 profile, 2026-12-07; 256 -> 64 channels k=3: 87 / 63 us; 256 -> 256 k=1:
143 / 86 us). Whole models: ``benchmarks/int8_layout.py``.

So the importer emits each int8 conv both ways: ``permute -> time-major kernel -> permute``
and the NCW kernel beside it. :func:`time_major_chains` rewrites the graph so that the
elementwise ops between time-major kernels (the folded BatchNorm's multiply and add, ReLU,
the residual add) run on the time-major tensors and the transposes meet and cancel:
``permute(permute(x))`` is ``x``. A transpose survives only where a tensor leaves the chain
(a float layer, a reshape, an op not listed in :data:`ELEMENTWISE`), and there it is what
the NCW kernel did inside, plus a kernel of its own: a plan that alternates int8 and float
layers ran 6% slower so (ad hoc, 2026-12-07). So :func:`choose_layouts` keeps, per conv,
the NCW kernel where both its transposes would survive (an int8 conv between float
layers), the time-major one elsewhere, and the NCW graph whole where the result still has
more transposes than it (:func:`transposes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tvm
from tvm import relax

# elementwise Relax ops whose result is the same op of transposed operands transposed
ELEMENTWISE = frozenset(
    {
        "relax.add",
        "relax.subtract",
        "relax.multiply",
        "relax.divide",
        "relax.maximum",
        "relax.minimum",
        "relax.nn.relu",
        "relax.nn.silu",
        "relax.nn.gelu",
        "relax.sigmoid",
        "relax.tanh",
        "relax.negative",
        "relax.exp",
        "relax.clip",
    }
)
_SWAP = (0, 2, 1)


def _rank3(e: Any) -> bool:
    sinfo = e.ty
    return isinstance(sinfo, relax.TensorType) and sinfo.ndim == 3


def _is_swap(call: Any) -> bool:
    """``permute_dims(x, [0, 2, 1])`` of a 3-D tensor."""
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return False
    if call.op.name != "relax.permute_dims" or not _rank3(call.args[0]):
        return False
    axes = call.attrs.axes
    return axes is not None and tuple(int(a) for a in axes) == _SWAP


@relax.expr_functor.mutator
class _TimeMajor(relax.PyExprMutator):  # type: ignore[misc]
    """Tracks, for each 3-D var, a var holding its transpose (``self.swapped``), emitting
    the transposed twin of each elementwise op whose operands all have one; a transpose of
    a var that has a twin becomes that twin."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.swapped: dict[Any, Any] = {}
        self.cancelled = 0

    def _operand(self, e: Any) -> Any:
        """``e`` transposed, or None: a var's twin, a constant laid out again."""
        if isinstance(e, relax.Var):
            return self.swapped.get(e)
        if isinstance(e, tvm.ir.expr.Constant):
            arr: Any = getattr(e, "value", None)
            if not hasattr(arr, "shape"):  # a scalar value (clip's bounds)
                return e
            v = arr.numpy()
            if v.size == 1:  # a scalar broadcasts the same either way
                return e
            if v.ndim <= 3:  # broadcast against a 3-D tensor: leading 1s, then transposed
                v = v.reshape((1,) * (3 - v.ndim) + v.shape)
                return relax.const(np.ascontiguousarray(v.transpose(_SWAP)))
        return None

    def visit_var_binding_(self, binding: Any) -> None:
        value = self.visit_expr(binding.value)
        if _is_swap(value) and value.args[0] in self.swapped:
            value = self.swapped[value.args[0]]  # permute(permute(x)) = x
            self.cancelled += 1
        var = binding.var
        self.builder_.emit_normalized(relax.VarBinding(var, value))
        if not _rank3(var):
            return
        if _is_swap(value):
            self.swapped[var] = value.args[0]
            self.swapped.setdefault(value.args[0], var)
        elif isinstance(value, relax.Var) and value in self.swapped:
            self.swapped[var] = self.swapped[value]
        elif (
            isinstance(value, relax.Call)
            and isinstance(value.op, tvm.ir.Op)
            and value.op.name in ELEMENTWISE
        ):
            args = [self._operand(a) for a in value.args]
            if all(a is not None for a in args) and any(isinstance(a, relax.Var) for a in args):
                twin = self.builder_.emit(relax.Call(value.op, args, value.attrs))
                self.swapped[var] = twin
                self.swapped[twin] = var


def transposes(mod: tvm.IRModule) -> int:
    """How many ``permute_dims(x, [0, 2, 1])`` of 3-D tensors ``mod``'s functions hold."""
    n = 0

    def visit(e: Any) -> None:
        nonlocal n
        n += _is_swap(e)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return n


def time_major_chains(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with the elementwise ops between transposes moved to the transposed side,
    so transposes cancel (see the module docstring); then the tensors and kernels nothing
    reads any more are dropped. Returns the module and how many transposes cancelled;
    ``mod`` itself is left as it was."""
    mod = mod.clone()  # the functions are replaced: not in the caller's module
    rewriter = _TimeMajor(mod)
    return _rewrite(mod, rewriter), rewriter.cancelled


def _rewrite(mod: tvm.IRModule, rewriter: Any) -> tvm.IRModule:
    """``mod`` (a copy the caller made; its functions are replaced) with every Relax
    function rewritten by ``rewriter`` (a ``PyExprMutator`` of it), then what nothing reads
    dropped."""
    funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
    for gv, func in funcs:
        mod[gv] = rewriter.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)


def _bindings(mod: tvm.IRModule) -> list[Any]:
    """Every ``VarBinding`` of ``mod``'s Relax functions, in order."""
    return [
        b
        for _, f in mod.functions_items()
        if isinstance(f, relax.Function) and isinstance(f.body, relax.SeqExpr)
        for block in f.body.blocks
        for b in block.bindings
        if isinstance(b, relax.VarBinding)
    ]


def callee(value: Any) -> str | None:
    """The name of the PrimFunc a ``call_tir`` calls (None: not a ``call_tir``)."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    if value.op.name != "relax.call_tir":
        return None
    return str(value.args[0].name_hint)


@relax.expr_functor.mutator
class _Ncw(relax.PyExprMutator):  # type: ignore[misc]
    """Reads each listed conv's NCW kernel where the graph read the transpose of its
    time-major kernel's output (``self.ncw``: that transpose's var -> the NCW kernel's)."""

    def __init__(self, mod: tvm.IRModule, ncw: dict[Any, Any]) -> None:
        super().__init__(mod)
        self.ncw = ncw

    def visit_dataflow_var_(self, op: Any) -> Any:
        return self.ncw.get(op, op)

    def visit_var_(self, op: Any) -> Any:
        return self.ncw.get(op, op)


def _with_ncw(
    mod: tvm.IRModule, twins: Sequence[tuple[str, str]], which: set[int]
) -> tvm.IRModule:
    """``mod`` with the convs ``which`` (indices into ``twins``) reading their NCW kernels and
    the rest their time-major ones; what nothing reads is dropped."""
    calls = {}  # callee -> var of its call
    swaps = {}  # var -> var of its transpose
    for b in _bindings(mod):
        if (name := callee(b.value)) is not None:
            calls[name] = b.var
        elif _is_swap(b.value):
            swaps[b.value.args[0]] = b.var
    # the NCW kernel's output where the time-major one's transpose was read
    ncw = {swaps[calls[tm]]: calls[nc] for i, (tm, nc) in enumerate(twins) if i in which}
    if not ncw:  # every conv time-major: only the unread NCW kernels to drop
        return relax.transform.DeadCodeElimination()(mod)
    mod = mod.clone()
    return _rewrite(mod, _Ncw(mod, ncw))


def _stranded(mod: tvm.IRModule, twins: Sequence[tuple[str, str]]) -> set[int]:
    """The convs (indices into ``twins``) whose time-major kernel in ``mod`` still reads a
    transpose and is still read through one: neither side joined a chain."""
    calls = {}
    swapped = set()  # vars something transposes
    values = {}
    for b in _bindings(mod):
        values[b.var] = b.value
        if (name := callee(b.value)) is not None:
            calls[name] = b
        elif _is_swap(b.value):
            swapped.add(b.value.args[0])
    out = set()
    for i, (tm, _) in enumerate(twins):
        if (b := calls.get(tm)) is None:
            continue
        x = b.value.args[1][0]
        if _is_swap(values.get(x)) and b.var in swapped:
            out.add(i)
    return out


def choose_layouts(mod: tvm.IRModule, twins: Sequence[tuple[str, str]]) -> tvm.IRModule:
    """Per tensorized conv, its time-major or its NCW kernel (``twins``: their callees, both
    called in ``mod`` on the same input, the time-major one between transposes): time-major
    chains (:func:`time_major_chains`), with the NCW kernel where both of a conv's
    transposes would be left (until no such conv is left); the NCW graph where the result
    has more transposes than it. The kernels not chosen are dropped."""
    which: set[int] = set()
    while True:
        chained, _ = time_major_chains(_with_ncw(mod, twins, which))
        stranded = _stranded(chained, twins) - which
        if not stranded:
            break
        which |= stranded
    left = transposes(chained)
    if not left:  # no graph has fewer (an all-int8 plan): the NCW one need not be built
        return chained
    ncw = _with_ncw(mod, twins, set(range(len(twins))))
    return ncw if left > transposes(ncw) else chained
