"""The deploy graph's attention op (``voxfit::attention``) and the Conformer without masks."""

from __future__ import annotations

import pytest
import torch

from voxfit.models import attention, build_model, default_config


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_the_attention_op_is_split_heads_attention(heads: int) -> None:
    g = torch.Generator().manual_seed(heads)
    q, k, v = (torch.randn(2, 7, heads * 4, generator=g) for _ in range(3))
    got = attention(q, k, v, heads)

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.view(2, 7, heads, 4).transpose(1, 2)

    logits = split(q) @ split(k).transpose(-1, -2) / 2.0  # sqrt(head_dim 4)
    want = (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(2, 7, heads * 4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a head is its own softmax: changing head 0's keys leaves the other heads' outputs
    k2 = k.clone()
    k2[..., :4] *= 3.0  # (adding a constant to every key would not: softmax ignores it)
    if heads > 1:
        torch.testing.assert_close(attention(q, k2, v, heads)[..., 4:], got[..., 4:])
    assert not torch.allclose(attention(q, k2, v, heads)[..., :4], got[..., :4])


def test_the_conformer_without_lengths_is_the_conformer_at_full_length() -> None:
    torch.manual_seed(0)
    m = build_model(default_config("conformer", 12, "tiny")).eval()
    assert m.lengths_optional
    x = torch.randn(2, 30, 80)
    with torch.no_grad():
        full, lens = m(x, torch.tensor([30, 30]))
        free, lens_free = m(x, None)
        short, _ = m(x, torch.tensor([30, 20]))  # padding is still masked
    torch.testing.assert_close(free, full, rtol=1e-5, atol=1e-5)
    assert lens_free.tolist() == lens.tolist() == [15, 15]
    torch.testing.assert_close(short[0], full[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(short[1], full[1], atol=1e-3)


def test_the_deploy_graph_has_the_op_and_no_mask() -> None:
    torch.manual_seed(0)
    m = build_model(default_config("conformer", 12, "tiny")).eval()
    from voxfit.compile._compile import _Deploy

    with torch.no_grad():
        ep = torch.export.export(_Deploy(m), (torch.zeros(1, 20, 80),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("voxfit.attention" in t for t in targets) == len(m.blocks)
    assert not any("scaled_dot_product" in t or "masked_fill" in t for t in targets)
