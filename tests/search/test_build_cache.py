"""SearchContext.build caches distilled candidates so export/re-measurement skip distillation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from voxfit.compress import Recovery
from voxfit.data import FeatureStore, Manifest, PhoneInventory
from voxfit.models import build_model, default_config
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan
from voxfit.search import SearchContext
from voxfit.train import AdaptConfig, ProxyConfig

pytestmark = pytest.mark.slow


def _ctx(
    manifest: Manifest, store: FeatureStore, inv: PhoneInventory, builds: Path
) -> SearchContext:
    torch.manual_seed(0)
    base = build_model(default_config("tdnn", inv.size, "tiny")).eval()
    ckpt = builds.parent / "checkpoint.pt"
    ckpt.write_bytes(b"stand-in: the cache key uses its path and mtime")
    return SearchContext(
        manifest=manifest,
        store=store,
        inventory=inv,
        base=base,
        checkpoint=ckpt,
        adapt=AdaptConfig(),
        proxy=ProxyConfig(),
        preset="tiny",
        recovery=Recovery(manifest.split("train"), store, inv, lr=5e-3),
        builds=builds,
    )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_distilled_build_is_cached_and_reloaded_exactly(
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = _ctx(tiny_manifest, tiny_store, tiny_inventory, tmp_path / "builds")
    groups = tuple(GroupPlan(g.name, 0.5) for g in ctx.base.structure().groups)
    cand = Candidate(
        groups=groups,
        layers=(LayerPlan("head", 8),),
        adapters=(AdapterPlan("blocks.0", 4),),
        recovery_steps=4,
    )
    first = ctx.build(cand, 4, seed=7)
    (cached,) = (tmp_path / "builds").glob("*.pt")
    assert not list((tmp_path / "builds").glob("*.partial"))
    undistilled = _state(
        ctx.build(Candidate(groups=groups, layers=cand.layers, adapters=cand.adapters), 4, seed=7)
    )
    ref = _state(first)
    assert any(not torch.equal(ref[k], undistilled[k]) for k in ref)  # distillation changed it

    import voxfit.compress._distill as distill_mod

    def no_distill(*a: object, **k: object) -> None:
        raise AssertionError("distillation ran although the build was cached")

    monkeypatch.setattr(distill_mod, "distill", no_distill)
    monkeypatch.setattr("voxfit.compress._apply.distill", no_distill)
    again = ctx.build(cand, 4, seed=7)
    assert not again.training
    assert all(torch.equal(ref[k], v) for k, v in _state(again).items())
    x = torch.randn(1, 50, 80)
    lens = torch.tensor([50])
    with torch.no_grad():
        assert torch.equal(first(x, lens)[0], again(x, lens)[0])

    # another seed or plan is another cache entry (and distills again)
    monkeypatch.undo()
    ctx.build(cand, 4, seed=8)
    assert len(list((tmp_path / "builds").glob("*.pt"))) == 2

    # a damaged cache file is ignored (with a warning) and rebuilt
    cached.write_bytes(b"not a state dict")
    with caplog.at_level(logging.WARNING):
        rebuilt = ctx.build(cand, 4, seed=7)
    assert "build cache" in caplog.text
    assert all(torch.equal(ref[k], v) for k, v in _state(rebuilt).items())


def test_candidates_without_recovery_are_not_cached(
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
    tmp_path: Path,
) -> None:
    ctx = _ctx(tiny_manifest, tiny_store, tiny_inventory, tmp_path / "builds")
    ctx.build(Candidate(layers=(LayerPlan("head", 8),)), 4, seed=0)
    assert not (tmp_path / "builds").exists()
