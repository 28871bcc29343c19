"""The tensorized int8 conv (voxfit.compile._int8): packing, exactness, the intrinsic in the
compiled code, and tuning workloads that do not depend on the calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from voxfit.compile import _int8  # noqa: E402
from voxfit.compile._build import _compile_fused, fuse  # noqa: E402
from voxfit.compile._tune import tune  # noqa: E402

AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 1}
C, OUT, K, D, PAD, T = 10, 12, 3, 2, 2, 24  # channels not multiples of 4 / 8: padded


def test_pack_int8_puts_one_instruction_operand_innermost() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (OUT, C, K)).astype(np.int8)
    p = _int8.pack_int8(w, 8)
    assert p.shape == (2, K, 3, 8, 4)
    for o, c, k in [(0, 0, 0), (11, 9, 2), (8, 4, 1), (5, 3, 2)]:
        assert p[o // 8, k, c // 4, o % 8, c % 4] == w[o, c, k]
    assert not p[1, :, :, 4:].any()  # padding is 0
    assert not p[:, :, 2, :, 2:].any()


def test_lanes_follow_the_target() -> None:
    assert _int8.lanes_for(tvm.target.Target(AVX2)) == 8
    plain = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
    assert _int8.lanes_for(tvm.target.Target(plain)) == 0
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}
    assert _int8.lanes_for(tvm.target.Target(arm)) == 0


def _module(w: np.ndarray, x_scale: float, x_zero: float, seed: int = 0) -> tvm.IRModule:
    rng = np.random.default_rng(seed)
    corr = (int(x_zero) * w.astype(np.int64).sum(axis=(1, 2))).astype("int32")
    scale = (np.float32(x_scale) * rng.uniform(1e-3, 1e-2, OUT)).astype("float32")
    bias = rng.standard_normal(OUT).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, C, T), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_te(
                _int8.qconv1d_int8,
                x,
                relax.const(np.array([x_scale], "float32")),
                relax.const(np.array([x_zero], "float32")),
                relax.const(_int8.pack_int8(w, 8)),
                relax.const(corr),
                relax.const(scale),
                relax.const(bias),
                OUT,
                1,
                PAD,
                D,
                primfunc_name_hint=_int8.TASK,
                primfunc_attrs={"op_pattern": 4},
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _reference(
    x: np.ndarray, w: np.ndarray, x_scale: float, x_zero: float, saturate: bool
) -> np.ndarray:
    """Integer accumulation, optionally as vpmaddubsw does it: the products of input
    channels (4c, 4c+1) and (4c+2, 4c+3) of each tap summed into a saturating int16."""
    xq = np.clip(np.round(x[0] / np.float32(x_scale)) + x_zero, 0, 255).astype(np.int64)
    xp = np.pad(xq, ((0, 12 - C), (PAD, PAD)), constant_values=int(x_zero))
    xp[C:] = 0
    wp = np.zeros((OUT, 12, K), np.int64)
    wp[:, :C] = w
    acc = np.zeros((OUT, T), np.int64)
    for k in range(K):
        prod = wp[:, :, k, None] * xp[None, :, k * D : k * D + T]  # (OUT, 12, T)
        pairs = prod[:, 0::2] + prod[:, 1::2]
        if saturate:
            pairs = np.clip(pairs, -32768, 32767)
        acc += pairs.sum(axis=1)
    return acc


@pytest.mark.tvm
def test_tensorized_conv_is_exact_and_uses_the_intrinsic(tmp_path: Path) -> None:
    target = tvm.target.Target(AVX2)
    _int8.register()
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (OUT, C, K)).astype(np.int8)
    x_scale, x_zero = 0.01, 5.0  # inputs up to ~2.5: many hit 255, so pairs saturate
    mod = fuse(_module(w, x_scale, x_zero), target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    assert [t.task_name for t in tasks] == [_int8.TASK]  # quantize, conv, epilogue: one
    db = ms.database.MemoryDatabase()
    spent = tune(
        tasks,
        db,
        target,
        trials_per_task=4,
        trials_per_iter=4,
        cores=1,
        builder_timeout_s=60,
        runner={"kind": "local", "timeout_s": 30},
        log_dir=tmp_path,
    )
    assert spent == 4
    conv = next(t for t in tasks if t.task_name == _int8.TASK)
    (best,) = db.get_top_k(db.commit_workload(conv.dispatched[0]), 1)
    assert f'tensor_intrin="{_int8.AVX2_INTRIN}"' in str(best.trace)
    # the compiled kernel runs the instruction (LLVM IR of the built module)
    sch = ms.tir_integration.compile_tir(db, conv.dispatched[0], target)
    assert sch is not None
    ir = tvm.tirx.build(sch.mod, target=target).inspect_source("ll")
    assert "llvm.x86.avx2.pmadd.ub.sw" in ir
    assert "llvm.x86.avx2.pmadd.wd" in ir

    vm = relax.VirtualMachine(_compile_fused(db, mod, target), tvm.cpu())
    x = (np.random.default_rng(2).standard_normal((1, C, T)) * 1.5).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()[0]
    # recover the integer accumulator from the float epilogue
    rng = np.random.default_rng(0)
    scale = (np.float32(x_scale) * rng.uniform(1e-3, 1e-2, OUT)).astype("float32")
    bias = rng.standard_normal(OUT).astype("float32")
    corr = int(x_zero) * w.astype(np.int64).sum(axis=(1, 2))
    sat = _reference(x, w, x_scale, x_zero, saturate=True)
    exact = _reference(x, w, x_scale, x_zero, saturate=False)
    assert (sat != exact).any()  # the test input does reach saturation
    want = (sat - corr[:, None]).astype("float32") * scale[:, None] + bias[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # bit-exact in integers

    # 7-bit weights (|w| <= 64): no pair can saturate, the fake-quantized result exactly
    w7 = (w // 2).astype(np.int8)
    assert np.array_equal(
        _reference(x, w7, x_scale, x_zero, True), _reference(x, w7, x_scale, x_zero, False)
    )


def test_calibrations_share_one_workload() -> None:
    """Scales, zero points and weights are kernel arguments: another calibration of the
    same plan finds the first one's tuning records (the database keys by workload)."""
    target = tvm.target.Target(AVX2)
    w = np.random.default_rng(3).integers(-127, 128, (OUT, C, K)).astype(np.int8)
    db = ms.database.MemoryDatabase()
    first = ms.relax_integration.extract_tasks(fuse(_module(w, 0.01, 5.0, 0), target), target)
    for t in first:
        db.commit_workload(t.dispatched[0])
    other = fuse(_module(-w, 0.037, 0.0, 1), target)
    tasks = ms.relax_integration.extract_tasks(other, target)
    assert len(tasks) == 1
    assert all(db.has_workload(t.dispatched[0]) for t in tasks)
    # a different shape is a different workload (the check can fail)
    wide = ms.relax_integration.extract_tasks(fuse(_module(w[:, :8], 0.01, 5.0), target), target)
    assert not all(db.has_workload(t.dispatched[0]) for t in wide)


