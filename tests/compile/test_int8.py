"""Int8 lowering: 8-bit-activation convs become voxfit::qconv1d ops, then int8 compute in TVM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests._tiny import tiny_tdnn
from voxfit.compile import CompileResult, TvmWorker, compile_model
from voxfit.compile._compile import _Deploy, int8_layers, lowering_of
from voxfit.compile._qops import QConv1d, QLinear
from voxfit.compress import apply
from voxfit.errors import ModelError
from voxfit.hw_profiles import host_cpu_flags, load_profile
from voxfit.models import build_model, default_config
from voxfit.plan import AdapterPlan, Candidate, LayerPlan

ROOT = Path(__file__).resolve().parents[2]


def _quantized(act_bits: int = 8, weight_bits: int = 8, adapter: int = 0) -> nn.Module:
    m = tiny_tdnn()
    s = m.structure()
    layers = [LayerPlan(q, weight_bits, act_bits) for q in s.quantizable]
    layers[-1] = LayerPlan(s.quantizable[-1], 32, 32)  # the head stays float
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64])) for _ in range(3)]
    adapters = (AdapterPlan(s.adapter_slots[-1].name, adapter),) if adapter else ()
    cand = Candidate(layers=tuple(layers), adapters=adapters)
    return apply(m, cand, calibration=cal)


def _x(frames: int) -> torch.Tensor:
    return torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(1))


def test_deploy_graph_has_one_int8_op_per_quantized_conv_and_computes_the_same() -> None:
    q = _quantized(weight_bits=4)
    names = list(int8_layers(q))
    assert len(names) == len(q.structure().quantizable) - 1  # all but the float head
    d = _Deploy(q)
    assert d.int8_layers == names
    for n in names:
        mod = d.model.get_submodule(n)
        assert isinstance(mod, QConv1d)
        assert mod.weight.dtype == torch.int8
        assert int(mod.weight.abs().max()) <= 7  # 4-bit weights on the int8 grid
    x = _x(64)
    with torch.no_grad():
        ref = q(x, torch.tensor([64]))[0].numpy()
        # equal up to float rounding (the deploy graph folds BatchNorm into an affine)
        np.testing.assert_allclose(d(x).numpy(), ref, rtol=1e-5, atol=1e-5)
    assert lowering_of(q) == f"{len(names)} layers as int8 ops"


def test_weight_only_plans_keep_float_compute() -> None:
    q = _quantized(act_bits=32)
    assert int8_layers(q) == {}
    assert not _Deploy(q).int8_layers
    # float compute; their weights stay packed (tests/compile/test_packed.py)
    n = len(q.structure().quantizable) - 1
    assert lowering_of(q) == f"{n} w8 layers packed, unpacked in the kernel"


def test_depthwise_convs_and_lora_targets_keep_float_compute() -> None:
    torch.manual_seed(0)
    conf = build_model(default_config("conformer", 12, "tiny")).eval()
    s = conf.structure()
    cal = [(torch.randn(2, 64, 80), torch.tensor([64, 64]))]
    q = apply(
        conf, Candidate(layers=tuple(LayerPlan(n, 8, 8) for n in s.quantizable)), calibration=cal
    )
    lowered = int8_layers(q)
    dw = [n for n in s.quantizable if n.endswith(".dw")]
    assert dw
    assert not set(dw) & set(lowered)  # grouped: no int8 lowering, and no export failure
    # the stem (the conformer's only ungrouped conv) and every linear layer lower
    assert sorted(lowered) == sorted(n for n in s.quantizable if n not in dw)
    d = _Deploy(q)  # exports what it can lower and nothing else
    assert d.int8_layers == list(lowered)
    assert all(isinstance(d.model.get_submodule(n), QLinear) for n in lowered if n != "stem")
    x = _x(64)
    with torch.no_grad():  # the int8 ops compute what the fake-quantized layers compute
        ref = q(x, torch.tensor([64]))[0].numpy()
        np.testing.assert_allclose(d(x).numpy(), ref, rtol=1e-5, atol=1e-5)
    slot = next(x for x in s.adapter_slots if x.lora_target)
    cand = Candidate(
        layers=tuple(LayerPlan(n, 8, 8) for n in s.quantizable),
        adapters=(AdapterPlan(slot.name, 4, "lora"),),
    )
    assert slot.lora_target not in int8_layers(apply(conf, cand, calibration=cal))

    tdnn = build_model(default_config("tdnn", 12, "tiny")).eval()
    t = tdnn.structure()
    lora = next(x for x in t.adapter_slots if x.lora_target)
    cand = Candidate(
        layers=tuple(LayerPlan(n, 8, 8) for n in t.quantizable),
        adapters=(AdapterPlan(lora.name, 4, "lora"),),
    )
    q2 = apply(tdnn, cand, calibration=cal)
    assert lora.lora_target not in int8_layers(q2)  # its LoRA hook would be lost
    assert len(int8_layers(q2)) == len(t.quantizable) - 1


def test_off_grid_weights_are_refused_naming_the_layer() -> None:
    q = _quantized()
    with torch.no_grad():
        q.get_submodule("blocks.0.conv1").weight.add_(1e-3)
    with pytest.raises(ModelError, match=r"blocks\.0\.conv1: weights are not on the 8-bit grid"):
        _Deploy(q)


def _compile_avx2_and_avx512(
    q: nn.Module, tmp_path: Path
) -> tuple[CompileResult, dict[str, Any], CompileResult, dict[str, Any] | None]:
    """``q`` compiled untuned for the AVX2 profile and for the AVX-512 one, each run on the
    test input where this host runs its code (the AVX-512 library would not run on an AVX2
    host: its output is None there)."""
    p = load_profile(ROOT / "hw_profiles" / "x86-avx2-2core.yaml")
    p = replace(
        p,
        cores=1,
        inputs=p.inputs[:1],
        tuning=replace(p.tuning, database_dir=str(tmp_path / "db")),
    )
    with TvmWorker(1) as w:
        (r,) = compile_model(q, p, w, tmp_path / "out", tune=False)
        assert r.ok, r.error
        out = w.call("run_local", timeout_s=120, lib=str(r.lib), input=_x(r.frames).numpy())
        avx512 = load_profile(ROOT / "hw_profiles" / "x86-avx512-2core.yaml")
        avx512 = replace(avx512, inputs=avx512.inputs[:1], tuning=p.tuning)
        (f,) = compile_model(q, avx512, w, tmp_path / "f", tune=False)
        assert f.ok, f.error
        out512 = None
        if "avx512bw" in host_cpu_flags():
            out512 = w.call("run_local", timeout_s=120, lib=str(f.lib), input=_x(f.frames).numpy())
    return r, out, f, out512


@pytest.mark.tvm
@pytest.mark.slow
def test_int8_compute_in_tvm_matches_the_fake_quantized_model(tmp_path: Path) -> None:
    # an adapter (a linear layer) makes the import decompose: the int8 op must survive that
    q = _quantized(adapter=4)
    # The AVX2 profile on every host (AVX-512 hosts run its code too): its int8 kernels are
    # what the shipped database and cost model know; the AVX-512 profile's (16 lanes, the
    # same saturating pairs) where the host runs them
    r, out, f, out512 = _compile_avx2_and_avx512(q, tmp_path)
    n = len(int8_layers(q))
    if r.profile.startswith("x86-avx2"):
        assert r.lowering.startswith(f"{n} layers int8 compute (u8 x s8 -> s32")
        # one int8 kernel per conv shape (quantize, tensorized conv, dequantize epilogue),
        # the elementwise ops after it fused in; no separate float32 conv left
        assert any("conv1d_u8s8" in t for t in r.task_names), r.task_names
        assert not any(t.startswith("quantize") for t in r.task_names), r.task_names
        assert r.details["import"] == "decomposed"
    assert f.lowering.startswith(f"{n} layers int8 compute (u8 x s8 -> s32")
    assert "16 lanes" in f.lowering
    assert any("conv1d_u8s8" in t for t in f.task_names), f.task_names
    with torch.no_grad():
        ref = q(_x(r.frames), torch.tensor([r.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)
    if out512 is not None:
        np.testing.assert_allclose(out512["output"], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
@pytest.mark.slow
def test_int8_linear_layers_compile_to_int8_kernels_that_match_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    conf = build_model(default_config("conformer", 12, "tiny")).eval()
    s = conf.structure()
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64])) for _ in range(2)]
    # depthwise convs keep float activations (an int8 plan's dw would run unrounded)
    layers = tuple(LayerPlan(n, 8, 32 if n.endswith(".dw") else 8) for n in s.quantizable)
    q = apply(conf, Candidate(layers=layers), calibration=cal)
    r, out, f, out512 = _compile_avx2_and_avx512(q, tmp_path)
    n = len(int8_layers(q))
    assert f.lowering.startswith(f"{n} layers int8 compute (u8 x s8 -> s32")
    assert any("matmul_u8s8" in t for t in f.task_names), f.task_names
    assert r.lowering.startswith(f"{n} layers int8 compute (u8 x s8 -> s32")
    # one kernel per linear layer: quantize, u8 x s8 matmul, dequantize, what follows fused
    assert any("matmul_u8s8" in t for t in r.task_names), r.task_names
    assert not any(t.startswith("quantize") for t in r.task_names), r.task_names
    with torch.no_grad():
        ref = q(_x(r.frames), torch.tensor([r.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)
    if out512 is not None:
        np.testing.assert_allclose(out512["output"], ref, rtol=1e-4, atol=1e-4)
