"""Time-major int8 chains (voxfit.compile._layout): the transposes between int8 kernels
cancel, the ones a tensor needs to leave the chain stay, and the graph computes the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from tests._tiny import tiny_tdnn  # noqa: E402
from voxfit.compile._build import _compile_fused, fuse  # noqa: E402
from voxfit.compile._compile import export_program  # noqa: E402
from voxfit.compile._import import load_program  # noqa: E402
from voxfit.compile._layout import callee, time_major_chains  # noqa: E402
from voxfit.compress import apply  # noqa: E402
from voxfit.plan import Candidate, LayerPlan  # noqa: E402

AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 1}


def _ops(mod: tvm.IRModule, name: str) -> int:
    """How many calls to the Relax op ``name`` main holds."""
    n = 0

    def visit(e: Any) -> None:
        nonlocal n
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name:
            n += 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return n


def _run(mod: tvm.IRModule, x: np.ndarray, fused: bool = False) -> list[np.ndarray]:
    """``mod``'s outputs, built untuned (default schedules) for this CPU."""
    target = tvm.target.Target(AVX2)
    if fused:  # a model: the compile path's own passes, no records
        ex = _compile_fused(ms.database.MemoryDatabase(), fuse(mod, target), target)
    else:
        ex = tvm.compile(mod, target=target)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    items = [out] if hasattr(out, "numpy") else list(out)  # one tensor, or a tuple
    return [o.numpy() for o in items]


@pytest.mark.tvm
def test_an_int8_tdnn_runs_time_major_from_input_to_output(tmp_path: Path) -> None:
    m = tiny_tdnn()
    s = m.structure()
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64])) for _ in range(2)]
    q = apply(
        m, Candidate(layers=tuple(LayerPlan(n, 8, 8) for n in s.quantizable)), calibration=cal
    )
    program = str(export_program(q, 64, tmp_path / "p.pt2"))
    ncw, *_ = load_program(program, int8=True, lanes=8, time_major=False)
    ncw = relax.transform.DeadCodeElimination()(ncw)  # as the time-major import ends
    tm, _, _, n_int8 = load_program(program, int8=True, lanes=8)
    assert n_int8 == len(s.quantizable)
    # NCW: the model's own two transposes (time-major features in, log-probs out); every
    # int8 kernel transposes inside. Time-major: the chain runs from input to output with
    # none, the folded BatchNorms, ReLUs and residual adds on time-major tensors
    assert _ops(ncw, "relax.permute_dims") == 2
    assert _ops(tm, "relax.permute_dims") == 0
    assert _ops(tm, "relax.nn.relu") == _ops(ncw, "relax.nn.relu") > 0
    assert _ops(tm, "relax.add") == _ops(ncw, "relax.add") > 0
    x = torch.randn(1, 64, 80, generator=torch.Generator().manual_seed(1)).numpy()
    (a,) = _run(ncw, x, fused=True)
    (b,) = _run(tm, x, fused=True)
    assert a.shape == b.shape
    # the same integer arithmetic; only the float epilogue's order may differ
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = q(torch.from_numpy(x), torch.tensor([64]))[0].numpy()
    np.testing.assert_allclose(b[0], ref[0], rtol=1e-4, atol=1e-4)


def _program(mod: tvm.IRModule) -> list[tuple[Any, ...]]:
    """main's bindings in order: each Relax op by name, each ``call_tir`` by its callee's
    structure (not its name: a module that emitted more kernels numbers them differently)."""
    out: list[tuple[Any, ...]] = []
    for b in mod["main"].body.blocks[0].bindings:
        v = b.value
        if (name := callee(v)) is not None:
            out.append(("relax.call_tir", tvm_ffi.structural_hash(mod[name])))
        elif isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op):
            out.append((v.op.name,))
        else:
            out.append((type(v).__name__,))
    return out


def _import_plan(tmp_path: Path, int8_layers: set[str]) -> tuple[Any, str]:
    """The tiny TDNN with 8-bit activations in ``int8_layers`` (8-bit weights everywhere),
    exported: (the torch model, its program file)."""
    m = tiny_tdnn()
    names = m.structure().quantizable
    layers = tuple(LayerPlan(n, 8, 8 if n in int8_layers else 32) for n in names)
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64])) for _ in range(2)]
    q = apply(m, Candidate(layers=layers), calibration=cal)
    return q, str(export_program(q, 64, tmp_path / "p.pt2"))


@pytest.mark.tvm
def test_a_plan_that_alternates_int8_and_float_layers_keeps_ncw_kernels(tmp_path: Path) -> None:
    """Every conv1 int8, every conv2 and the head float: no chain worth running time-major,
    each int8 conv would keep both its transposes as kernels of their own (6% slower
    measured), so the import is the NCW one."""
    _, program = _import_plan(tmp_path, {"stem", "blocks.0.conv1", "blocks.1.conv1"})
    got, _, _, n_int8 = load_program(program, int8=True, lanes=8)
    ncw, *_ = load_program(program, int8=True, lanes=8, time_major=False)
    assert n_int8 == 3
    ncw = relax.transform.DeadCodeElimination()(ncw)
    assert _program(got) == _program(ncw)
    assert _ops(got, "relax.permute_dims") == 2  # the model's own


