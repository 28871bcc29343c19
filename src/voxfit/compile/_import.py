"""torch.export program -> Relax, and the target it compiles for (TVM side, in the worker).

The import skips torch's decomposition re-trace where the graph allows (:func:`load_program`),
lowers ``voxfit::qconv1d`` and ``voxfit::qlinear`` ops to int8 compute where the target runs it
(:func:`int8_support`), and fixes the one aten op TVM's converter gets wrong for our models.
Runs only inside the TVM worker process (see ``_worker``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, NamedTuple

import numpy as np
import tvm
from tvm import relax

from voxfit._warnings import quiet_export
from voxfit.compile import _attention as att
from voxfit.compile._layout import callee, choose_layouts
from voxfit.compile._qops import (  # importing registers the ops
    LINEAR_OP_NAME,
    OP_NAME,
    W_OP_NAME,
)
from voxfit.errors import ModelError
from voxfit.models import ATTENTION_OP_NAME

log = logging.getLogger(__name__)


def make_target(profile: dict[str, Any]) -> tvm.target.Target:
    """The TVM target of a profile dict (``HardwareProfile.to_dict()``), with its host."""
    host = profile.get("host_target")
    if host:
        return tvm.target.Target(profile["target"], host=host)
    return tvm.target.Target(profile["target"])


def check_target(profile: dict[str, Any]) -> str:
    """TVM's canonical form of the profile's target (raises if TVM rejects it)."""
    return str(make_target(profile))


Import = Literal["auto", "direct", "decomposed"]


def load_program(
    path: str, how: Import = "auto", int8: bool = True, lanes: int = 0, time_major: bool = True
) -> tuple[tvm.IRModule, str, str | None, int]:
    """The Relax module of a saved torch.export program.

    ``"direct"`` imports the program as exported: TVM's importer would otherwise first
    re-trace it through torch's decompositions (``"decomposed"``), ~1.5 s per input here, a
    third of a warm re-measure. For convolution-only graphs (the TDNN without adapters,
    pruned or quantized) the fused tasks are the same either way
    (tests/compile/test_import.py compares the workloads, which the tuning database is
    keyed by). ``"auto"`` imports directly unless the graph has an op the
    direct import mis-handles (attention with a boolean mask, which TVM's converter only
    asserts against) or fuses into other tasks (linear layers, e.g. adapters), or the
    direct import fails, and then decomposes.

    Args:
        path: a ``torch.export.save`` file.
        how: ``"auto"``, or force one import.
        int8: lower ``voxfit::qconv1d`` ops to int8 compute (else float32 convs of the
            dequantized weights; see :func:`int8_support`).
        lanes: the target's dot-product lanes (``_int8.lanes_for``): 8-bit-weight convs
            then take the packed layout the tensor intrinsic reads (0: plain int8 TIR).
        time_major: tensorized convs read and write time-major tensors where the
            transposes between a chain of them cancel (:mod:`._layout`), NCW elsewhere;
            False keeps them all NCW (``benchmarks/int8_layout.py`` times both).

    Returns:
        The module, the import used, why ``"auto"`` fell back (None if it did not), and how
        many ``voxfit::qconv1d`` / ``voxfit::qlinear`` ops it converted.

    Raises:
        Exception: whatever TVM's importer raises for a forced import.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.load(path)
    qconv = _QConv1dConverter(ep, int8, lanes, time_major)
    fixes = {
        ATTENTION_OP_NAME: _attention,
        "div.Tensor_mode": _div_mode,
        OP_NAME: qconv,
        LINEAR_OP_NAME: qconv.linear,
        W_OP_NAME: _WConv1dConverter(ep),
    }
    why = None
    if how == "auto":
        why = _needs_decomposition(ep)
    if how == "direct" or (how == "auto" and why is None):
        try:
            with quiet_export():
                mod = from_exported_program(
                    ep, run_ep_decomposition=False, custom_convert_map=fixes
                )
        except (AssertionError, ValueError, TypeError, KeyError, NotImplementedError) as e:
            if how == "direct":
                raise
            why = f"direct import failed: {type(e).__name__}: {e}"[:300]
            log.info("%s: %s; importing decomposed", path, why)
        else:  # the layout decision's own errors are not an import's to fall back from
            return _chains(mod, qconv), "direct", None, qconv.count
    qconv.count = 0
    qconv.twins.clear()
    with quiet_export():  # torch's decomposition warns of its own deprecations
        mod = from_exported_program(ep, custom_convert_map=fixes)
    return _chains(mod, qconv), "decomposed", why, qconv.count


