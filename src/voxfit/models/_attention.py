"""Multi-head self-attention over every frame as one op of the deploy graph.

``voxfit::attention`` takes the (batch, frames, heads x head_dim) projections as the Linear
layers make them and returns the heads' outputs in that layout. A model that is exported
without padding (the deploy graph: every frame valid) calls it instead of
``scaled_dot_product_attention`` on split heads, so TVM's importer sees one op, not torch's
decomposition (split and transpose copies of q, k and v, a batched matmul per product, a
mask that masks nothing, the heads merged back: 9 kernels per layer, measured as 15% of a
pruned int8 Conformer's time). In torch it computes exactly what the split-heads attention
does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_OP_NAME = "attention.default"  # how TVM's importer keys the op
#: the names of its two product kernels in a compiled library (scores, values), which the
#: cost model's kernel attribution counts like the matmuls they replace
ATTENTION_KERNELS = ("attn_scores", "attn_values")


def split_heads_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q_h k_h^T / sqrt(head_dim)) v_h for each head h of (B, T, heads*D) inputs
    (k and v: (B, S, heads*D)); ``mask`` (True = attend) and ``dropout_p`` as
    ``scaled_dot_product_attention`` takes them; returns (B, T, heads*D)."""
    b, t, c = q.shape
    d = c // heads

    def split(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(b, z.shape[1], heads, d).transpose(1, 2)

    y = F.scaled_dot_product_attention(
        split(q), split(k), split(v), attn_mask=mask, dropout_p=dropout_p
    )
    return y.transpose(1, 2).reshape(b, t, c)


@torch.library.custom_op("voxfit::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """:func:`split_heads_attention` without a mask, as one op of the deploy graph."""
    return split_heads_attention(q, k, v, heads)


@attention.register_fake
def _attention_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> torch.Tensor:
    return q.new_empty(q.shape)
