from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from voxfit.compress import apply, export_onnx, export_onnx_static_int8, ort_session
from voxfit.errors import ConfigError
from voxfit.models import build_model, default_config
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(default_config(kind, 12, "tiny")).eval()  # type: ignore[arg-type]


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(2, 80, 80, generator=g), torch.tensor([80, 70])) for _ in range(n)]


def _run(path: Path, x: torch.Tensor, lens: torch.Tensor, *, exact: bool = False) -> np.ndarray:
    """onnxruntime's output; ``exact``: basic graph optimizations only, i.e. the file's own
    arithmetic (full optimization may fuse DequantizeLinear + MatMul into integer kernels
    that quantize activations on the fly)."""
    so = ort.SessionOptions()
    if exact:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
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


def _plan(base: nn.Module, weight_bits: int, act_bits: int, every: int = 2) -> Candidate:
    """Every ``every``-th quantizable layer at (weight_bits, act_bits), the head at 16 bits."""
    layers = base.structure().quantizable
    chosen = tuple(LayerPlan(q, weight_bits, act_bits) for q in layers[:-1][::every])
    return Candidate(layers=(*chosen, LayerPlan(layers[-1], 16)))


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
@pytest.mark.parametrize(("wbits", "abits"), [(8, 32), (4, 32), (8, 8), (4, 16), (32, 8)])
def test_onnx_computes_the_plan_at_its_exact_bit_widths(
    kind: str, wbits: int, abits: int, tmp_path: Path
) -> None:
    base = _model(kind)
    plan = _plan(base, wbits, abits)
    m = apply(base, plan, calibration=_batches() if abits == 8 else None)
    out = export_onnx(m, tmp_path / "q.onnx")
    chosen = tuple(x.name for x in plan.layers if x.weight_bits == wbits and wbits < 32)
    assert out.int8_layers == (chosen if wbits == 8 else ())
    assert out.int4_layers == (chosen if wbits == 4 else ())
    acts = tuple(x.name for x in plan.layers if x.act_bits == abits and abits < 32)
    assert out.act8_layers == (acts if abits == 8 else ())
    assert out.act16_layers == (acts if abits == 16 else ())
    assert out.opset == (21 if wbits == 4 else 17)
    g = onnx.load(str(out.path)).graph
    quant_nodes = [n for n in g.node if n.op_type == "QuantizeLinear"]
    # activations are quantized exactly where the plan says: never for float activations
    assert len(quant_nodes) == (len(acts) if abits == 8 else 0)
    stored = {t.data_type for t in g.initializer}
    if wbits == 8:
        assert onnx.TensorProto.INT8 in stored
    if wbits == 4:
        assert onnx.TensorProto.INT4 in stored  # two weights per byte
    x, lens = (
        torch.randn(2, 97, 80, generator=torch.Generator().manual_seed(3)),
        torch.tensor([97, 80]),
    )
    got = _run(out.path, x, lens, exact=True)
    want = m(x, lens)[0].detach().numpy()
    if abits == 8:  # the same scale and zero point as torch: a rare tie may round apart
        # >= 0.98: without VNNI onnxruntime's U8S8 kernels saturate int16 pair sums
        # (0.9898 measured on an AVX2-only Zen 3; benchmarks/results/int8.json)
        assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= 0.98
        assert np.abs(got - want).mean() < 1e-3
    else:  # weights are the very values torch rounded to: float rounding only
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
    # as deployed (every onnxruntime optimization, the session config bundles state)
    fast = ort_session(out.path).run(None, {"feats": x.numpy(), "lengths": lens.numpy()})[0]
    if abits == 8:
        assert float((fast.argmax(-1) == want.argmax(-1)).mean()) >= 0.98  # as above
        # the fused U8S8 kernels saturate int16 pair sums without VNNI (the conformer w8a8
        # measured max 0.053, mean 0.0097 on an AVX2-only Zen 3)
        assert np.abs(fast - want).max() < 0.1
        assert np.abs(fast - want).mean() < 0.02
    else:  # float activations stay float (no MatMulNBits int8 activations): as planned
        np.testing.assert_allclose(fast, want, atol=2e-4, rtol=1e-3)


def test_onnx_weights_weigh_what_the_plan_says(tmp_path: Path) -> None:
    from voxfit.metrics import packed_size_bytes

    base = _model("tdnn")
    layers = base.structure().quantizable
    sizes = {}
    for bits in (32, 8, 4):
        m = apply(base, Candidate(layers=tuple(LayerPlan(q, bits) for q in layers)))
        out = export_onnx(m, tmp_path / f"w{bits}.onnx")
        sizes[bits] = out.weight_bytes
        # the file stores what the size objective counts (plus shapes and names)
        assert out.weight_bytes <= 1.15 * packed_size_bytes(m), (bits, out.weight_bytes)
        assert out.path.stat().st_size < 1.15 * packed_size_bytes(m) + 20_000
    assert sizes[8] < 0.35 * sizes[32]
    assert sizes[4] < 0.65 * sizes[8]


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_the_onnxruntime_static_int8_peer_quantizes_weights_and_activations(
    kind: str, tmp_path: Path
) -> None:
    base = _model(kind)
    layers = base.structure().quantizable
    eight = tuple(LayerPlan(q, 8) for q in layers[: len(layers) // 2])
    m = apply(base, Candidate(layers=(*eight, LayerPlan(layers[-1], 16))))
    out = export_onnx_static_int8(m, tmp_path / "q.onnx", _batches())
    assert out.int8_layers == tuple(x.name for x in eight)
    assert out.qdq_nodes > 0
    inits = onnx.load(str(out.path)).graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT8 for t in inits)  # real int8 weights stored
    x, lens = _batches(1)[0]
    got = _run(out.path, x, lens)
    want = m(x, lens)[0].detach().numpy()
    # its own activation quantization moves log-probs a little against their spread
    err = np.abs(got - want).mean()
    spread = np.abs(want - want.mean(-1, keepdims=True)).mean()
    assert err < 0.15 * spread, (err, spread)


def test_uncalibrated_8_bit_activations_and_a_peer_without_8_bit_layers_are_errors(
    tmp_path: Path,
) -> None:
    base = _model("tdnn")
    with pytest.raises(ConfigError, match="onnxruntime static int8 needs layers"):
        export_onnx_static_int8(base, tmp_path / "p.onnx", _batches())
