# mypy: disable-error-code="valid-type"
# (TVMScript buffer annotations are calls, which mypy cannot read as types)
"""Integer conv kernels: u8 x s8 -> s32 dot-product intrinsics and the layout they need.

An int8 conv1d (``voxfit::qconv1d`` with 8-bit activations) compiles to three steps that
the x86 and Arm dot-product instructions can run:

1. quantize the float input (NCW, or time-major where :mod:`._layout` runs a chain of int8
   layers so) to uint8 in time-major ``(T + 2 pad, C4)`` layout, padded with the zero point
   in time and 0 in the channels added to reach a multiple of 4;
2. the reduction ``acc[t, o8, i] = sum_{k, c4, j} xq[t*s + k*d, 4*c4 + j] *
   w[o8, k, c4, i, j]`` over weights packed at build time as ``(O/L, K, C/4, L, 4)`` int8
   (:func:`pack_int8`), whose innermost ``(L, 4)`` block is one instruction's operand: the
   lane count ``L`` is 8 for AVX2 (``vpmaddubsw`` + ``vpmaddwd``), 16 for AVX-512BW
   (the same pair, or ``vpdpbusd`` with VNNI), 4 for Arm's ``sdot``;
3. the dequantize epilogue: ``(acc - zero * sum(w)) * scale + bias``, written back in the
   input's layout, where FuseOps appends the elementwise ops after the conv (folded
   BatchNorm, ReLU, the residual add).

All three are one kernel (:func:`qconv1d_int8`): a separate quantize kernel per layer cost
12 x ~10 us of the base model's 0.88 ms, and unfused elementwise ops another 0.09 ms.

Every quantization constant is a tensor argument of the kernel, never a literal in its
TIR, so two calibrations of one plan are the same MetaSchedule workload (one set of tuning
records). :func:`space_for` gives MetaSchedule the schedule rules that tensorize step 2
(``MultiLevelTilingWithIntrin``) for targets that have the instruction.

A Linear layer (``voxfit::qlinear``: the Conformer's projections and FFNs) is the same
reduction with one tap over a time-major input: :func:`qlinear_int8` reads ``(1, T, C)``
and writes ``(1, T, O)``, so no layout change surrounds it.

Task names carry :data:`TASK` or :data:`LINEAR_TASK` (:func:`is_int8_task`) so the tuner
knows which tasks take :func:`space_for`; the linear one names itself a matmul, as the
cost model's anchors count a model's matmul and conv kernels.

``vpmaddubsw`` adds two u8 x s8 products into a saturating int16, as onnxruntime's MLAS
U8S8 kernels do on these CPUs: exact unless a pair of adjacent products (input channels
4c+2j, 4c+2j+1 of one tap) sums past +-32767, i.e. only when both inputs are large and
both weights are large with one sign. The error then stays below one product. A model
compressed with ``apply(..., pair_safe_int8=True)`` has no such pair (its int8 layers'
weights satisfy ``|w_a| + |w_b| <= 128`` for same-signed pairs), so the kernel computes it
exactly.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import tvm
from tvm.script import tirx as T

from voxfit.errors import ModelError

AVX2_INTRIN = "voxfit_dot_8x4_u8i8i32_avx2"
# AVX-512BW: the same two instructions on 16 int32 lanes (saturating pairs, as AVX2)
AVX512_INTRIN = "voxfit_dot_16x4_u8i8i32_avx512"
# AVX-512 VNNI: ``vpdpbusd`` sums four u8 x s8 products into each int32 lane, exactly
VNNI_INTRIN = "voxfit_dot_16x4_u8i8i32_vnni"
# TVM's own Arm dot-product intrinsic (tvm.s_tir.tensor_intrin.arm_cpu): 4 lanes of
# ``sdot``, signed x signed, so activations are quantized to int8 (uint8 - 128) there
SDOT_INTRIN = "dot_4x4_i8i8s32_sdot"
SIGNED_LANES = 4  # the lane count whose instruction takes int8 activations (sdot)
TASK = "conv1d_u8s8"
# the annotation MultiLevelTilingWithIntrin puts on the block it tiled for the intrinsic
AUTO_TENSORIZE = "meta_schedule.auto_tensorize"
LINEAR_TASK = "matmul_u8s8"


def is_int8_task(name: str) -> bool:
    """Whether a tuning task (by name) is a tensorizable int8 conv or linear kernel."""
    return TASK in name or LINEAR_TASK in name


def _dot_desc(lanes: int) -> Any:
    """What an ``L x 4`` u8 x s8 dot-product intrinsic computes: ``C[i] += sum_k A[k] *
    B[i, k]`` for ``L`` int32 lanes (the block MetaSchedule matches the kernel against)."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _dot_pmadd(lanes: int, pmaddubsw: str, pmaddwd: str) -> Any:
    """``vpmaddubsw`` (u8 x s8 products summed in saturating int16 pairs) then ``vpmaddwd``
    against ones (the pairs summed into int32), added to ``L`` int32 lanes: AVX2 (8 lanes)
    or AVX-512BW (16), by the two LLVM intrinsics' names."""
    n = lanes * 4

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, lanes), dtype=f"uint8x{n}")
            b_i8 = B.vload([0, 0], dtype=f"int8x{n}")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(pmaddubsw), a_u8, b_i8, dtype=f"int16x{n // 2}"
            )
            C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(pmaddwd),
                pairs,
                T.broadcast(T.int16(1), n // 2),
                dtype=f"int32x{lanes}",
            )

    return impl


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    # LLVM 22's vpdpbusd takes its byte operands as <64 x i8> (TVM 0.27's own VNNI
    # intrinsic passes <16 x i32> and fails to compile)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
        b_i8x64 = B.vload([0, 0], dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            a_u8x64,
            b_i8x64,
            dtype="int32x16",
        )