def _chains(mod: tvm.IRModule, qconv: _QConv1dConverter) -> tvm.IRModule:
    """``mod`` with each tensorized conv time-major or NCW (:func:`._layout.choose_layouts`),
    the other kernel dropped."""
    return choose_layouts(mod, qconv.twins) if qconv.twins else mod


class _Twins(NamedTuple):
    """The callees of one conv's two kernels: time-major (between transposes) and NCW."""

    time_major: str
    ncw: str


def _needs_decomposition(ep: Any) -> str | None:
    """Why the direct import would not do for ``ep`` (None: it will)."""
    import torch

    why = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "scaled_dot_product_attention" in name:
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            val = getattr(mask, "meta", {}).get("val")
            if val is not None and val.dtype == torch.bool:
                why.append("attention with a boolean mask")
        if name.startswith("aten.linear"):
            # imported directly, a linear layer on a transposed activation (the adapters)
            # fuses into other tasks than the decomposed import's, which the shipped
            # tuning databases hold: decomposing keeps them valid
            why.append("linear layers fuse differently from the tuning database's tasks")
    return "; ".join(dict.fromkeys(why)) or None


def _attention(node: Any, importer: Any) -> relax.Var:
    """``voxfit::attention`` -> Relax: the scores read q and k in their (B, T, heads*D)
    layout, a softmax, the values written back in it (``_attention``: 3 kernels)."""
    bb = importer.block_builder
    q, k, v = (importer.env[a] for a in node.args[:3])
    heads = int(node.args[3])
    scores = bb.emit_te(att.attention_scores, q, k, heads, primfunc_name_hint=att.SCORES_TASK)
    p = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    return bb.emit_te(  # type: ignore[no-any-return]
        att.attention_values, p, v, heads, primfunc_name_hint=att.VALUES_TASK
    )


def _div_mode(node: Any, importer: Any) -> relax.Var:
    """``aten.div.Tensor_mode`` of an integer tensor by a Python int: the divisor takes the
    tensor's dtype (TVM's converter makes it an int32 constant, which Relax refuses to
    divide an int64 tensor by -- our models' output lengths, ``lengths // 2``). Every other
    case is TVM's own converter."""
    args = importer.retrieve_args(node)
    x, y = args[0], args[1]
    mode = node.kwargs.get("rounding_mode")
    is_int = isinstance(x, relax.Expr) and str(x.ty.dtype).startswith(("int", "uint"))
    if not (is_int and isinstance(y, int) and mode in ("floor", "trunc")):
        return importer._div(node)  # type: ignore[no-any-return]
    bb = importer.block_builder
    d = relax.const(y, x.ty.dtype)
    if mode == "floor":
        return bb.emit(relax.op.floor_divide(x, d))  # type: ignore[no-any-return]
    return bb.emit(relax.op.trunc(bb.emit(relax.op.divide(x, d))))  # type: ignore[no-any-return]


def int8_support(target: tvm.target.Target) -> tuple[bool, str, int]:
    """Whether int8 ops compile to int8 compute on ``target``, what to say about it, and
    the dot-product lanes its 8-bit-weight convs are tensorized to (0: none).

    x86 targets with AVX2 run 8-bit-weight convs and Linears tensorized (``_int8``:
    ``vpmaddubsw`` + ``vpmaddwd``, 8 int32 lanes); with AVX-512BW the same on 16 lanes, or
    ``vpdpbusd`` where the target has AVX-512 VNNI; 4-bit weights with 8-bit inputs stay
    plain int8 TIR that LLVM vectorizes. Arm targets with ``dotprod`` (the Cortex-A55) run
    every int8 conv and linear with ``sdot`` (4 lanes, activations as int8: the uint8 grid
    minus 128; 4-bit weights as int8 values). Arm without ``dotprod`` and CUDA are not
    built: those targets compute the dequantized weights in float32 and the result says so.
    """
    from voxfit.compile._int8 import AVX2_INTRIN, AVX512_INTRIN, VNNI_INTRIN, intrin_of, lanes_for

    triple = str(target.attrs.get("mtriple", ""))
    if target.kind.name == "llvm" and triple.startswith("aarch64"):
        lanes = lanes_for(target)
        if lanes:
            return True, f"8-bit weights tensorized: sdot, {lanes} lanes (int8 activations)", lanes
        return False, "Arm target without the dotprod feature: int8 compute not built", 0
    if target.kind.name != "llvm" or not triple.startswith("x86_64"):
        what = triple or target.kind.name
        return False, f"int8 compute is built for x86 and Arm CPUs only, not {what}", 0
    lanes = lanes_for(target)
    if not lanes:
        return True, "not tensorized: no AVX2 on this target (plain int8 TIR)", 0
    how = {
        AVX2_INTRIN: "vpmaddubsw + vpmaddwd",
        AVX512_INTRIN: "vpmaddubsw + vpmaddwd (AVX-512BW)",
        VNNI_INTRIN: "vpdpbusd (AVX-512 VNNI)",
    }[intrin_of(target)]
    return True, f"8-bit weights tensorized: {how}, {lanes} lanes", lanes


