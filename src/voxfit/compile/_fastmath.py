"""``exp`` on CPU targets as vector arithmetic, not one libm call per element.

TVM lowers ``exp`` for LLVM targets to the ``llvm.exp`` intrinsic, which LLVM expands to one
scalar ``expf`` call per lane: a vectorized SiLU or softmax runs at libm's speed (measured on
the Conformer: the SiLU after an FFN's int8 first layer took as long as the layer itself).
:func:`register` replaces that lowering for ``float32`` with the classic range reduction
``exp(x) = 2^n * exp(f)``, ``n = round(x / ln 2)``, ``|f| <= ln 2 / 2``, a degree-7
polynomial for ``exp(f)`` and ``2^n`` built in the exponent bits: plain multiply-adds that
vectorize like the code around them (Cephes' ``expf``; relative error below 1e-7 from
-87 to 88, inputs clamped to +-88.38).

It is a lowering rule, applied when TIR becomes machine code, so the Relax graph, the
tuning workloads and their database keys are the same with or without it. Every process
that builds code registers it: the TVM worker and the tuner's builder processes.
"""

from __future__ import annotations

from typing import Any

_LEVEL = 99  # above TVM's own llvm rule (level 10), so this one is used
_registered = False

# exp(f) ~ 1 + f + f^2 (c5 + f (c4 + f (c3 + f (c2 + f (c1 + f c0))))) on |f| <= ln2 / 2
_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
_HI, _LO = 88.3762626647950, -88.3762626647949
_LOG2E = 1.44269504088896341
# ln 2 in two parts (Cody-Waite): n * _LN2_HI is exact in float32 for |n| <= 128, so the
# reduced argument keeps its precision (one float32 ln 2 costs 4e-6 relative at |x| ~ 80)
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4


def fast_exp(x: Any) -> Any:
    """``exp`` of a float32 TIR expression (scalar or vector) as arithmetic."""
    from tvm import tirx

    dtype = x.ty.dtype
    lanes = int(dtype.lanes)
    ints = "int32" if lanes == 1 else f"int32x{lanes}"

    def c(v: float, kind: str = "float32") -> Any:
        k = tirx.const(v, kind)
        return k if lanes == 1 else tirx.Broadcast(k, lanes)

    xc = tirx.max(tirx.min(x, c(_HI)), c(_LO))
    n = tirx.floor(xc * c(_LOG2E) + c(0.5))
    f = xc - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_POLY[0])
    for k in _POLY[1:]:
        p = p * f + c(k)
    y = p * f * f + f + c(1.0)
    biased = tirx.Cast(ints, n + c(127.0))
    two_n = tirx.reinterpret(dtype, tirx.shift_left(biased, c(23, "int32")))
    return two_n * y


def _lower_exp(call: Any) -> Any:
    x = call.args[0]
    dtype = x.ty.dtype
    if dtype.type_code != 2 or int(dtype.bits) != 32:  # float32 only; others keep libm
        return call
    return fast_exp(x)


def register() -> None:
    """Install the rule for LLVM targets in this process (idempotent)."""
    global _registered
    if _registered:
        return
    from tvm.tirx.op import register_intrin_lowering

    register_intrin_lowering("tirx.exp", "llvm", f=_lower_exp, level=_LEVEL)
    _registered = True