def register() -> None:
    """Register the x86 intrinsics with TVM (idempotent; the builder workers call it too)."""
    from tvm.s_tir import TensorIntrin

    pmadd = {
        AVX2_INTRIN: (8, "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
        AVX512_INTRIN: (16, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
    }
    for name, (lanes, ubsw, wd) in pmadd.items():
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, _dot_desc(lanes), _dot_pmadd(lanes, ubsw, wd))
    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(VNNI_INTRIN, _dot_desc(16), _dot_16x4_vnni)


def load_cpu_tensor_intrins(triple: str) -> None:
    """Register TVM's tensor intrinsics for one CPU family (x86 or Arm; ours for x86 too),
    not the package.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` whole, which builds the CUDA, ROCm,
    Hexagon and RISC-V intrinsic tables too: ~100 s on this machine for nothing a CPU
    schedule uses. Installing the package without running its ``__init__`` and importing
    just the x86 (VNNI/AVX-512) or Arm (dot-product) table keeps tensorization working.
    """
    import importlib
    import os
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        sys.modules[name] = pkg
    arm = triple.startswith(("aarch64", "arm"))
    importlib.import_module(f"{name}.{'arm_cpu' if arm else 'x86'}")
    if not arm:
        # ours too, whatever this target runs: a database seeded from an AVX2 profile holds
        # traces that tensorize with them, and loading a trace replays it
        register()


def lanes_for(target: tvm.target.Target) -> int:
    """int32 lanes of the target's 8-bit dot-product instruction (0: none built here): 16
    for AVX-512BW (``vpdpbusd`` with VNNI, else ``vpmaddubsw`` + ``vpmaddwd``), 8 for AVX2
    (``vpmaddubsw`` + ``vpmaddwd``), all u8 x s8; 4 for Arm's ``sdot`` (s8 x s8; the
    ``dotprod`` feature, e.g. Cortex-A55)."""
    from tvm.target.codegen import target_has_features

    if target.kind.name != "llvm":
        return 0
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith("x86_64"):
        if target_has_features("avx512bw", target):
            return 16
        return 8 if target_has_features("avx2", target) else 0
    if triple.startswith("aarch64"):
        return SIGNED_LANES if target_has_features("dotprod", target) else 0
    return 0


def intrin_of(target: tvm.target.Target) -> str:
    """The registered tensor intrinsic the target's int8 kernels run ("" for none)."""
    from tvm.target.codegen import target_has_features

    lanes = lanes_for(target)
    if lanes == SIGNED_LANES:
        load_cpu_tensor_intrins("aarch64")
        return SDOT_INTRIN
    if not lanes:
        return ""
    register()
    if lanes == 16:
        return VNNI_INTRIN if target_has_features("avx512vnni", target) else AVX512_INTRIN
    return AVX2_INTRIN


def saturates_pairs(intrin: str) -> bool:
    """Whether the intrinsic adds u8 x s8 products in saturating int16 pairs first
    (``vpmaddubsw``: AVX2 and AVX-512BW without VNNI)."""
    return intrin in (AVX2_INTRIN, AVX512_INTRIN)


def act_offset(lanes: int) -> int:
    """What the kernel subtracts from the uint8 activation grid: 128 where the instruction
    multiplies signed bytes (``sdot``), else 0."""
    return 128 if lanes == SIGNED_LANES else 0


def pack_int8(w: np.ndarray, lanes: int) -> np.ndarray:
    """A conv weight (O, C, K) of int8 values as the kernel reads it: (O/L, K, C/4, L, 4),
    output and input channels zero-padded to multiples of L and 4."""
    o, c, k = w.shape
    op, cp = -(-o // lanes) * lanes, -(-c // 4) * 4
    full = np.zeros((op, cp, k), np.int8)
    full[:o, :c] = w
    # (O/L, L, C/4, 4, K) -> (O/L, K, C/4, L, 4)
    blocks = full.reshape(op // lanes, lanes, cp // 4, 4, k)
    return np.ascontiguousarray(blocks.transpose(0, 4, 2, 1, 3))


def round_u8(value: Any, scale: Any, zero: Any, offset: int = 0) -> Any:
    """A float TIR value on the uint8 grid: ``round_half_even(value / scale) + zero`` clamped
    to [0, 255] (torch's fake quantization; ``scale`` and ``zero`` are (1,) tensors); with
    ``offset`` 128 the same grid minus 128 as int8 (for signed dot products)."""
    from tvm import tirx

    v = tirx.max(tirx.min(tirx.nearbyint(value / scale[0]) + zero[0], 255.0), 0.0)
    if offset:
        return (v - float(offset)).astype("int8")
    return v.astype("uint8")


def quantize_time_major(
    x: Any,
    scale: Any,
    zero: Any,
    pad: int,
    channels: int,
    offset: int = 0,
    time_major: bool = False,
) -> Any:
    """float NCW (1, C, T) (``time_major``: (1, T, C)) -> uint8 (T + 2 pad, C4):
    ``round_half_even(x / scale) + zero`` clamped to [0, 255] (torch's fake quantization),
    the time padding at the zero point, the channels from C to C4 at 0 (their weights are
    0); int8 minus ``offset`` where that is 128 (:func:`act_offset`). MetaSchedule may
    compute it inside the conv's loops but never inlines it: the intrinsic reads it as a
    buffer."""
    from tvm import te, tirx

    if time_major:
        _, t_in, c_in = x.shape
    else:
        _, c_in, t_in = x.shape
    dtype = "int8" if offset else "uint8"

    def f(t: Any, c: Any) -> Any:
        v = x[0, t - pad, c] if time_major else x[0, c, t - pad]
        q = round_u8(v, scale, zero, offset)
        inside = tirx.all(t >= pad, t < t_in + pad)
        z = (zero[0] - float(offset)).astype(dtype)
        return tirx.if_then_else(c < c_in, tirx.if_then_else(inside, q, z), tirx.const(0, dtype))

    return te.compute(
        (t_in + 2 * pad, channels),
        f,
        name="quantize_u8",
        attrs={"meta_schedule.inline_rule": "disable"},
    )


def _dequantize(acc: Any, corr: Any, scale: Any, bias: Any) -> Any:
    """The epilogue of :func:`qconv1d_int8` and :func:`qlinear_int8` at (time step, output
    channel): ``(acc - zero * sum(w)) * scale + bias`` from the ``(T, O/L, L)`` accumulator
    (``corr`` holds ``zero * sum(w)`` per channel)."""
    lanes = acc.shape[2]

    def out(t: Any, o: Any) -> Any:
        return (acc[t, o // lanes, o % lanes] - corr[o]).astype("float32") * scale[o] + bias[o]

    return out


def qconv1d_int8(
    x: Any,
    x_scale: Any,
    x_zero: Any,
    wp: Any,
    corr: Any,
    scale: Any,
    bias: Any,
    out_channels: int,
    stride: int,
    padding: int,
    dilation: int,
    time_major: bool = False,
) -> Any:
    """One kernel for an int8 conv layer (steps 1-3 of the module docstring): float NCW
    ``x`` (1, C, T) in, float NCW ``(1, out_channels, T_out)`` out; with ``time_major``
    (1, T, C) in and (1, T_out, out_channels) out, which reads and writes channels
    contiguously (:mod:`._layout` makes a chain of int8 layers pass such tensors)."""
    from tvm import te

    o8, k, c4, lanes, _ = wp.shape
    xq = quantize_time_major(
        x, x_scale, x_zero, padding, c4 * 4, act_offset(int(lanes)), time_major
    )
    t_pad = xq.shape[0]
    t_out = (t_pad - dilation * (k - 1) - 1) // stride + 1
    rk = te.reduce_axis((0, k), name="rk")
    rc = te.reduce_axis((0, c4), name="rc")
    rj = te.reduce_axis((0, 4), name="rj")
    acc = te.compute(
        (t_out, o8, lanes),
        lambda t, oo, i: te.sum(
            xq[t * stride + rk * dilation, rc * 4 + rj].astype("int32")
            * wp[oo, rk, rc, i, rj].astype("int32"),
            axis=[rk, rc, rj],
        ),
        name=TASK,
    )

    out = _dequantize(acc, corr, scale, bias)

    if time_major:
        return te.compute((1, t_out, out_channels), lambda _, t, o: out(t, o), name="dequantize")
    return te.compute((1, out_channels, t_out), lambda _, o, t: out(t, o), name="dequantize")


def quantize_rows(x: Any, scale: Any, zero: Any, channels: int, offset: int = 0) -> Any:
    """float time-major ``(1, T, C)`` or ``(T, C)`` -> uint8 ``(T, C4)`` (int8 with
    ``offset``): as :func:`quantize_time_major` without time padding (one tap)."""
    from tvm import te, tirx

    *lead, t_in, c_in = x.shape
    dtype = "int8" if offset else "uint8"

    def f(t: Any, c: Any) -> Any:
        q = round_u8(x[0, t, c] if lead else x[t, c], scale, zero, offset)
        return tirx.if_then_else(c < c_in, q, tirx.const(0, dtype))

    return te.compute(
        (t_in, channels),
        f,
        name="quantize_u8",
        attrs={"meta_schedule.inline_rule": "disable"},
    )


def qlinear_int8(
    x: Any,
    x_scale: Any,
    x_zero: Any,
    wp: Any,
    corr: Any,
    scale: Any,
    bias: Any,
    out_features: int,
) -> Any:
    """One kernel for an int8 Linear layer: float ``x`` ``(1, T, C)`` (or ``(T, C)``) in,
    float ``(1, T, out_features)`` (or ``(T, out_features)``) out; ``wp`` is the weight
    packed as a one-tap conv's (:func:`pack_int8` of ``(O, C, 1)``)."""
    from tvm import te

    shape = [int(d) for d in x.shape]
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
        raise ModelError(f"qlinear: input {shape}: int8 compute takes (T, C) or (1, T, C)")
    o8, _, c4, lanes, _ = wp.shape
    xq = quantize_rows(x, x_scale, x_zero, c4 * 4, act_offset(int(lanes)))
    rows = xq.shape[0]
    rc = te.reduce_axis((0, c4), name="rc")
    rj = te.reduce_axis((0, 4), name="rj")
    acc = te.compute(
        (rows, o8, lanes),
        lambda t, oo, i: te.sum(
            xq[t, rc * 4 + rj].astype("int32") * wp[oo, 0, rc, i, rj].astype("int32"),
            axis=[rc, rj],
        ),
        name=LINEAR_TASK,
    )

    out = _dequantize(acc, corr, scale, bias)

    if len(shape) == 3:
        return te.compute((1, rows, out_features), lambda _, t, o: out(t, o), name="dequantize")
    return te.compute((rows, out_features), out, name="dequantize")


def tensorize_counts(trace: Any) -> tuple[Counter[str], Counter[str]]:
    """Per intrinsic: how many blocks ``trace`` marks for it (the
    ``meta_schedule.auto_tensorize`` annotation ``MultiLevelTilingWithIntrin`` adds) and how
    many ``Tensorize`` instructions apply it."""
    marked: Counter[str] = Counter()
    done: Counter[str] = Counter()
    for inst in trace.insts:
        kind = inst.kind.name
        if kind == "Annotate" and str(inst.attrs[0]) == AUTO_TENSORIZE:
            marked[str(inst.inputs[1])] += 1
        elif kind == "Tensorize":
            done[str(inst.attrs[0])] += 1
    marked.pop("", None)
    return marked, done


def tensorized_as_marked(trace: Any, intrin: str) -> bool:
    """Whether every block that ``trace`` marks for ``intrin`` was tensorized with it: as
    many ``Tensorize(intrin)`` instructions as such marks (:func:`tensorize_counts`)."""
    marked, done = tensorize_counts(trace)
    return done[intrin] >= marked[intrin]


def require_tensorized(intrin: str) -> Any:
    """A MetaSchedule postprocessor that fails a schedule whose marked block did not
    tensorize (:func:`tensorized_as_marked`).

    ``RewriteTensorize`` does not fail such a sample: where the sampled tiles do not match
    the intrinsic it warns "Tensorize failed", removes the mark and returns success, so the
    scalar u8 x s8 loop nest (3.5-78x slower: int8_tensorized.json) is built and measured.
    About 40% of the int8 design space's first samples are such; at 128 trials per task 4%
    of the records were, and with 4 trials on a loaded host one measured fastest by noise
    (2026-12-06). Failing them here spends the tuning budget on tensorized candidates only.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.postproc import PyPostproc

    @derived_object
    class RequireTensorized(PyPostproc):
        def _initialize_with_tune_context(self, context: Any) -> None:
            return None

        def apply(self, sch: Any) -> bool:
            return tensorized_as_marked(sch.trace, intrin)

        def clone(self) -> Any:
            return require_tensorized(intrin)

    return RequireTensorized()


def space_for(intrin: str) -> Any:
    """MetaSchedule's design space for int8 conv tasks: TVM's default LLVM rules with
    ``MultiLevelTilingWithIntrin`` for the target's dot-product intrinsic ahead of plain
    tiling (as TVM's own VNNI rule set), the postprocessor that replaces the tiled
    inner block with the intrinsic (:func:`intrin_of`), and :func:`require_tensorized`
    after it, so a sample whose tensorization fell back is dropped, never measured. Blocks
    the intrinsic does not fit (the rule does not mark them) tile as before."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import postproc as pp
    from tvm.s_tir.meta_schedule import schedule_rule as sr

    rules = list(sr.ScheduleRule.create("llvm"))
    at = next(i for i, r in enumerate(rules) if type(r).__name__ == "MultiLevelTiling")
    rules.insert(
        at,
        sr.MultiLevelTilingWithIntrin(
            intrin,
            structure="SSRSRS",
            max_innermost_factor=64,
            reuse_write=sr.ReuseType(req="may", levels=[1, 2], scope="global"),
        ),
    )
    postprocs = [
        pp.DisallowDynamicLoop(),
        pp.RewriteParallelVectorizeUnroll(),
        pp.RewriteReductionBlock(),
        pp.RewriteTensorize(vectorize_init_loop=True),
        require_tensorized(intrin),
        pp.RewriteLayout(),
    ]
    return ms.space_generator.PostOrderApply(
        sch_rules=rules, postprocs=postprocs, mutator_probs="llvm"
    )


def plain_space() -> Any:
    """MetaSchedule's design space for every other CPU task: TVM's default LLVM rules.

    Named rather than left to the target: for AVX-512 and VNNI targets MetaSchedule would
    add its own x86 dot-product intrinsics, which match no layout of ours and whose VNNI one
    does not compile with TVM 0.27's LLVM (the same rules as an AVX2 target gets)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import postproc as pp
    from tvm.s_tir.meta_schedule import schedule_rule as sr

    return ms.space_generator.PostOrderApply(
        sch_rules=list(sr.ScheduleRule.create("llvm")),
        postprocs=list(pp.Postproc.create("llvm")),
        mutator_probs="llvm",
    )
