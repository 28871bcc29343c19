"""The tensorized int8 conv (voxfit.compile._int8): packing, exactness, the intrinsic in the
compiled code, and tuning workloads that do not depend on the calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from voxfit.compile import _int8  # noqa: E402
from voxfit.compile._build import _compile_fused, fuse  # noqa: E402
from voxfit.compile._tune import tune  # noqa: E402
from voxfit.hw_profiles import host_cpu_flags  # noqa: E402

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
    # Arm: sdot where the core has the dot-product extension (the A55 does, the A53/A72 not)
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}
    assert _int8.lanes_for(tvm.target.Target(arm)) == _int8.SIGNED_LANES == 4
    for cpu in ("cortex-a53", "cortex-a72"):
        assert _int8.lanes_for(tvm.target.Target({**arm, "mcpu": cpu, "mattr": ["+neon"]})) == 0
    assert _int8.act_offset(4) == 128
    assert _int8.act_offset(8) == 0
    # AVX-512: 16 lanes; vpdpbusd where the CPU has VNNI (exact), else the saturating pair
    for cpu, intrin in (
        ("skylake-avx512", _int8.AVX512_INTRIN),
        ("cascadelake", _int8.VNNI_INTRIN),
    ):
        target = tvm.target.Target({**AVX2, "mcpu": cpu})
        assert _int8.lanes_for(target) == 16
        assert _int8.intrin_of(target) == intrin
    assert _int8.intrin_of(tvm.target.Target(AVX2)) == _int8.AVX2_INTRIN
    assert _int8.saturates_pairs(_int8.AVX512_INTRIN)
    assert not _int8.saturates_pairs(_int8.VNNI_INTRIN)
    assert not _int8.saturates_pairs(_int8.SDOT_INTRIN)


def _module(
    w: np.ndarray, x_scale: float, x_zero: float, seed: int = 0, time_major: bool = False
) -> tvm.IRModule:
    rng = np.random.default_rng(seed)
    corr = (int(x_zero) * w.astype(np.int64).sum(axis=(1, 2))).astype("int32")
    scale = (np.float32(x_scale) * rng.uniform(1e-3, 1e-2, OUT)).astype("float32")
    bias = rng.standard_normal(OUT).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, T, C) if time_major else (1, C, T), "float32"))
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
                time_major,
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
    """Both layouts of the kernel: NCW in and out, and time-major (what a chain of int8
    layers runs, voxfit.compile._layout), tuned in one run."""
    target = tvm.target.Target(AVX2)
    _int8.register()
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (OUT, C, K)).astype(np.int8)
    x_scale, x_zero = 0.01, 5.0  # inputs up to ~2.5: many hit 255, so pairs saturate
    mods = {tm: fuse(_module(w, x_scale, x_zero, time_major=tm), target) for tm in (False, True)}
    tasks = {tm: ms.relax_integration.extract_tasks(m, target) for tm, m in mods.items()}
    for found in tasks.values():
        assert [t.task_name for t in found] == [_int8.TASK]  # quantize, conv, epilogue: one
    db = ms.database.MemoryDatabase()
    spent = tune(
        [*tasks[False], *tasks[True]],
        db,
        target,
        trials_per_task=4,
        trials_per_iter=4,
        cores=1,
        builder_timeout_s=60,
        runner={"kind": "local", "timeout_s": 30},
        log_dir=tmp_path,
    )
    assert spent == 8
    x = (np.random.default_rng(2).standard_normal((1, C, T)) * 1.5).astype("float32")
    # recover the integer accumulator from the float epilogue
    rng = np.random.default_rng(0)
    scale = (np.float32(x_scale) * rng.uniform(1e-3, 1e-2, OUT)).astype("float32")
    bias = rng.standard_normal(OUT).astype("float32")
    corr = int(x_zero) * w.astype(np.int64).sum(axis=(1, 2))
    sat = _reference(x, w, x_scale, x_zero, saturate=True)
    exact = _reference(x, w, x_scale, x_zero, saturate=False)
    assert (sat != exact).any()  # the test input does reach saturation
    want = (sat - corr[:, None]).astype("float32") * scale[:, None] + bias[:, None]
    for tm, mod in mods.items():
        (conv,) = tasks[tm]
        # the tuner's best is tensorized: the design space drops the samples whose
        # tensorization fell back (require_tensorized), so none of the 4 measured was scalar
        records = db.get_top_k(db.commit_workload(conv.dispatched[0]), 4)
        assert len(records) == 4
        assert all(f'tensor_intrin="{_int8.AVX2_INTRIN}"' in str(r.trace) for r in records)
        # the compiled kernel runs the instruction (LLVM IR of the built module)
        sch = ms.tir_integration.compile_tir(db, conv.dispatched[0], target)
        assert sch is not None
        ir = tvm.tirx.build(sch.mod, target=target).inspect_source("ll")
        assert "llvm.x86.avx2.pmadd.ub.sw" in ir
        assert "llvm.x86.avx2.pmadd.wd" in ir

        vm = relax.VirtualMachine(_compile_fused(db, mod, target), tvm.cpu())
        # time-major: the same values in (1, T, C) in, (1, T, OUT) out
        feed = np.ascontiguousarray(x.transpose(0, 2, 1)) if tm else x
        got = vm["main"](tvm.runtime.tensor(feed)).numpy()[0]
        got = got.T if tm else got
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # bit-exact in integers

    # 7-bit weights (|w| <= 64): no pair can saturate, the fake-quantized result exactly
    w7 = (w // 2).astype(np.int8)
    assert np.array_equal(
        _reference(x, w7, x_scale, x_zero, True), _reference(x, w7, x_scale, x_zero, False)
    )


@pytest.mark.parametrize("linear", [False, True])
def test_fallen_back_samples_are_dropped(linear: bool) -> None:
    """RewriteTensorize returns success when the sampled tiles do not fit the intrinsic (it
    only removes the mark); require_tensorized, next in the int8 design space's
    postprocessors, fails exactly those samples, so a scalar kernel is never measured."""
    target = tvm.target.Target(AVX2)
    _int8.register()
    w = np.random.default_rng(1).integers(-127, 128, (OUT, C, K)).astype(np.int8)
    mod = _linear_module(w[:, :, 0], 0.01, 5.0) if linear else _module(w, 0.01, 5.0)
    (task,) = ms.relax_integration.extract_tasks(fuse(mod, target), target)
    intrin = _int8.intrin_of(target)
    seen = {True: 0, False: 0}
    for seed in range(6):
        ctx = ms.TuneContext(
            mod=task.dispatched[0],
            target=target,
            space_generator=_int8.space_for(intrin),
            rand_state=seed,
        )
        posts = list(ctx.space_generator.postprocs)
        names = [type(p).__name__ for p in posts]
        at = names.index("RewriteTensorize")  # require_tensorized's is the one after it
        for sch in ctx.generate_design_space():
            assert f'ann_val="{intrin}"' in str(sch.trace)  # the rule marked the int8 block
            assert all(p.apply(sch) for p in posts[: at + 1])  # the stock ones pass it...
            tensorized = f'tensor_intrin="{intrin}"' in str(sch.trace)
            assert posts[at + 1].apply(sch) == tensorized  # ...the check keeps it iff tensorized
            seen[tensorized] += 1
    # both happen (the check can fail)
    assert seen[True], seen
    assert seen[False], seen


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


def _tensorized_sample(func: Any, target: tvm.target.Target) -> Any:
    """A schedule of ``func`` from the tuner's int8 design space that the postprocessors
    tensorized with the lanes' intrinsic (seeded, so the test is deterministic), or None."""
    intrin = _int8.intrin_of(target)
    for seed in range(16):
        ctx = ms.TuneContext(
            mod=func, target=target, space_generator=_int8.space_for(intrin), rand_state=seed
        )
        for sch in ctx.generate_design_space():
            if intrin not in str(sch.trace):
                continue
            done = all(post.apply(sch) for post in ctx.space_generator.postprocs)
            if done and f'tensor_intrin="{intrin}"' in str(sch.trace):
                return sch
    return None