def _tensor_of(ep: Any, node: Any) -> np.ndarray:
    """The value of a lifted buffer/constant placeholder of an exported program."""
    sig = ep.graph_signature
    if node.name in sig.inputs_to_buffers:
        return dict(ep.named_buffers())[sig.inputs_to_buffers[node.name]].numpy()  # type: ignore[no-any-return]
    if node.name in sig.inputs_to_lifted_tensor_constants:
        t = ep.constants[sig.inputs_to_lifted_tensor_constants[node.name]]
        return t.numpy()  # type: ignore[no-any-return]
    if node.name in sig.inputs_to_parameters:
        return ep.state_dict[sig.inputs_to_parameters[node.name]].detach().numpy()  # type: ignore[no-any-return]
    raise ModelError(f"qconv1d: {node.name} is not a constant of the program")


def _quantize_u8(x: Any, scale: Any, zero: Any, pad: int) -> Any:
    """NCW float -> uint8 padded ``pad`` steps in time with the zero point; rounding ties to
    even like torch.round (relax.quantize rounds them away from zero, a step off torch's
    fake quantization now and then). ``scale`` and ``zero`` are (1,) tensors, so the
    kernel does not depend on the calibration (one tuning workload for all of them)."""
    from tvm import te, tirx

    from voxfit.compile._int8 import round_u8

    n, c, t_in = x.shape

    def f(b: Any, ch: Any, t: Any) -> Any:
        q = round_u8(x[b, ch, t - pad], scale, zero)
        if not pad:
            return q
        inside = tirx.all(t >= pad, t < t_in + pad)
        return tirx.if_then_else(inside, q, zero[0].astype("uint8"))

    return te.compute((n, c, t_in + 2 * pad), f, name="quantize_u8")


def _int8_constants(
    op: str, w: np.ndarray, w_scale: np.ndarray, x_scale: float, x_zero: float, offset: int = 0
) -> tuple[tuple[relax.Constant, relax.Constant], np.ndarray, np.ndarray]:
    """The constants of an int8 layer (``w``: its int8 grid, output channels first): the
    input grid as (1,) tensors (kernel arguments, not literals: one tuning workload for
    every calibration), the zero-point correction ``(z - offset) * sum(w)`` per output
    channel (``offset``: what the kernel subtracts from the uint8 grid, ``_int8.act_offset``)
    and the dequantization scale per output channel.

    Raises:
        ModelError: the int32 accumulator could overflow (too many inputs per output).
    """
    if int(np.prod(w.shape[1:])) * 255 * 128 >= 2**31:
        dims = "x".join(str(d) for d in w.shape[1:])
        raise ModelError(f"{op}: {dims} inputs per output could overflow int32")
    x_q = (
        relax.const(np.array([x_scale], "float32")),
        relax.const(np.array([x_zero], "float32")),
    )
    flat = w.astype("int64").reshape(w.shape[0], -1)
    corr = ((int(x_zero) - offset) * flat.sum(axis=1)).astype("int32")
    scale = (np.float32(x_scale) * w_scale.astype("float32")).astype("float32")
    return x_q, corr, scale


