"""The structure declaration: every declared group really prunes together."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from voxfit.errors import ModelError
from voxfit.models import (
    ChannelGroup,
    ChannelMember,
    ModelStructure,
    build_model,
    count_parameters,
    default_config,
    group_size,
    prune_group,
    validate_structure,
)

KINDS = ["tdnn", "conformer"]


def _model(kind: str, size: str = "tiny") -> nn.Module:
    torch.manual_seed(0)
    m = build_model(default_config(kind, 12, size))  # type: ignore[arg-type]
    # Non-trivial BatchNorm statistics, so a wrongly sliced buffer shows in the outputs.
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 57, 80, generator=g), torch.tensor([57, 40])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", ["tiny", "default"])
def test_family_sizes_and_declaration_is_valid(kind: str, size: str) -> None:
    m = _model(kind, size)
    validate_structure(m, m.structure())
    n = count_parameters(m)
    if size == "default":
        assert 1_000_000 <= n <= 5_000_000
    s = m.structure()
    assert len(s.adapter_slots) == len(m.blocks)  # one slot per block
    assert all(isinstance(m.get_submodule(q), nn.Conv1d | nn.Linear) for q in s.quantizable)
    # every Conv1d/Linear of the backbone is declared quantizable
    layers = {n for n, mod in m.named_modules() if isinstance(mod, nn.Conv1d | nn.Linear)}
    assert layers == set(s.quantizable)


@pytest.mark.parametrize("kind", KINDS)
def test_pruning_each_group_keeps_io_shapes_and_removes_parameters(kind: str) -> None:
    x, lens = _inputs()
    base = _model(kind)
    y0, l0 = base(x, lens)
    for g in base.structure().groups:
        m = _model(kind)
        n = group_size(m, g)
        keep = list(range(0, n // 2)) if g.unit > 1 else list(range(0, n, 2))
        before = count_parameters(m)
        prune_group(m, g, keep)
        validate_structure(m, m.structure())
        assert group_size(m, m.structure().group(g.name)) == len(keep)
        y, out_lens = m(x, lens)
        assert y.shape == y0.shape, g.name
        assert torch.equal(out_lens, l0), g.name
        assert count_parameters(m) < before, g.name


def test_pruned_tdnn_hidden_group_equals_zeroing_those_channels() -> None:
    """Removing hidden channels must compute exactly what zeroing them computes."""
    x, lens = _inputs()
    m = _model("tdnn")
    n = group_size(m, m.structure().group("blocks.0.hidden"))
    keep = [i for i in range(n) if i % 3]
    removed = [i for i in range(n) if i % 3 == 0]

    def zero(_mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, removed, :] = -1e4  # relu(bn1(conv1)) of these channels becomes 0
        return out

    h = m.blocks[0].bn1.register_forward_hook(zero)
    expected, _ = m(x, lens)
    h.remove()
    prune_group(m, m.structure().group("blocks.0.hidden"), keep)
    got, _ = m(x, lens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pruned_conformer_ffn_and_heads_equal_zeroing_them() -> None:
    x, lens = _inputs()
    m = _model("conformer")
    ff = m.structure().group("blocks.1.ff1")
    heads = m.structure().group("blocks.0.attn.heads")
    n_ff = group_size(m, ff)
    keep_ff = list(range(1, n_ff, 2))
    hd = m.blocks[0].attn.head_dim
    keep_heads = list(range(hd, 2 * hd))  # keep head 1 of 2

    def zero_ff(_mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., [i for i in range(n_ff) if i not in keep_ff]] = 0.0  # silu(0) = 0
        return out

    def zero_head0(mod: nn.Linear, inp: tuple[torch.Tensor], _out: torch.Tensor) -> torch.Tensor:
        z = inp[0].clone()
        z[..., :hd] = 0.0  # head 0's attention output never reaches the projection
        return torch.nn.functional.linear(z, mod.weight, mod.bias)

    hs = [
        m.blocks[1].ff1.fc1.register_forward_hook(zero_ff),
        m.blocks[0].attn.o.register_forward_hook(zero_head0),
    ]
    expected, _ = m(x, lens)
    for h in hs:
        h.remove()
    prune_group(m, ff, keep_ff)
    prune_group(m, heads, keep_heads)
    got, _ = m(x, lens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_any_keep_set_keeps_shapes(data: st.DataObject, kind: str) -> None:
    x, lens = _inputs()
    m = _model(kind)
    for g in m.structure().groups:
        units = group_size(m, g) // g.unit
        chosen = data.draw(st.sets(st.integers(0, units - 1), min_size=1), label=g.name)
        prune_group(m, g, [u * g.unit + j for u in chosen for j in range(g.unit)])
    y, _ = m(x, lens)
    assert y.shape == (2, 29, 12)
    assert torch.isfinite(y).all()


def test_keep_everything_is_the_identity() -> None:
    x, lens = _inputs()
    m = _model("conformer")
    y0, _ = m(x, lens)
    for g in m.structure().groups:
        prune_group(m, g, range(group_size(m, g)))
    torch.testing.assert_close(m(x, lens)[0], y0)


def test_bad_keep_sets_are_rejected() -> None:
    m = _model("conformer")
    heads = m.structure().group("blocks.0.attn.heads")
    with pytest.raises(ModelError, match="keep whole units"):
        prune_group(m, heads, [0, 1])
    with pytest.raises(ModelError, match="cannot prune every channel"):
        prune_group(m, heads, [])
    with pytest.raises(ModelError, match=r"must be in \[0, "):
        prune_group(m, heads, [10_000])


def test_inconsistent_declaration_is_caught() -> None:
    m = _model("tdnn")
    good = m.structure()
    bad_group = ChannelGroup(
        "wrong", (ChannelMember("stem", "out"), ChannelMember("blocks.0.conv1", "out"))
    )
    with pytest.raises(ModelError, match="members disagree on channel count"):
        validate_structure(m, ModelStructure((bad_group,), (), ()))
    with pytest.raises(ModelError, match="does not have"):
        validate_structure(
            m, ModelStructure((ChannelGroup("g", (ChannelMember("nope", "out"),)),), (), ())
        )
    with pytest.raises(ModelError, match="not supported on BatchNorm1d"):
        validate_structure(
            m, ModelStructure((ChannelGroup("g", (ChannelMember("stem_bn", "out"),)),), (), ())
        )
    with pytest.raises(ModelError, match="unknown channel group 'x'"):
        good.group("x")


def test_declarations_are_the_torch_free_ones() -> None:
    # spaces resolve patterns against voxfit.structure without torch; models re-exports the
    # same classes, so a declaration built from either import is the same type
    import voxfit.models as models
    import voxfit.structure as structure

    for name in ("AdapterSlot", "ChannelGroup", "ChannelMember", "ModelStructure"):
        assert getattr(models, name) is getattr(structure, name)
