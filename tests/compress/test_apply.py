from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from voxfit.compress import apply, kept_channels, magnitude_scores, quantize_weight
from voxfit.errors import ConfigError
from voxfit.metrics import packed_size_bytes
from voxfit.models import (
    ResidualAdapter,
    build_model,
    count_parameters,
    default_config,
    group_size,
)
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan, plan_of

KINDS = ["tdnn", "conformer"]


def _model(kind: str, size: str = "tiny") -> nn.Module:
    torch.manual_seed(0)
    return build_model(default_config(kind, 12, size)).eval()  # type: ignore[arg-type]


def _x() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 61, 80, generator=g), torch.tensor([61, 45])


@pytest.mark.parametrize("kind", KINDS)
def test_identity_plan_reproduces_the_base_model(kind: str) -> None:
    m = _model(kind)
    s = m.structure()
    c = Candidate(
        groups=tuple(GroupPlan(g.name, 1.0) for g in s.groups),
        layers=tuple(LayerPlan(q, 32, 32) for q in s.quantizable),
    )
    x, lens = _x()
    torch.testing.assert_close(apply(m, c)(x, lens)[0], m(x, lens)[0])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    ratios=st.lists(st.sampled_from([0.25, 0.5, 0.75, 1.0]), min_size=8, max_size=8),
    bits=st.sampled_from([4, 8, 16, 32]),
    multiple=st.sampled_from([1, 4, 8]),
)
def test_pruned_models_keep_io_shapes_and_shrink(
    kind: str, ratios: list[float], bits: int, multiple: int
) -> None:
    m = _model(kind)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    s = m.structure()
    c = Candidate(
        groups=tuple(GroupPlan(g.name, r) for g, r in zip(s.groups, ratios, strict=False)),
        layers=tuple(LayerPlan(q, bits) for q in s.quantizable),
    )
    out = apply(m, c, channel_multiple=multiple)
    x, lens = _x()
    y, _ = out(x, lens)
    assert y.shape == m(x, lens)[0].shape
    assert torch.isfinite(y).all()
    if any(r < 1 for r in ratios[: len(s.groups)]):
        assert count_parameters(out) < count_parameters(m)
    for g in out.structure().groups:
        n = group_size(out, g)
        assert n % multiple == 0 or n == group_size(m, s.group(g.name)) or g.unit > 1
    for k, v in m.state_dict().items():  # the input model is never changed
        assert torch.equal(v, before[k]), k
    assert plan_of(out) == c


def test_magnitude_pruning_drops_the_weakest_channels_first() -> None:
    m = _model("tdnn")
    g = m.structure().group("blocks.0.hidden")
    with torch.no_grad():
        m.blocks[0].conv1.weight[[1, 5, 7]] *= 1e-4
        m.blocks[0].conv2.weight[:, [1, 5, 7]] *= 1e-4
    scores = magnitude_scores(m, g)
    assert set(torch.topk(-scores, 3).indices.tolist()) == {1, 5, 7}
    n = group_size(m, g)
    out = apply(m, Candidate(groups=(GroupPlan(g.name, (n - 3) / n),)))
    kept = out.blocks[0].conv1.weight
    assert kept.shape[0] == n - 3
    assert kept.abs().amax(dim=(1, 2)).min() > 1e-3  # none of the weak ones survived


@pytest.mark.parametrize(
    ("size", "unit", "ratio", "multiple", "expected"),
    [
        (256, 1, 0.5, 8, 128),
        (256, 1, 0.3, 8, 80),
        (256, 1, 0.01, 8, 8),
        (256, 1, 1.0, 8, 256),
        (144, 36, 0.5, 8, 72),
        (144, 36, 0.1, 8, 36),
        (6, 1, 0.5, 8, 6),
        (100, 1, 0.37, 1, 37),
    ],
)
def test_kept_channels_rounding(
    size: int, unit: int, ratio: float, multiple: int, expected: int
) -> None:
    assert kept_channels(size, unit, ratio, multiple) == expected


def test_quantize_weight_grid_and_error_bound() -> None:
    w = torch.randn(16, 8, 3)
    for bits in (4, 8):
        q = quantize_weight(w, bits)
        qmax = 2 ** (bits - 1) - 1
        scale = w.reshape(16, -1).abs().amax(1) / qmax
        err = (q - w).reshape(16, -1).abs().amax(1)
        assert bool((err <= scale / 2 + 1e-6).all())
        for row in q.reshape(16, -1):
            assert row.unique().numel() <= 2 * qmax + 1
    assert torch.equal(quantize_weight(w, 16), w.half().float())
    assert torch.equal(quantize_weight(w, 32), w)