class _QConv1dConverter:
    """``voxfit::qconv1d`` -> Relax: quantize the input to uint8, ``conv1d`` uint8 x int8 ->
    int32, dequantize with the zero-point correction folded into a per-channel zero point
    (``acc - z * sum(w)``, exact because the input is padded with ``z``), add the bias. With
    ``int8=False``: a float32 conv of the dequantized weights (the input is not rounded).
    Counts the layers it converted (``.count``)."""

    def __init__(self, ep: Any, int8: bool, lanes: int = 0, time_major: bool = True) -> None:
        self.ep = ep
        self.int8 = int8
        self.lanes = lanes
        self.time_major = time_major
        self.count = 0
        # each tensorized conv emitted both ways (time-major and NCW kernels' callees)
        self.twins: list[_Twins] = []

    def __call__(self, node: Any, importer: Any) -> relax.Var:
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, w_scale, bias = (_tensor_of(self.ep, n) for n in node.args[1:4])
        x_scale, x_zero, stride, padding, dilation = node.args[4:9]
        self.count += 1
        b = relax.const(bias.astype("float32").reshape(1, -1, 1))
        if not self.int8:  # the int8 weights stay packed, unpacked inside a float32 kernel
            # the scale is max|w| / qmax, so the largest grid value is qmax: 7 or 127
            bits = 4 if np.abs(w).max() <= 7 else 8
            return packed_conv1d(bb, x, w, w_scale, bias, bits, stride, padding, dilation)
        from voxfit.compile import _int8

        # 8-bit weights: the tensorized kernel; on Arm 4-bit ones too (as int8 values: the
        # plain int8 conv's default Arm schedules are not verified)
        if self.lanes and (int(np.abs(w).max()) > 7 or self.lanes == _int8.SIGNED_LANES):
            offset = _int8.act_offset(self.lanes)
            x_q, corr, scale = _int8_constants("qconv1d", w, w_scale, x_scale, x_zero, offset)
            consts = (
                relax.const(_int8.pack_int8(w.astype("int8"), self.lanes)),
                relax.const(corr),
                relax.const(scale),
                relax.const(bias.astype("float32")),
            )
            conv_args = (int(w.shape[0]), int(stride), int(padding), int(dilation))

            def kernel(inp: relax.Expr, time_major: bool) -> relax.Var:
                return bb.emit_te(  # type: ignore[no-any-return]
                    _int8.qconv1d_int8,
                    inp,
                    *x_q,
                    *consts,
                    *conv_args,
                    time_major,
                    primfunc_name_hint=_int8.TASK,
                    # a conv to FuseOps (kOutEWiseFusable): the elementwise ops after it fuse
                    primfunc_attrs={"op_pattern": 4},
                )

            y_ncw = kernel(x, False)
            if not self.time_major:
                return y_ncw
            # and time-major, between transposes that _layout.time_major_chains cancels
            # along a chain of int8 layers; the NCW kernel above stays for the layout
            # decision (_chains), which keeps one of the two and drops the other
            y_t = kernel(bb.emit(relax.op.permute_dims(x, [0, 2, 1])), True)
            y = bb.emit(relax.op.permute_dims(y_t, [0, 2, 1]))
            # emit_te binds call_tirs: each has a callee
            tm, ncw = (str(callee(bb.lookup_binding(v))) for v in (y_t, y_ncw))
            self.twins.append(_Twins(tm, ncw))
            return y  # type: ignore[no-any-return]
        x_q, corr, scale = _int8_constants("qconv1d", w, w_scale, x_scale, x_zero)
        q = bb.emit_te(_quantize_u8, x, *x_q, int(padding), primfunc_name_hint="quantize")
        padding = 0
        if int(np.abs(w).max()) <= 7:  # 4-bit weights: two per byte, unpacked in the kernel
            acc = bb.emit_te(
                _packed_conv_te,
                q,
                relax.const(pack_weight(w, 4)),
                4,
                int(w.shape[2]),
                int(stride),
                int(padding),
                int(dilation),
                "int32",
                primfunc_name_hint="conv1d_w4a8",
            )
        else:
            acc = bb.emit(
                relax.op.nn.conv1d(
                    q,
                    relax.const(w.astype("int8")),
                    strides=stride,
                    padding=padding,
                    dilation=dilation,
                    out_dtype="int32",
                )
            )
        y = bb.emit(
            relax.op.dequantize(
                acc, relax.const(scale), relax.const(corr), axis=1, out_dtype="float32"
            )
        )
        return bb.emit(relax.op.add(y, b))  # type: ignore[no-any-return]

    def linear(self, node: Any, importer: Any) -> relax.Var:
        """``voxfit::qlinear`` -> Relax: with int8 compute one kernel
        (:func:`~voxfit.compile._int8.qlinear_int8`: quantize, u8 x s8 -> s32, dequantize;
        tensorized where the target has the lanes, 4-bit weights as int8 values), else a
        float32 matmul of the dequantized weights (the input is not rounded)."""
        bb = importer.block_builder
        x = importer.env[node.args[0]]
        w, w_scale, bias = (_tensor_of(self.ep, n) for n in node.args[1:4])
        x_scale, x_zero = node.args[4:6]
        self.count += 1
        if not self.int8:
            wf = (w.astype("float32") * w_scale.astype("float32")[:, None]).T
            y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(wf))))
            return bb.emit(relax.op.add(y, relax.const(bias.astype("float32"))))  # type: ignore[no-any-return]
        from voxfit.compile import _int8

        lanes = self.lanes or 8  # no instruction: plain int8 TIR in the AVX2 layout
        offset = _int8.act_offset(lanes)
        x_q, corr, scale = _int8_constants("qlinear", w, w_scale, x_scale, x_zero, offset)
        return bb.emit_te(  # type: ignore[no-any-return]
            _int8.qlinear_int8,
            x,
            *x_q,
            relax.const(_int8.pack_int8(w.astype("int8")[:, :, None], lanes)),
            relax.const(corr),
            relax.const(scale),
            relax.const(bias.astype("float32")),
            int(w.shape[0]),
            primfunc_name_hint=_int8.LINEAR_TASK,
            primfunc_attrs={"op_pattern": 4},  # the elementwise ops after it fuse in
        )