def _database_of(sch: Any, func: Any, target: tvm.target.Target) -> Any:
    """A database whose one record is ``sch``'s trace for ``func`` (what the build then
    applies); ``sch`` a schedule or a tuning record."""
    db = ms.database.MemoryDatabase()
    db.commit_tuning_record(
        ms.database.TuningRecord(
            sch.trace,
            db.commit_workload(func),
            [1.0],
            target,
            ms.arg_info.ArgInfo.from_entry_func(func),
        )
    )
    return db


def _linear_module(w: np.ndarray, x_scale: float, x_zero: float, lanes: int = 8) -> tvm.IRModule:
    """A ``(1, T, C)`` -> ``(1, T, OUT)`` int8 Linear (``w``: (OUT, C)) and the SiLU after it."""
    rng = np.random.default_rng(0)
    zero = int(x_zero) - _int8.act_offset(lanes)
    corr = (zero * w.astype(np.int64).sum(axis=1)).astype("int32")
    scale = (np.float32(x_scale) * rng.uniform(1e-3, 1e-2, OUT)).astype("float32")
    bias = rng.standard_normal(OUT).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, T, C), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_te(
                _int8.qlinear_int8,
                x,
                relax.const(np.array([x_scale], "float32")),
                relax.const(np.array([x_zero], "float32")),
                relax.const(_int8.pack_int8(w[:, :, None], lanes)),
                relax.const(corr),
                relax.const(scale),
                relax.const(bias),
                OUT,
                primfunc_name_hint=_int8.LINEAR_TASK,
                primfunc_attrs={"op_pattern": 4},
            )
            z = bb.emit(relax.op.nn.silu(y))
            out = bb.emit_output(z)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.tvm