def test_the_torch_model_computes_the_kernels_pair_saturation() -> None:
    """compress.pair_saturation_excess (what apply(int8_pair_saturation=True) adds to a conv)
    turns the exact integer accumulation into vpmaddubsw's saturating one, which the
    tensorized kernel computes bit-exactly (above)."""
    import torch

    from voxfit.compress import pair_saturation_excess

    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (OUT, C, K)).astype(np.int8)
    x = (np.random.default_rng(2).standard_normal((1, C, T)) * 1.5).astype("float32")
    x_scale, x_zero = 0.01, 5.0
    sat = _reference(x, w, x_scale, x_zero, saturate=True)
    exact = _reference(x, w, x_scale, x_zero, saturate=False)
    assert (sat != exact).sum() > 10
    q = torch.clamp(torch.round(torch.from_numpy(x) / np.float32(x_scale)) + x_zero, 0, 255)
    excess = pair_saturation_excess(q, torch.from_numpy(w).float(), x_zero, 1, PAD, D)
    assert excess is not None
    np.testing.assert_array_equal(exact + excess[0].numpy().astype(np.int64), sat)
    # pairs that cannot saturate (7-bit weights) add nothing, and cost nothing
    assert pair_saturation_excess(q, torch.from_numpy(w // 2).float(), x_zero, 1, PAD, D) is None
