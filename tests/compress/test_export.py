from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from voxfit.compress import apply, export_onnx
from voxfit.errors import ConfigError
from voxfit.models import build_model, default_config
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(default_config(kind, 12, "tiny")).eval()  # type: ignore[arg-type]


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(2, 80, 80, generator=g), torch.tensor([80, 70])) for _ in range(n)]


def _run(path: Path, x: torch.Tensor, lens: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"feats": x.numpy(), "lengths": lens.numpy()})[0]


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_float_export_matches_torch_at_other_shapes(kind: str, tmp_path: Path) -> None:
    m = apply(
        _model(kind),
        Candidate(
            groups=(GroupPlan("stream", 0.5),),
            adapters=(AdapterPlan(_model(kind).structure().adapter_slots[0].name, 4),),
        ),
    )
    out = export_onnx(m, tmp_path / "m.onnx")
    assert out.qdq_nodes == 0
    x, lens = torch.randn(3, 97, 80), torch.tensor([97, 90, 50])
    np.testing.assert_allclose(
        _run(out.path, x, lens), m(x, lens)[0].detach().numpy(), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_int8_layers_become_qdq_and_stay_close(kind: str, tmp_path: Path) -> None:
    base = _model(kind)
    layers = base.structure().quantizable
    eight = tuple(LayerPlan(q, 8) for q in layers[: len(layers) // 2])
    m = apply(base, Candidate(layers=(*eight, LayerPlan(layers[-1], 16))))
    out = export_onnx(m, tmp_path / "q.onnx", calibration=_batches())
    assert out.int8_layers == tuple(x.name for x in eight)
    assert out.qdq_nodes > 0
    inits = onnx.load(str(out.path)).graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT8 for t in inits)  # real int8 weights stored
    x, lens = _batches(1)[0]
    got = _run(out.path, x, lens)
    want = m(x, lens)[0].detach().numpy()
    # int8 rounding moves log-probs a little compared with how much they vary
    err = np.abs(got - want).mean()
    spread = np.abs(want - want.mean(-1, keepdims=True)).mean()
    assert err < 0.15 * spread, (err, spread)


def test_int8_export_needs_calibration(tmp_path: Path) -> None:
    base = _model("tdnn")
    m = apply(base, Candidate(layers=(LayerPlan(base.structure().quantizable[0], 8),)))
    with pytest.raises(ConfigError, match="needs calibration batches"):
        export_onnx(m, tmp_path / "q.onnx")
