"""Packed weights: 4/8/16-bit weight-only convs stay packed in the TVM library (issue 18)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests._tiny import tiny_tdnn
from voxfit.compile import TvmWorker, compile_model
from voxfit.compile._compile import _Deploy, int8_layers, lowering_of, packed_convs
from voxfit.compile._qops import WConv1d
from voxfit.compress import apply
from voxfit.errors import ModelError
from voxfit.hw_profiles import HardwareProfile, load_profile
from voxfit.plan import AdapterPlan, Candidate, LayerPlan

ROOT = Path(__file__).resolve().parents[2]


def _weight_only(bits: int, head: int = 32, lora: bool = False) -> nn.Module:
    m = tiny_tdnn()
    s = m.structure()
    layers = [LayerPlan(q, bits, 32) for q in s.quantizable]
    layers[-1] = LayerPlan(s.quantizable[-1], head, 32)
    slot = s.adapter_slots[-1]
    adapters = (AdapterPlan(slot.name, 4, "lora"),) if lora else ()
    return apply(m, Candidate(layers=tuple(layers), adapters=adapters))


def _avx2(db: Path) -> HardwareProfile:
    """The AVX2 profile, 1 core, its first input, a tuning database in ``db``."""
    p = load_profile(ROOT / "hw_profiles" / "x86-avx2-2core.yaml")
    return replace(p, cores=1, inputs=p.inputs[:1], tuning=replace(p.tuning, database_dir=str(db)))


def _x(frames: int) -> torch.Tensor:
    return torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(1))


def _unpack4(p: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    lo, hi = (p & 15).astype(np.int16) - 8, (p >> 4).astype(np.int16) - 8
    flat = np.stack([lo, hi], axis=2).reshape(p.shape[0], -1)
    return flat[:, : int(np.prod(shape[1:]))].reshape(shape)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_weight_only_convs_become_packed_ops_that_compute_the_same(bits: int) -> None:
    q = _weight_only(bits)
    names = list(packed_convs(q))
    assert len(names) == len(q.structure().quantizable) - 1  # all but the float head
    assert int8_layers(q) == {}
    d = _Deploy(q)
    assert d.packed_layers == names
    for n in names:
        mod = d.model.get_submodule(n)
        assert isinstance(mod, WConv1d)
        assert mod.weight.dtype == (torch.float16 if bits == 16 else torch.int8)
        if bits == 4:
            assert int(mod.weight.abs().max()) == 7  # the grid's largest value is qmax
    with torch.no_grad():
        ref = q(_x(64), torch.tensor([64]))[0].numpy()
        np.testing.assert_allclose(d(_x(64)).numpy(), ref, rtol=1e-5, atol=1e-5)
    assert lowering_of(q) == f"{len(names)} w{bits} layers packed, unpacked in the kernel"


def test_lora_targets_keep_float_weights_and_say_so() -> None:
    q = _weight_only(8, lora=True)
    lora = q.structure().adapter_slots[-1].lora_target
    assert lora not in packed_convs(q)  # its hook reads the float layer
    assert len(packed_convs(q)) == len(q.structure().quantizable) - 2
    assert lowering_of(q).endswith("; w8 layers run dequantized in float32")


def test_off_grid_weights_are_refused_naming_the_layer() -> None:
    q = _weight_only(4)
    with torch.no_grad():
        q.get_submodule("blocks.1.conv2").weight.add_(1e-3)
    with pytest.raises(ModelError, match=r"blocks\.1\.conv2: weights are not on the 4-bit grid"):
        _Deploy(q)


def test_4bit_packing_is_two_values_per_byte_and_round_trips() -> None:
    from voxfit.compile._import import pack_weight

    rng = np.random.default_rng(0)
    for shape in ((6, 5, 3), (4, 8, 1)):  # odd and even C*K
        w = rng.integers(-7, 8, size=shape).astype(np.int8)
        p = pack_weight(w, 4)
        assert p.dtype == np.uint8
        assert p.shape == (shape[0], math.ceil(shape[1] * shape[2] / 2))
        np.testing.assert_array_equal(_unpack4(p, shape), w)


@pytest.mark.tvm
@pytest.mark.slow
def test_packed_library_computes_the_fake_quantized_model_and_is_smaller(tmp_path: Path) -> None:
    p = _avx2(tmp_path)
    fp32, w4 = _weight_only(32), _weight_only(4, head=8)
    with TvmWorker(1) as w:
        (f,) = compile_model(fp32, p, w, tmp_path / "f", tune=False)
        (r,) = compile_model(w4, p, w, tmp_path / "q", tune=False)
        assert f.ok, f.error
        assert r.ok, r.error
        out = w.call("run_local", timeout_s=120, lib=str(r.lib), input=_x(r.frames).numpy())
    with torch.no_grad():
        ref = w4(_x(r.frames), torch.tensor([r.frames]))[0].numpy()
    # the same arithmetic up to float32 summation order (scale applied after the sum)
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)
    assert all("_w4" in t or "_w8" in t for t in r.task_names if "conv1d" in t)
    assert r.lowering.startswith(f"{len(packed_convs(w4))} w4/w8 layers packed")
    # every planned conv weight shrank from float32 to its packed bytes plus a float32 scale
    # per output channel; the rest of the library's constants are the same
    saved = 0
    for name, bits in packed_convs(w4).items():
        o, c, k = w4.get_submodule(name).weight.shape
        packed = o * math.ceil(c * k / 2) if bits == 4 else o * c * k
        saved += 4 * o * c * k - packed - 4 * o
    assert f.weight_bytes is not None
    assert r.weight_bytes is not None
    assert f.weight_bytes - r.weight_bytes == saved
    assert set(r.details["constant_bytes"]) == {"float32", "int8", "uint8"}
    assert r.lib is not None
    assert f.lib is not None
    # the file holds those constants plus kernel code, which differs: the tiny model's file
    # shrank by 80% of the saved bytes (measured 2026-12-03; its code dominates the file)
    assert r.lib.stat().st_size < f.lib.stat().st_size - saved / 2


@pytest.mark.tvm
@pytest.mark.slow
def test_4bit_weights_with_int8_compute_stay_packed_and_exact(tmp_path: Path) -> None:
    p = _avx2(tmp_path)
    m = tiny_tdnn()
    s = m.structure()
    layers = [LayerPlan(q, 4, 8) for q in s.quantizable[:-1]] + [LayerPlan(s.quantizable[-1])]
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randn(2, 64, 80, generator=g), torch.tensor([64, 64])) for _ in range(3)]
    q = apply(m, Candidate(layers=tuple(layers)), calibration=cal)
    with TvmWorker(1) as w:
        (r,) = compile_model(q, p, w, tmp_path / "q", tune=False)
        assert r.ok, r.error
        out = w.call("run_local", timeout_s=120, lib=str(r.lib), input=_x(r.frames).numpy())
    assert r.lowering.startswith(f"{len(layers) - 1} layers int8 compute")
    assert sum(1 for t in r.task_names if "conv1d_w4a8" in t) >= 1
    with torch.no_grad():
        ref = q(_x(r.frames), torch.tensor([r.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref, rtol=1e-4, atol=1e-4)
    # every 4-bit weight is half a byte in the library (no int8 weight constants left)
    shapes = [q.get_submodule(x.name).weight.shape for x in layers[:-1]]
    n4 = sum(o * math.ceil(c * k / 2) for o, c, k in shapes)
    assert r.details["constant_bytes"]["uint8"] == n4
    assert "int8" not in r.details["constant_bytes"]