def test_tensorized_linear_is_exact_fuses_its_activation_and_uses_the_intrinsic() -> None:
    target = tvm.target.Target(AVX2)
    _int8.register()
    rng = np.random.default_rng(4)
    w = rng.integers(-127, 128, (OUT, C)).astype(np.int8)
    x_scale, x_zero = 0.01, 5.0
    mod = fuse(_linear_module(w, x_scale, x_zero), target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # quantize, matmul, dequantize and the SiLU after it: one kernel
    assert [t.task_name for t in tasks] == [f"fused_{_int8.LINEAR_TASK}_silu"]
    assert _int8.is_int8_task(tasks[0].task_name)
    # the design space the tuner gives int8 tasks holds tensorized schedules (and drops the
    # samples whose tiles do not tensorize: test_fallen_back_samples_are_dropped); one of
    # them is the database's record here (tuning it is the conv test's part)
    func = tasks[0].dispatched[0]

    sch = _tensorized_sample(func, target)
    assert sch is not None, "no sample of the int8 design space tensorized"
    db = _database_of(sch, func, target)
    sch = ms.tir_integration.compile_tir(db, func, target)
    assert sch is not None
    ir = tvm.tirx.build(sch.mod, target=target).inspect_source("ll")
    assert "llvm.x86.avx2.pmadd.ub.sw" in ir

    vm = relax.VirtualMachine(_compile_fused(db, mod, target), tvm.cpu())
    x = (np.random.default_rng(5).standard_normal((1, T, C)) * 1.5).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()[0]  # (T, OUT)
    xq = np.clip(np.round(x[0] / np.float32(x_scale)) + x_zero, 0, 255).astype(np.int64)
    xp = np.zeros((T, 12), np.int64)
    xp[:, :C] = xq
    wp = np.zeros((OUT, 12), np.int64)
    wp[:, :C] = w
    prod = xp[:, None, :] * wp[None]  # (T, OUT, 12)
    pairs = prod[..., 0::2] + prod[..., 1::2]
    sat = np.clip(pairs, -32768, 32767).sum(axis=-1)
    assert (sat != pairs.sum(axis=-1)).any()  # the input reaches saturation
    rng = np.random.default_rng(0)
    scale = (np.float32(x_scale) * rng.uniform(1e-3, 1e-2, OUT)).astype("float32")
    bias = rng.standard_normal(OUT).astype("float32")
    corr = int(x_zero) * w.astype(np.int64).sum(axis=1)
    y = (sat - corr[None]).astype("float32") * scale[None] + bias[None]
    want = y / (1 + np.exp(-y))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_torch_linear_computes_the_linear_kernels_pair_saturation() -> None:
    """attach_pair_saturation on a Linear (features last, any leading axes): the model then
    computes vpmaddubsw's saturating accumulation, which the tensorized linear kernel
    computes bit-exactly (above); without it, the exact one."""
    import torch
    from torch import nn

    from voxfit.compress import attach_pair_saturation
    from voxfit.compress._quant import attach_activation_quantizers

    rng = np.random.default_rng(4)
    w = rng.integers(-127, 128, (OUT, C)).astype(np.int8)
    w[:, 0] = -127  # on the 8-bit grid as apply leaves it: each row's max |w| is 127
    w_scale = rng.uniform(1e-3, 1e-2, OUT).astype("float32")
    model = nn.Sequential(nn.Linear(C, OUT))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w.astype("float32") * w_scale[:, None]))
        model[0].bias.zero_()
    attach_activation_quantizers(model, {"0": 8})
    quant = model[0].act_quant
    quant.lo, quant.hi = torch.tensor(-0.05), torch.tensor(2.5)  # inputs reach 255
    x = torch.from_numpy(
        (np.random.default_rng(5).standard_normal((2, T, C)) * 1.5).astype("float32")
    )
    scale, zero = (float(v) for v in quant.grid())
    xq = torch.clamp(torch.round(x / scale) + zero, 0, 255).numpy().astype(np.int64)
    prod = (xq - int(zero))[..., None, :] * w.astype(np.int64)[None, None]  # (2, T, OUT, C)
    raw = xq[..., None, :] * w.astype(np.int64)[None, None]
    pairs = raw[..., 0::2] + raw[..., 1::2]
    excess = (np.clip(pairs, -32768, 32767) - pairs).sum(axis=-1)
    assert (excess != 0).sum() > 10  # the input does reach saturation
    exact = prod.sum(axis=-1)
    with torch.no_grad():
        plain = model(x).numpy()
        assert attach_pair_saturation(model, ["0"]) == ["0"]
        sat = model(x).numpy()
    unit = np.float32(scale) * w_scale  # one accumulator step, per output
    np.testing.assert_allclose(plain / unit, exact, atol=2e-2)
    np.testing.assert_allclose(sat / unit, exact + excess, atol=2e-2)


