"""ONNX export of a compressed model, with real int8 (QDQ) where the plan says 8 bits.

The model is exported in float (the activation fake-quantizers switched off) with the
TorchScript exporter; then onnxruntime's static quantizer rewrites the layers whose
``weight_bits`` is 8 into QuantizeLinear/DequantizeLinear form: int8 weights per output
channel, uint8 activations calibrated on training batches. Other layers stay float.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxfit._warnings import quiet_export
from voxfit.compress._quant import fake_quant_off
from voxfit.errors import ConfigError
from voxfit.plan import plan_of

INPUTS = ("feats", "lengths")
OUTPUTS = ("log_probs", "out_lengths")


@dataclass(frozen=True, slots=True)
class OnnxExport:
    """Where the model went and which layers became int8 QDQ."""

    path: Path
    int8_layers: tuple[str, ...]
    qdq_nodes: int


def _scope(layer: str) -> str:
    # TorchScript names nodes by module scope: "blocks.0.conv1" -> "/blocks.0/conv1/Conv".
    return "/" + re.sub(r"\.(?!\d)", "/", layer) + "/"


class _Reader:
    """onnxruntime CalibrationDataReader over (feats, lengths) batches."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._it = iter(
            [{"feats": f.numpy().astype(np.float32), "lengths": n.numpy()} for f, n in batches]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    opset: int = 17,
) -> OnnxExport:
    """Write ``model`` as ONNX (inputs feats (B, T, 80) and lengths (B,), dynamic B and T).

    Raises:
        ConfigError: the plan has 8-bit layers but no calibration batches were given.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    plan = plan_of(model)
    int8 = tuple(x.name for x in plan.layers if x.weight_bits == 8)
    if int8 and calibration is None:
        raise ConfigError("int8 (QDQ) export needs calibration batches (calibration=...)")
    model.eval()
    example = (torch.zeros(1, 64, 80), torch.tensor([64]))
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        with fake_quant_off(model), torch.no_grad(), quiet_export():
            torch.onnx.export(
                model,
                example,
                str(fp32),
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
        if not int8:
            onnx.checker.check_model(onnx.load(str(fp32)))
            os.replace(fp32, dst)
            return OnnxExport(dst, (), 0)
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
                _Reader(calibration or ()),
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
    return OnnxExport(dst, int8, qdq)
