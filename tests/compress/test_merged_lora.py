"""``merged_lora`` adapters: a LoRA that lives in its (quantized) layer's weight, so a
personalized model is the backbone with new weights and runs exactly as fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests._tiny import tiny_tdnn
from voxfit.compile._compile import _Deploy, int8_layers
from voxfit.compress import apply, export_onnx, pair_saturation_off
from voxfit.cost_models import decompose
from voxfit.models import (
    MergedLoRAAdapter,
    adapter_parameters,
    freeze_backbone,
    merge_adapters,
    quantize_weight,
)
from voxfit.plan import AdapterPlan, Candidate, LayerPlan

X = torch.randn(2, 64, 80, generator=torch.Generator().manual_seed(1))
LENS = torch.tensor([64, 50])


def _cal() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64])) for _ in range(3)]


def _plan(kind: str, weight_bits: int = 8, act_bits: int = 8, rank: int = 4) -> Candidate:
    s = tiny_tdnn().structure()
    layers = tuple(LayerPlan(q, weight_bits, act_bits) for q in s.quantizable[:-1])
    slots = [x for x in s.adapter_slots if x.lora_target]
    return Candidate(layers=layers, adapters=tuple(AdapterPlan(x.name, rank, kind) for x in slots))  # type: ignore[arg-type]


def _train_like(model: nn.Module, seed: int = 0) -> list[MergedLoRAAdapter]:
    """Give every merged LoRA a delta as adaptation would (big enough to move the grid)."""
    g = torch.Generator().manual_seed(seed)
    loras = [m for m in model.modules() if isinstance(m, MergedLoRAAdapter)]
    with torch.no_grad():
        for lora in loras:
            lora.down.weight.copy_(torch.randn(lora.down.weight.shape, generator=g) * 0.3)
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * 0.3)
    return loras


def test_identity_at_insertion_and_layers_keep_int8_compute() -> None:
    base = tiny_tdnn()
    plain = apply(base, _plan("lora", rank=0), calibration=_cal())
    merged = apply(base, _plan("merged_lora"), calibration=_cal())
    lora = apply(base, _plan("lora"), calibration=_cal())
    loras = [m for m in merged.modules() if isinstance(m, MergedLoRAAdapter)]
    assert loras
    assert all(x.weight_bits == 8 for x in loras)
    with torch.no_grad():
        torch.testing.assert_close(merged(X, LENS)[0], plain(X, LENS)[0])
    # a plain LoRA branch keeps its target in float; a merged one is part of the weight
    targets = {s.lora_target for s in base.structure().adapter_slots if s.lora_target}
    assert targets <= set(int8_layers(merged))
    assert not targets & set(int8_layers(lora))
    assert set(int8_layers(merged)) == set(int8_layers(plain))
    # and the cost model sees the plain plan's tasks: nothing runs beside the backbone
    assert [t.features for t in decompose(merged, 64)] == [
        t.features for t in decompose(plain, 64)
    ]


@pytest.mark.parametrize("bits", [8, 4, 32])
def test_trained_adapter_computes_its_layer_with_the_requantized_merged_weight(
    bits: int,
) -> None:
    m = apply(tiny_tdnn(), _plan("merged_lora", weight_bits=bits), calibration=_cal())
    _train_like(m)
    folded = merge_adapters(m)
    assert folded is not m
    assert not any(isinstance(x, MergedLoRAAdapter) for x in folded.modules())
    assert any(isinstance(x, MergedLoRAAdapter) for x in m.modules())  # m is unchanged
    for s in m.structure().adapter_slots:
        layer = m.get_submodule(s.lora_target)
        delta = layer.lora.up.weight @ layer.lora.down.weight  # (out, in)
        want = quantize_weight((layer.weight + delta[:, :, None]).detach(), bits)
        got = folded.get_submodule(s.lora_target).weight
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, layer.weight)  # the delta moved the grid
    with torch.no_grad():
        # the hooked model (what adaptation trains and the search scores) is the folded one
        torch.testing.assert_close(m(X, LENS)[0], folded(X, LENS)[0], rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_factors_through_the_rounding() -> None:
    m = apply(tiny_tdnn(), _plan("merged_lora"), calibration=_cal())
    freeze_backbone(m)
    params = adapter_parameters(m)
    assert params
    loss = m(X, LENS)[0].logsumexp(-1).mean() + m(X, LENS)[0][..., 0].mean()
    loss.backward()
    ups = [p.grad for p in params if p.grad is not None and p.grad.abs().sum() > 0]
    assert ups  # up starts at zero: its gradient is what starts adaptation
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_deploy_graph_of_a_trained_adapter_is_the_int8_backbone_with_merged_weights() -> None:
    m = apply(tiny_tdnn(), _plan("merged_lora"), calibration=_cal(), int8_pair_saturation=False)
    _train_like(m, seed=3)
    d = _Deploy(m)
    assert not any(isinstance(x, MergedLoRAAdapter) for x in d.model.modules())
    assert d.int8_layers == list(int8_layers(m))
    x = X[:1]
    with torch.no_grad():
        ref = m(x, torch.tensor([64]))[0].numpy()
        np.testing.assert_allclose(d(x).numpy(), ref, rtol=1e-4, atol=1e-4)


def test_pair_saturation_uses_the_merged_weight() -> None:
    m = apply(tiny_tdnn(), _plan("merged_lora"), calibration=_cal(), int8_pair_saturation=True)
    _train_like(m, seed=5)
    with torch.no_grad():
        for lora in (x for x in m.modules() if isinstance(x, MergedLoRAAdapter)):
            lora.up.weight.mul_(20.0)  # large deltas: merged rows with saturating pairs
        folded = merge_adapters(m)  # its saturation hooks read its (merged) weight
        torch.testing.assert_close(m(X, LENS)[0], folded(X, LENS)[0], rtol=1e-4, atol=1e-4)
        with pair_saturation_off(m):
            off = m(X, LENS)[0]
        assert not torch.allclose(off, m(X, LENS)[0])  # saturation really happens here


def test_onnx_of_a_trained_adapter_carries_the_merged_weights(tmp_path: Path) -> None:
    m = apply(tiny_tdnn(), _plan("merged_lora", act_bits=32), calibration=None)
    _train_like(m, seed=7)
    out = export_onnx(m, tmp_path / "m.onnx")
    s = m.structure()
    targets = [x.lora_target for x in s.adapter_slots if x.lora_target]
    assert set(targets) <= set(out.int8_layers)  # stored as int8, no LoRA nodes beside
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(out.path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"feats": X.numpy(), "lengths": LENS.numpy()})[0]
    with torch.no_grad():
        want = m(X, LENS)[0].numpy()
        plain = apply(tiny_tdnn(), _plan("merged_lora", act_bits=32))(X, LENS)[0].numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
    assert np.abs(got - plain).max() > 1e-2  # the adapter's delta is in the file
