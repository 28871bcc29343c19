"""ONNX export of a compressed model at exactly its plan's bit-widths.

The model is exported in float (the activation fake-quantizers switched off) with the
TorchScript exporter; then each layer of the plan is rewritten to store and compute what
the search measured:

- ``weight_bits`` 8 or 4: the weight is stored as int8 / int4 per output channel with its
  float scale (``DequantizeLinear``; int4 needs opset 21, two values per byte). The values
  are the ones ``compress.apply`` rounded to, re-derived exactly from the already rounded
  float weight; 16: stored as float16 and cast up;
- ``act_bits`` 8: the layer's input passes a ``QuantizeLinear``/``DequantizeLinear`` pair with
  the scale and zero point the torch quantizer calibrated (uint8); 16: a float16 round trip;
  32 (and 8-bit weights with float activations): the input stays float.

So an 8-bit-weight layer with float activations stays a float computation in ONNX, as in the
plan. :func:`export_onnx_static_int8` is the other thing, a *peer*: onnxruntime's own static
int8 quantization of every 8-bit layer (weights and activations), what a team would try first.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxfit._warnings import quiet_export
from voxfit.compress._quant import fake_quant_off
from voxfit.errors import ConfigError
from voxfit.models import ActivationQuantizer, merge_adapters, n_mels_of
from voxfit.plan import plan_of

INPUTS = ("feats", "lengths")
OUTPUTS = ("log_probs", "out_lengths")
INT4_OPSET = 21  # DequantizeLinear on int4 tensors


@dataclass(frozen=True, slots=True)
class OnnxExport:
    """Where the model went, which layers were lowered how, and what its weights weigh.

    ``int8_layers``/``int4_layers``/``float16_layers``: weight storage per layer;
    ``act8_layers``/``act16_layers``: layers whose input is quantized; ``qdq_nodes``: the
    QuantizeLinear/DequantizeLinear nodes; ``weight_bytes``: bytes of every initializer.
    """

    path: Path
    int8_layers: tuple[str, ...]
    qdq_nodes: int
    int4_layers: tuple[str, ...] = ()
    float16_layers: tuple[str, ...] = ()
    act8_layers: tuple[str, ...] = ()
    act16_layers: tuple[str, ...] = ()
    weight_bytes: int = 0
    opset: int = 17


def _scope(layer: str) -> str:
    # TorchScript names nodes by module scope: "blocks.0.conv1" -> "/blocks.0/conv1/Conv".
    return "/" + re.sub(r"\.(?!\d)", "/", layer) + "/"


def _export_float(model: nn.Module, dst: Path, opset: int) -> None:
    model.eval()
    example = (torch.zeros(1, 64, n_mels_of(model)), torch.tensor([64]))
    with fake_quant_off(model), torch.no_grad(), quiet_export():
        torch.onnx.export(
            model,
            example,
            str(dst),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes={
                "feats": {0: "batch", 1: "frames"},
                "lengths": {0: "batch"},
                "log_probs": {0: "batch", 1: "out_frames"},
                "out_lengths": {0: "batch"},
            },
        )


def _weight_node(graph: Any, layer: str, inits: dict[str, Any]) -> tuple[Any, int]:
    """The layer's Conv/Gemm/MatMul node whose weight is an initializer, and the weight's
    output-channel axis there (MatMul stores Linear weights transposed)."""
    scope = _scope(layer)
    for n in graph.node:
        direct = n.name.startswith(scope) and n.name.count("/") == scope.count("/")
        if (
            direct
            and n.op_type in ("Conv", "Gemm", "MatMul")
            and n.input[1:2]
            and (n.input[1] in inits)
        ):
            if n.op_type == "Conv":
                return n, 0
            if n.op_type == "Gemm":
                trans = next((a.i for a in n.attribute if a.name == "transB"), 0)
                return n, 0 if trans else 1
            return n, 1
    raise ConfigError(f"ONNX export: no Conv/Gemm/MatMul with a weight found for layer {layer}")


def _per_channel(w: np.ndarray, axis: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(integer values, scale per channel) of a weight ``compress.apply`` already rounded:
    the same symmetric rule (scale = max|w| / (2^(bits-1) - 1)), so this recovers its ints."""
    qmax = 2 ** (bits - 1) - 1
    moved = np.moveaxis(w, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    scale = np.maximum(np.abs(flat).max(axis=1), 1e-12).astype(np.float32) / qmax
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def _int_tensor(name: str, q: np.ndarray, bits: int) -> Any:
    """An int8 tensor (a byte each), or int4 packed two per byte (first value in the low
    nibble, as ONNX stores INT4), as raw data: the file weighs what the plan counts."""
    from onnx import TensorProto, helper

    if bits == 8:
        return helper.make_tensor(name, TensorProto.INT8, q.shape, q.tobytes(), raw=True)
    flat = (q.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, q.shape, packed.tobytes(), raw=True)


def _rewrite(model: nn.Module, src: Path, dst: Path, opset: int) -> OnnxExport:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    plan = plan_of(model)
    m = onnx.load(str(src))
    four = any(x.weight_bits == 4 for x in plan.layers)
    if four and opset < INT4_OPSET:
        from onnx import version_converter

        m = version_converter.convert_version(m, INT4_OPSET)
        opset = INT4_OPSET
    graph = m.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes: list[tuple[Any, Any]] = []  # (node to insert, before this node)
    done: dict[str, list[str]] = {"8": [], "4": [], "16": [], "a8": [], "a16": []}
    for lp in plan.layers:
        if lp.weight_bits == 32 and lp.act_bits == 32:
            continue
        node, axis = _weight_node(graph, lp.name, inits)
        tag = lp.name.replace(".", "_")
        if lp.weight_bits in (4, 8, 16):
            w_name = node.input[1]
            w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
            graph.initializer.remove(inits.pop(w_name))
            out = f"{tag}_weight_dq"
            if lp.weight_bits == 16:
                half = numpy_helper.from_array(w.astype(np.float16), f"{tag}_weight_f16")
                graph.initializer.append(half)
                new_nodes.append(
                    (helper.make_node("Cast", [half.name], [out], to=TensorProto.FLOAT), node)
                )
                done["16"].append(lp.name)
            else:
                q, scale = _per_channel(w, axis, lp.weight_bits)
                qt = _int_tensor(f"{tag}_weight_q", q, lp.weight_bits)
                st = numpy_helper.from_array(scale, f"{tag}_weight_scale")
                zt = _int_tensor(
                    f"{tag}_weight_zero", np.zeros(scale.shape, np.int8), lp.weight_bits
                )
                graph.initializer.extend([qt, st, zt])
                dq = helper.make_node(
                    "DequantizeLinear", [qt.name, st.name, zt.name], [out], axis=axis
                )
                new_nodes.append((dq, node))
                done[str(lp.weight_bits)].append(lp.name)
            node.input[1] = out
        if lp.act_bits in (8, 16):
            quant = getattr(model.get_submodule(lp.name), "act_quant", None)
            x = node.input[0]
            xq = f"{tag}_input_q{lp.act_bits}"
            if lp.act_bits == 8:
                if not isinstance(quant, ActivationQuantizer) or not torch.isfinite(quant.lo):
                    raise ConfigError(f"{lp.name}: 8-bit activations are not calibrated")
                # the torch quantizer's own arithmetic (float32), so ONNX rounds the same way
                lo = torch.clamp(quant.lo, max=0.0)
                a_scale = (torch.clamp(quant.hi, min=0.0) - lo).clamp_min(1e-8) / 255.0
                zero = int(torch.round(-lo / a_scale))
                st = numpy_helper.from_array(
                    np.array(a_scale.item(), np.float32), f"{tag}_input_scale"
                )
                zt = helper.make_tensor(f"{tag}_input_zero", TensorProto.UINT8, [], [zero])
                graph.initializer.extend([st, zt])
                pair = [
                    helper.make_node("QuantizeLinear", [x, st.name, zt.name], [xq + "_u8"]),
                    helper.make_node("DequantizeLinear", [xq + "_u8", st.name, zt.name], [xq]),
                ]
                done["a8"].append(lp.name)
            else:
                pair = [
                    helper.make_node("Cast", [x], [xq + "_f16"], to=TensorProto.FLOAT16),
                    helper.make_node("Cast", [xq + "_f16"], [xq], to=TensorProto.FLOAT),
                ]
                done["a16"].append(lp.name)
            new_nodes.extend((p, node) for p in pair)
            # every consumer of this input inside the layer (its LoRA branch too) sees the
            # quantized input, as the torch pre-hook gives it to all of them
            for n in graph.node:
                if n.name.startswith(_scope(lp.name)):
                    for i, name in enumerate(n.input):
                        if name == x:
                            n.input[i] = xq
    for new, before in new_nodes:
        nodes = list(graph.node)
        graph.node.insert(nodes.index(before), new)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    nbytes = sum(len(t.raw_data) or len(t.SerializeToString()) for t in m.graph.initializer)
    return OnnxExport(
        dst,
        tuple(done["8"]),
        qdq,
        int4_layers=tuple(done["4"]),
        float16_layers=tuple(done["16"]),
        act8_layers=tuple(done["a8"]),
        act16_layers=tuple(done["a16"]),
        weight_bytes=nbytes,
        opset=opset,
    )


# How model.onnx runs as planned under onnxruntime. By default (every optimization) it fuses
# a dequantized low-bit weight feeding a MatMul into MatMulNBits at accuracy level 4, which
# quantizes the float activations to int8 on the fly: measured on a tiny conformer with
# 8-bit weights and float activations, max |log-prob diff| 0.0047-0.016 vs the plan's torch
# model, 2e-6 at level 1 (float compute). Convs are not fused so; the TDNN is unaffected.
ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def ort_session(
    path: str | os.PathLike[str],
    config: dict[str, str] | None = None,
    *,
    threads: int | None = None,
) -> Any:
    """An onnxruntime CPU session of ``path`` with ``config`` (default
    :data:`ORT_SESSION_CONFIG`) and every graph optimization; ``threads``: intra-op threads
    (one inter-op thread), default onnxruntime's."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for k, v in (ORT_SESSION_CONFIG if config is None else config).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, opset: int = 17) -> OnnxExport:
    """Write ``model`` as ONNX at exactly its plan's bit-widths (see the module doc): inputs
    feats (B, T, n_mels: 80 unless the model says, ``models.n_mels_of``) and lengths (B,),
    dynamic B and T. Opset 21 when a layer is 4-bit.

    Raises:
        ConfigError: a planned layer has no weight node in the graph, or its 8-bit
            activations were never calibrated.
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = merge_adapters(model)  # a merged LoRA is its layer's weight
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _export_float(model, fp32, opset)
        tmp_out = Path(tmp) / "out.onnx"
        out = _rewrite(model, fp32, tmp_out, opset)
        os.replace(tmp_out, dst)
    return OnnxExport(**{**{f: getattr(out, f) for f in out.__slots__}, "path": dst})


class _Reader:
    """onnxruntime CalibrationDataReader over (feats, lengths) batches."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._it = iter(
            [{"feats": f.numpy().astype(np.float32), "lengths": n.numpy()} for f, n in batches]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def export_onnx_static_int8(
    model: nn.Module,
    path: str | os.PathLike[str],
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    opset: int = 17,
) -> OnnxExport:
    """The peer: onnxruntime's static int8 (QDQ: int8 weights per channel, uint8 activations
    calibrated on ``calibration``) of every layer the plan puts at 8-bit weights, whatever
    its activation bits; the rest float.

    Raises:
        ConfigError: no 8-bit layer, or no graph node found for them.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    int8 = tuple(x.name for x in plan_of(model).layers if x.weight_bits == 8)
    if not int8:
        raise ConfigError("onnxruntime static int8 needs layers planned at 8-bit weights")
    model = merge_adapters(model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _export_float(model, fp32, opset)
        graph = onnx.load(str(fp32)).graph
        scopes = [_scope(x) for x in int8]
        nodes = [
            n.name
            for n in graph.node
            if n.op_type in ("Conv", "MatMul", "Gemm")
            and any(n.name.startswith(s) for s in scopes)
        ]
        if not nodes:
            raise ConfigError(f"no ONNX node found for the 8-bit layers {', '.join(int8)}")
        with quiet_export():
            quantize_static(
                str(fp32),
                str(dst),
                _Reader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                nodes_to_quantize=nodes,
                calibrate_method=CalibrationMethod.MinMax,
            )
    m = onnx.load(str(dst))
    onnx.checker.check_model(m)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    nbytes = sum(len(t.raw_data) or len(t.SerializeToString()) for t in m.graph.initializer)
    return OnnxExport(dst, int8, qdq, weight_bytes=nbytes, opset=opset)