@pytest.mark.tvm
def test_an_int8_conv_between_float_layers_runs_ncw_beside_a_time_major_chain(
    tmp_path: Path,
) -> None:
    """blocks.0.conv1 int8 between a float stem and a float conv2: both its transposes would
    stay, so it keeps its NCW kernel; blocks.1 and the head form a chain that runs
    time-major (the model's output transpose cancels), so the graph has no more
    transposes than the NCW one. Taking the whole graph time-major or NCW instead (as
    before) would leave 4 transposes, or NCW kernels in the chain."""
    q, program = _import_plan(
        tmp_path, {"blocks.0.conv1", "blocks.1.conv1", "blocks.1.conv2", "head"}
    )
    got, _, _, n_int8 = load_program(program, int8=True, lanes=8)
    ncw, *_ = load_program(program, int8=True, lanes=8, time_major=False)
    assert n_int8 == 4
    # the two convs to 48 channels: blocks.0.conv1 writes NCW, blocks.1.conv1 time-major
    outs = []

    def visit(e: Any) -> None:
        if callee(e) is not None and "conv1d_u8s8" in e.args[0].name_hint:
            outs.append(tuple(int(d) for d in e.ty.shape.values))

    relax.analysis.post_order_visit(got["main"].body, visit)
    assert len(outs) == 4
    assert sorted(o for o in outs if 48 in o) == [(1, 32, 48), (1, 48, 32)]
    # the model's input transpose (the stem is float) and blocks.1.conv1's input's
    assert _ops(got, "relax.permute_dims") == _ops(ncw, "relax.permute_dims") == 2
    x = torch.randn(1, 64, 80, generator=torch.Generator().manual_seed(1)).numpy()
    (a,) = _run(ncw, x, fused=True)
    (b,) = _run(got, x, fused=True)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = q(torch.from_numpy(x), torch.tensor([64]))[0].numpy()
    np.testing.assert_allclose(b[0], ref[0], rtol=1e-4, atol=1e-4)


def test_transposes_stay_where_a_tensor_leaves_the_chain() -> None:
    """A stand-in chain: a transpose pair (a kernel's), constants of rank 2, of size 1 and
    of rank 1 (per time step), clip's scalar bounds, then a reduction (not elementwise)
    that needs the NCW tensor, and a transpose into the next kernel."""
    rng = np.random.default_rng(0)
    scale = rng.standard_normal((4, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [0, 2, 1]))  # into a "kernel"
            y = bb.emit(relax.op.permute_dims(t, [0, 2, 1]))  # out of it
            m = bb.emit(relax.op.multiply(y, relax.const(scale)))
            r = bb.emit(relax.op.nn.relu(m))
            a = bb.emit(relax.op.add(r, relax.const(np.array([0.5], "float32"))))
            # a per-time constant: rank 1 broadcasts along T in NCW, along axis 1 moved
            a = bb.emit(relax.op.add(a, relax.const(rng.standard_normal(6).astype("float32"))))
            c = bb.emit(relax.op.clip(a, 0.0, 1.5))
            f = bb.emit(relax.op.sum(c, axis=[1], keepdims=True))  # leaves the chain: NCW
            u = bb.emit(relax.op.permute_dims(c, [0, 2, 1]))  # into the next kernel
            out = bb.emit_output(relax.Tuple([f, u]))
        bb.emit_func_output(out)
    mod = bb.get()
    before = mod.script()
    got, cancelled = time_major_chains(mod)
    assert mod.script() == before  # the reference below is the graph as it was
    assert cancelled == 2  # the pair, and the one into the next kernel
    # one transpose left: the input's (a parameter has no time-major twin); the sum reads
    # NCW, so the elementwise ops run on both sides
    assert _ops(got, "relax.permute_dims") == 1
    assert _ops(got, "relax.multiply") == 2
    assert _ops(got, "relax.clip") == 2
    xv = rng.standard_normal((1, 4, 6)).astype("float32")
    for want, have in zip(_run(mod, xv), _run(got, xv), strict=True):
        assert want.shape == have.shape
        np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6)


def test_an_operand_without_a_time_major_twin_keeps_the_op_ncw() -> None:
    """A residual add of a second NCW input (which has no time-major twin): the add stays
    NCW and the transpose after it stays; only the kernel's pair cancels."""
    rng = np.random.default_rng(1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6), "float32"))
    x2 = relax.Var("x2", relax.TensorType((1, 4, 6), "float32"))
    with bb.function("main", [x, x2]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [0, 2, 1]))
            y = bb.emit(relax.op.permute_dims(t, [0, 2, 1]))
            # a per-time constant (rank 1 broadcasts along T in NCW): moves correctly
            v = bb.emit(relax.op.add(y, relax.const(rng.standard_normal(6).astype("float32"))))
            z = bb.emit(relax.op.add(v, x2))
            u = bb.emit(relax.op.permute_dims(z, [0, 2, 1]))
            out = bb.emit_output(u)
        bb.emit_func_output(out)
    mod = bb.get()
    got, cancelled = time_major_chains(mod)
    assert cancelled == 1  # only the pair
    # the one after the add; the input's and the moved add's twin fed nothing: dropped
    assert _ops(got, "relax.permute_dims") == 1
    assert _ops(got, "relax.add") == 2
    xv, x2v = (rng.standard_normal((1, 4, 6)).astype("float32") for _ in range(2))
    target = tvm.target.Target(AVX2)
    outs = []
    for m in (mod, got):
        vm = relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(x2v)).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
