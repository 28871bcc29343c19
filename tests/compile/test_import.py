"""Importing a torch.export program into Relax: direct (fast) vs decomposed, same tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from voxfit.compile._compile import export_program
from voxfit.compress import fake_quant_off
from voxfit.hw_profiles import load_profile
from voxfit.models import build_model, default_config

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _run(mod, x: torch.Tensor) -> np.ndarray:  # type: ignore[no-untyped-def]
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target="llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    return (out if hasattr(out, "numpy") else out[0]).numpy()  # type: ignore[no-any-return]


def _workloads(mod) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from voxfit.compile._build import fuse
    from voxfit.compile._import import make_target

    target = make_target(load_profile(ROOT / "hw_profiles" / "x86-avx2-2core.yaml").to_dict())
    tasks = ms.relax_integration.extract_tasks(fuse(mod, target), target)
    return sorted((t.task_name, tvm_ffi.structural_hash(t.dispatched[0])) for t in tasks)


def _compressed(m: torch.nn.Module, adapters: bool) -> torch.nn.Module:
    from voxfit.compress import apply
    from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan

    s = m.structure()  # type: ignore[operator]
    cand = Candidate(
        groups=tuple(GroupPlan(g.name, 0.5) for g in s.groups),
        layers=tuple(LayerPlan(q, 8) for q in s.quantizable),
        adapters=tuple(AdapterPlan(a.name, 4) for a in s.adapter_slots) if adapters else (),
    )
    return apply(m, cand, channel_multiple=4)


@pytest.mark.parametrize(
    ("kind", "variant", "expected"),
    [
        ("tdnn", "base", ("direct", None)),
        ("tdnn", "pruned-w8", ("direct", None)),
        ("tdnn", "pruned-w8-adapters", ("decomposed", "linear layers fuse differently")),
        ("conformer", "base", ("decomposed", "linear layers fuse differently")),
    ],
)
def test_import_matches_torch_and_the_decomposed_tasks(
    kind: str, variant: str, expected: tuple[str, str | None], tmp_path: Path
) -> None:
    from voxfit.compile._import import load_program

    torch.manual_seed(0)
    m = build_model(default_config(kind, 12, "tiny")).eval()
    if variant != "base":  # the ops a search candidate adds
        m = _compressed(m, adapters=variant.endswith("adapters")).eval()
    path = str(export_program(m, 40, tmp_path / "p.pt2"))
    x = torch.randn(1, 40, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), fake_quant_off(m):
        ref = m(x, torch.tensor([40]))[0].numpy()
    fast, how, why, _ = load_program(path)
    slow, how_slow, _, _ = load_program(path, "decomposed")
    assert how_slow == "decomposed"
    assert how == expected[0]
    assert why is None if expected[1] is None else expected[1] in (why or "")
    np.testing.assert_allclose(_run(fast, x), ref, rtol=1e-4, atol=1e-5)
    if how != how_slow:
        np.testing.assert_allclose(_run(slow, x), ref, rtol=1e-4, atol=1e-5)
    # the tuning database is keyed by these workloads: both imports must agree
    assert _workloads(fast) == _workloads(slow)


def test_forcing_the_direct_import_raises_instead_of_falling_back(tmp_path: Path) -> None:
    from voxfit.compile._import import load_program

    m = build_model(default_config("conformer", 12, "tiny")).eval()
    m.lengths_optional = False  # type: ignore[misc]  # exported with its (boolean) masks
    path = str(export_program(m, 40, tmp_path / "c.pt2"))
    with pytest.raises(AssertionError):  # TVM's converter asserts against boolean masks
        load_program(path, "direct")


def test_the_conformers_attention_is_one_op_of_three_kernels(tmp_path: Path) -> None:
    """Exported for every frame valid, each attention layer is ``voxfit::attention``: scores
    and values read the projections in place (no split/merge copies, no mask), and the
    library computes what the masked torch model computes."""
    from voxfit.compile._import import load_program

    torch.manual_seed(0)
    m = build_model(default_config("conformer", 12, "tiny")).eval()
    x = torch.randn(1, 40, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x, torch.tensor([40]))[0].numpy()
    mod, _, _, _ = load_program(str(export_program(m, 40, tmp_path / "one.pt2")))
    np.testing.assert_allclose(_run(mod, x), ref, rtol=1e-4, atol=1e-5)
    names = [n for n, _ in _workloads(mod)]
    assert {"attn_scores", "attn_values"} <= set(names)
    m.lengths_optional = False  # type: ignore[misc]  # the split-heads graph, for comparison
    masked, _, _, _ = load_program(str(export_program(m, 40, tmp_path / "masked.pt2")))
    before = [n for n, _ in _workloads(masked)]
    assert not any("attn_" in n for n in before)
    # q, k and v each copied per head before: those copies are gone
    assert sum("broadcast_to" in n for n in names) <= sum("broadcast_to" in n for n in before) - 3
    assert len(names) < len(before)