def test_int8_compute_weights_cannot_saturate_a_u8_s8_pair_and_keep_their_grid() -> None:
    # heavy-tailed rows: many pairs of large same-signed weights
    w = torch.randn(32, 9, 3) * torch.rand(32, 9, 3) ** 4 * 3
    w[:, 0:2, 0] = 100.0  # two equal row maxima side by side
    plain, safe = quantize_weight(w, 8), quantize_weight(w, 8, pair_safe=True)
    scale = w.reshape(32, -1).abs().amax(1) / 127
    q = torch.round(safe / scale[:, None, None])
    qp = torch.round(plain / scale[:, None, None])
    assert torch.equal(q * scale[:, None, None], safe)  # still on the plain grid
    assert torch.equal(q.reshape(32, -1).abs().amax(1), qp.reshape(32, -1).abs().amax(1))
    a, b = q[:, 0:8:2], q[:, 1:9:2]  # channel 8 has no partner: unchanged
    worst = (255 * (a.clamp(min=0) + b.clamp(min=0))).maximum(
        255 * (a.clamp(max=0) + b.clamp(max=0)).abs()
    )
    assert int(worst.max()) <= 32767
    assert int((255 * (qp[:, 0:8:2].abs() + qp[:, 1:9:2].abs())).max()) > 32767  # it was needed
    changed = q != qp
    assert 0 < int(changed.sum()) < q.numel() // 10
    assert torch.equal(q[:, 8], qp[:, 8])
    assert torch.equal(q[:, 0:2, 0], torch.tensor([[1.0, 127.0]]).expand(32, 2))  # tie: first
    # apply(pair_safe_int8=True): only convs that compute in int8 (8-bit weights and
    # activations) get it; by default none
    m = _model("tdnn")
    s = m.structure()
    name = s.quantizable[1]
    src = m.get_submodule(name).weight.detach()
    for plan, pair_safe, expected in [
        (LayerPlan(name, 8, 8), True, quantize_weight(src, 8, True)),
        (LayerPlan(name, 8, 8), False, quantize_weight(src, 8)),
        (LayerPlan(name, 8, 32), True, quantize_weight(src, 8)),
    ]:
        c = apply(m, Candidate(layers=(plan,)), calibration=[_x()], pair_safe_int8=pair_safe)
        assert torch.equal(c.get_submodule(name).weight, expected)


def test_four_bit_weights_pack_to_a_sixth_of_fp32() -> None:
    m = _model("tdnn", "default")
    s = m.structure()
    c4 = apply(m, Candidate(layers=tuple(LayerPlan(q, 4) for q in s.quantizable)))
    assert packed_size_bytes(m) >= 4 * count_parameters(m)
    assert packed_size_bytes(c4) <= packed_size_bytes(m) / 6


def test_adapters_are_inserted_full_precision_and_counted() -> None:
    m = _model("tdnn")
    s = m.structure()
    c = Candidate(
        layers=tuple(LayerPlan(q, 4) for q in s.quantizable),
        adapters=(AdapterPlan(s.adapter_slots[0].name, 8),),
    )
    out = apply(m, c)
    adapters = [mod for mod in out.modules() if isinstance(mod, ResidualAdapter)]
    assert len(adapters) == 1
    extra = sum(p.numel() for p in adapters[0].parameters())
    base = apply(m, Candidate(layers=c.layers))
    assert packed_size_bytes(out) - packed_size_bytes(base) == 4 * extra


def test_activation_quantization_needs_and_uses_calibration() -> None:
    m = _model("tdnn")
    s = m.structure()
    c = Candidate(layers=tuple(LayerPlan(q, 32, 8) for q in s.quantizable))
    with pytest.raises(ConfigError, match="8-bit activations need calibration"):
        apply(m, c)
    x, lens = _x()
    out = apply(m, c, calibration=[(x, lens)])
    diff = (out(x, lens)[0] - m(x, lens)[0]).abs().max()
    assert 0 < diff < 0.5  # rounded, but close


@pytest.mark.parametrize(
    ("cand", "message"),
    [
        (Candidate(layers=(LayerPlan("blocks.7.conv1", 8),)), r"layers\.blocks\.7\.conv1: not a"),
        (Candidate(groups=(GroupPlan("nope", 0.5),)), r"groups\.nope: not a group"),
        (Candidate(adapters=(AdapterPlan("blocks.9", 4),)), r"adapters\.blocks\.9: not a"),
        (
            Candidate(groups=(GroupPlan("stream", 0.5),), importance="adaptation"),
            "needs saliency scores",
        ),
    ],
)
def test_bad_plans_are_rejected_naming_the_field(cand: Candidate, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply(_model("tdnn"), cand)


@pytest.mark.parametrize("kind", KINDS)
def test_int8_pair_saturation_changes_only_the_int8_convs_and_never_an_export(kind: str) -> None:
    from voxfit.compress import fake_quant_off

    base = _model(kind)
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv1d)]
    layers = base.structure().quantizable
    plan = Candidate(layers=tuple(LayerPlan(q, 8, 8) for q in layers if q in convs))
    assert plan.layers
    g = torch.Generator().manual_seed(5)
    calib = [(torch.randn(2, 80, 80, generator=g), torch.tensor([80, 70])) for _ in range(2)]
    plain = apply(base, plan, calibration=calib)
    sat = apply(base, plan, calibration=calib, int8_pair_saturation=True)
    hooked = [n for n, m in sat.named_modules() if getattr(m, "int8_pair_saturation", False)]
    assert sorted(hooked) == sorted(x.name for x in plan.layers)
    x, lens = _x()
    x = x * 4  # activations spread over the grid: pairs near 255 x 127 saturate
    with torch.no_grad():
        a, b = plain(x, lens)[0], sat(x, lens)[0]
        assert not torch.equal(a, b)  # saturation reached
        assert torch.isfinite(b).all()
        with fake_quant_off(plain), fake_quant_off(sat):  # what exporters see: no hook
            torch.testing.assert_close(plain(x, lens)[0], sat(x, lens)[0], rtol=0, atol=0)
    # weight-only int8 and float convs are left alone
    w8 = Candidate(layers=tuple(LayerPlan(q, 8, 32) for q in layers if q in convs))
    m = apply(base, w8, int8_pair_saturation=True)
    assert not any(getattr(mod, "int8_pair_saturation", False) for mod in m.modules())
