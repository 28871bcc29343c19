"""``voxfit::attention`` in TVM: two reductions that read the projections in place.

The scores and the weighted values are computed straight from the (B, T, heads*D) layout the
Linear layers write (head h is channels h*D..h*D+D-1), with the softmax between them: three
kernels per attention layer, no layout copies (torch's decomposition runs nine).
"""

from __future__ import annotations

from typing import Any

from tvm import te

from voxfit.models import ATTENTION_KERNELS

SCORES_TASK, VALUES_TASK = ATTENTION_KERNELS


def attention_scores(q: Any, k: Any, heads: int) -> Any:
    """(B, heads, T, S): q_h . k_h / sqrt(D) of (B, T, heads*D) and (B, S, heads*D)."""
    b, t, c = q.shape
    s = k.shape[1]
    d = int(c) // heads
    scale = 1.0 / float(d) ** 0.5
    r = te.reduce_axis((0, d), name="d")
    return te.compute(
        (b, heads, t, s),
        lambda n, h, i, j: te.sum(q[n, i, h * d + r] * scale * k[n, j, h * d + r], axis=r),
        name=SCORES_TASK,
    )


def attention_values(p: Any, v: Any, heads: int) -> Any:
    """(B, T, heads*D): each head's probabilities (B, heads, T, S) times its values of
    (B, S, heads*D), written in the merged-heads layout the output projection reads."""
    b, _, t, s = p.shape
    c = v.shape[2]
    d = int(c) // heads
    r = te.reduce_axis((0, s), name="s")
    return te.compute(
        (b, t, c),
        lambda n, i, ch: te.sum(p[n, ch // d, i, r] * v[n, r, ch], axis=r),
        name=VALUES_TASK,
    )
