"""The model contract, run over both families and a model defined only in the tests the way
a user writes one (``tests/_user_model.py``, named by its factory): structure declared and
valid, every group prunes consistently, adapters insert as identity, ONNX and TVM export
compute what torch computes; a factory that breaks the contract fails in one line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from voxfit.compress import apply, export_onnx, ort_session
from voxfit.errors import ConfigError, ModelError
from voxfit.models import build_named, config_for, group_size, n_mels_of, validate_structure
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["tdnn", "conformer", "tests._user_model:build"]


def _model(ref: str) -> nn.Module:
    torch.manual_seed(0)
    m = build_named(ref, 12, "tiny").eval()
    for mod in m.modules():  # non-trivial statistics: a dropped BatchNorm would show
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _x(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 64, n_mels_of(m), generator=g), torch.tensor([64, 51])


@pytest.mark.parametrize("ref", MODELS)
def test_the_structure_is_declared_and_every_group_prunes_consistently(ref: str) -> None:
    m = _model(ref)
    s = m.structure()  # type: ignore[operator]
    validate_structure(m, s)
    assert s.groups
    assert s.quantizable
    assert s.adapter_slots
    assert n_mels_of(m) == (40 if ":" in ref else 80)  # the user's model takes 40 bins
    x, n = _x(m)
    y, out_n = m(x, n)
    assert y.shape[:2] == (2, int(out_n[0]))
    for g in s.groups:
        size = group_size(m, g)
        if size // g.unit < 2:
            continue
        p = apply(m, Candidate(groups=(GroupPlan(g.name, 0.5),)))
        validate_structure(p, p.structure())  # type: ignore[operator]
        assert group_size(p, p.structure().group(g.name)) == size // 2  # type: ignore[operator]
        yp, np_ = p(x, n)
        assert yp.shape == y.shape, g.name
        assert torch.equal(np_, out_n)
        assert torch.isfinite(yp).all()


@pytest.mark.parametrize("ref", MODELS)
@pytest.mark.parametrize("kind", ["residual", "lora"])
def test_adapters_insert_as_identity(ref: str, kind: str) -> None:
    m = _model(ref)
    slots = [a.name for a in m.structure().adapter_slots]  # type: ignore[operator]
    plan = Candidate(adapters=tuple(AdapterPlan(s, 8, kind) for s in slots))  # type: ignore[arg-type]
    a = apply(m, plan)
    x, n = _x(m)
    torch.testing.assert_close(a(x, n)[0], m(x, n)[0])
    assert sum(p.numel() for p in a.parameters()) > sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("ref", MODELS)
def test_onnx_export_computes_the_plan(ref: str, tmp_path: Path) -> None:
    m = _model(ref)
    s = m.structure()  # type: ignore[operator]
    plan = Candidate(
        groups=(GroupPlan(s.groups[-1].name, 0.5),),
        layers=tuple(LayerPlan(q, 8) for q in s.quantizable),
    )
    q = apply(m, plan)
    out = export_onnx(q, tmp_path / "m.onnx")
    assert len(out.int8_layers) == len(s.quantizable)
    x, n = _x(m)
    got = ort_session(out.path).run(None, {"feats": x.numpy(), "lengths": n.numpy()})[0]
    np.testing.assert_allclose(got, q(x, n)[0].detach().numpy(), atol=2e-4, rtol=1e-3)


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("ref", MODELS)
def test_tvm_compiles_and_runs_the_plan(ref: str, tmp_path: Path) -> None:
    from voxfit.compile import TvmWorker, compile_model
    from voxfit.hw_profiles import load_profile

    p = load_profile(ROOT / "hw_profiles" / "x86-avx2-2core.yaml")
    p = replace(
        p, cores=1, inputs=p.inputs[:1], tuning=replace(p.tuning, database_dir=str(tmp_path))
    )
    m = _model(ref)
    s = m.structure()  # type: ignore[operator]
    q = apply(m, Candidate(groups=(GroupPlan(s.groups[-1].name, 0.5),)))
    with TvmWorker(1) as w:
        (c,) = compile_model(q, p, w, tmp_path / "b", tune=False)
        assert c.ok, c.error
        x = torch.randn(1, c.frames, n_mels_of(q), generator=torch.Generator().manual_seed(1))
        out = w.call("run_local", timeout_s=120, lib=str(c.lib), input=x.numpy())
    with torch.no_grad():
        ref_out = q(x, torch.tensor([c.frames]))[0].numpy()
    np.testing.assert_allclose(out["output"], ref_out, rtol=1e-4, atol=1e-4)


def test_a_factory_that_breaks_the_contract_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the user's folder: factories are imported from here first
    (tmp_path / "broken.py").write_text(
        "from torch import nn\n"
        "def plain(n_outputs, size):\n    return nn.Linear(80, n_outputs)\n"
        "def no_args():\n    return None\n"
    )
    with pytest.raises(ModelError, match="broken:plain: returned Linear, not a torch module"):
        build_named("broken:plain", 5)
    with pytest.raises(ConfigError, match=r"must accept \(n_outputs=, size=\)"):
        build_named("broken:no_args", 5)
    with pytest.raises(ConfigError, match="broken has no function missing"):
        build_named("broken:missing", 5)
    with pytest.raises(ConfigError, match="cannot import nosuchmodule"):
        build_named("nosuchmodule:build", 5)
    with pytest.raises(ConfigError, match="neither a model family"):
        config_for("rnn", 5, "tiny")