def pack_weight(w: np.ndarray, bits: int) -> np.ndarray:
    """The library's form of a conv weight (O, C, K): int8 at 8 bits, float16 at 16, and at 4
    bits two values per byte along the flattened C*K axis, offset by 8 (uint8 (O, ceil(C*K/2)):
    low nibble = even index)."""
    if bits == 16:
        return w.astype("float16")
    if bits == 8:
        return w.astype("int8")
    flat = (w.reshape(w.shape[0], -1).astype(np.int16) + 8).astype(np.uint8)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.full((flat.shape[0], 1), 8, np.uint8)], axis=1)
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).astype(np.uint8)  # type: ignore[no-any-return]


def _packed_conv_te(
    x: Any,
    p: Any,
    bits: int,
    k: int,
    stride: int,
    padding: int,
    dilation: int,
    acc: str = "float32",
) -> Any:
    """conv1d NCW of ``x`` and a packed weight ``p`` (:func:`pack_weight`), the weight
    unpacked where the reduction reads it (the scale is applied after the sum). ``acc``:
    float32 for float ``x``; int32 for a uint8 ``x`` (exact integer accumulation)."""
    from tvm import te, tirx, topi

    n, c_in, t_in = x.shape
    o = p.shape[0]
    if padding:
        x = topi.nn.pad(x, (0, 0, padding), (0, 0, padding), name="pad_temp")
    t_out = (t_in + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    rc = te.reduce_axis((0, c_in), name="rc")
    rk = te.reduce_axis((0, k), name="rk")

    def weight(oc: Any, c: Any, kk: Any) -> Any:
        if bits != 4:
            return p[oc, c, kk].astype(acc)
        i = c * k + kk
        byte = p[oc, tirx.floordiv(i, 2)]
        shift = (tirx.floormod(i, 2) * 4).astype("uint8")
        nib = tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8"))
        return nib.astype(acc) - tirx.const(8, acc)

    return te.compute(
        (n, o, t_out),
        lambda b, oc, t: te.sum(
            x[b, rc, t * stride + rk * dilation].astype(acc) * weight(oc, rc, rk), axis=[rc, rk]
        ),
        name="conv1d_ncw",
    )


def packed_conv1d(
    bb: Any,
    x: relax.Expr,
    w: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray,
    bits: int,
    stride: int,
    padding: int,
    dilation: int,
) -> relax.Var:
    """Emit ``conv1d(x, w * w_scale) + bias`` with ``w`` kept packed at ``bits`` (4, 8 or 16)
    in the module's constants; the per-channel scale and the bias are elementwise ops after
    it, which fuse into the kernel's epilogue."""
    packed = pack_weight(w, bits)
    y = bb.emit_te(
        _packed_conv_te,
        x,
        relax.const(packed),
        bits,
        int(w.shape[2]),
        int(stride),
        int(padding),
        int(dilation),
        primfunc_name_hint=f"conv1d_w{bits}",
    )
    if bits != 16:
        y = bb.emit(relax.op.multiply(y, relax.const(w_scale.astype("float32").reshape(1, -1, 1))))
    return bb.emit(relax.op.add(y, relax.const(bias.astype("float32").reshape(1, -1, 1))))  # type: ignore[no-any-return]


class _WConv1dConverter:
    """``voxfit::wconv1d`` -> a float32 conv whose 4/8/16-bit weights stay packed in the
    library (:func:`packed_conv1d`)."""

    def __init__(self, ep: Any) -> None:
        self.ep = ep

    def __call__(self, node: Any, importer: Any) -> relax.Var:
        x = importer.env[node.args[0]]
        w, w_scale, bias = (_tensor_of(self.ep, n) for n in node.args[1:4])
        bits, stride, padding, dilation = node.args[4:8]
        return packed_conv1d(
            importer.block_builder, x, w, w_scale, bias, int(bits), stride, padding, dilation
        )


def is_gpu(target: tvm.target.Target) -> bool:
    """Whether ``target`` is a GPU (no MetaSchedule tuning there: DLight schedules)."""
    return str(target.kind.name) in ("cuda", "rocm", "vulkan", "opencl", "metal")