A55 = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a55",
    "mattr": ["+neon", "+dotprod"],
    "num-cores": 2,
}


def test_arm_dotprod_targets_tensorize_int8_linears_with_sdot() -> None:
    """On an Arm core with the dot-product extension the int8 kernel quantizes activations
    to int8 (the uint8 grid minus 128, folded into the zero-point correction) and the tuner's
    design space holds schedules whose inner block is TVM's ``sdot`` intrinsic; the compiled
    code runs the instruction. (What it computes is checked on an emulated aarch64 device:
    tests/latency/test_qemu_aarch64.py.)"""
    target = tvm.target.Target(A55)
    w = np.random.default_rng(4).integers(-127, 128, (OUT, C)).astype(np.int8)
    mod = fuse(_linear_module(w, 0.01, 5.0, lanes=4), target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    assert [t.task_name for t in tasks] == [f"fused_{_int8.LINEAR_TASK}_silu"]
    func = tasks[0].dispatched[0]
    assert "int8" in str(func)
    assert "uint8" not in str(func)
    sch = _tensorized_sample(func, target)
    assert sch is not None, "no sample of the int8 design space tensorized with sdot"
    assert f'tensor_intrin="{_int8.SDOT_INTRIN}"' in str(sch.trace)
    ir = tvm.tirx.build(sch.mod, target=target).inspect_source("ll")
    assert "llvm.aarch64.neon.sdot" in ir


@pytest.mark.tvm
@pytest.mark.parametrize(
    ("mcpu", "needle", "flag", "saturates"),
    [
        ("skylake-avx512", "llvm.x86.avx512.pmaddubs.w.512", "avx512bw", True),
        ("cascadelake", "llvm.x86.avx512.vpdpbusd.512", "avx512_vnni", False),
    ],
)
def test_avx512_targets_tensorize_int8_linears(
    mcpu: str, needle: str, flag: str, saturates: bool
) -> None:
    """AVX-512 targets run int8 Linears on 16 int32 lanes: the AVX-512BW pair (saturating as
    AVX2's) or VNNI's ``vpdpbusd`` (exact); the compiled code runs the instruction, and on a
    host that has it (only there: the code would not run elsewhere) the result is the
    integer arithmetic's, bit for bit in the accumulator."""
    target = tvm.target.Target({**AVX2, "mcpu": mcpu})
    rng = np.random.default_rng(4)
    w = rng.integers(-127, 128, (OUT, C)).astype(np.int8)
    x_scale, x_zero = 0.01, 5.0
    mod = fuse(_linear_module(w, x_scale, x_zero, lanes=16), target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    assert [t.task_name for t in tasks] == [f"fused_{_int8.LINEAR_TASK}_silu"]
    func = tasks[0].dispatched[0]
    sch = _tensorized_sample(func, target)
    assert sch is not None, f"no sample of the int8 design space tensorized for {mcpu}"
    assert f'tensor_intrin="{_int8.intrin_of(target)}"' in str(sch.trace)
    ir = tvm.tirx.build(sch.mod, target=target).inspect_source("ll")
    assert needle in ir
    if flag not in host_cpu_flags():
        return
    db = _database_of(sch, func, target)
    vm = relax.VirtualMachine(_compile_fused(db, mod, target), tvm.cpu())
    x = (np.random.default_rng(5).standard_normal((1, T, C)) * 1.5).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()[0]  # (T, OUT)
    xq = np.clip(np.round(x[0] / np.float32(x_scale)) + x_zero, 0, 255).astype(np.int64)
    prod = xq[:, None, :] * w.astype(np.int64)[None]  # (T, OUT, C)
    prod = np.concatenate([prod, np.zeros((T, OUT, 2), np.int64)], axis=-1)  # C -> 12
    pairs = prod[..., 0::2] + prod[..., 1::2]
    exact = pairs.sum(axis=-1)
    sat = np.clip(pairs, -32768, 32767).sum(axis=-1)
    assert (sat != exact).any()  # the input reaches vpmaddubsw's saturation
    acc = sat if saturates else exact
    rng = np.random.default_rng(0)
    scale = (np.float32(x_scale) * rng.uniform(1e-3, 1e-2, OUT)).astype("float32")
    bias = rng.standard_normal(OUT).astype("float32")
    corr = int(x_zero) * w.astype(np.int64).sum(axis=1)
    y = (acc - corr[None]).astype("float32") * scale[None] + bias[None]
    np.testing.assert_allclose(got, y / (1 + np.exp(-y)), rtol=1e-5, atol=1e-5)
