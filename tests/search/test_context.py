"""SearchContext.with_checkpoint: another model of the same corpus (the elastic supernet of a
search's base) replaces the base without re-making corpus, features or calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from voxfit.data import PhoneInventory
from voxfit.errors import ConfigError
from voxfit.models import build_model, default_config
from voxfit.search import SearchContext
from voxfit.train import AdaptConfig, ProxyConfig, save_checkpoint

INV = PhoneInventory(("<blank>", "a", "b"))


def _checkpoint(path: Path, inv: PhoneInventory, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = default_config("tdnn", inv.size, "tiny")
    save_checkpoint(path, build_model(cfg), cfg, inv, {})
    return path


def test_with_checkpoint_swaps_the_model_and_keeps_the_rest(tmp_path: Path) -> None:
    first = _checkpoint(tmp_path / "a.pt", INV, 0)
    other = _checkpoint(tmp_path / "b.pt", INV, 1)
    calib = [(torch.zeros(1, 10, 80), torch.tensor([10]))]
    from voxfit.train import load_checkpoint

    ctx = SearchContext(
        manifest=object(),  # type: ignore[arg-type]
        store=object(),  # type: ignore[arg-type]
        inventory=INV,
        base=load_checkpoint(first).model,
        checkpoint=first,
        adapt=AdaptConfig(),
        proxy=ProxyConfig(),
        preset="tiny",
        calibration=calib,
        _saliency={"x": torch.zeros(1)},
    )
    swapped = ctx.with_checkpoint(other)
    assert swapped.checkpoint == other
    assert ctx.checkpoint == first
    assert swapped.manifest is ctx.manifest
    assert swapped.store is ctx.store
    assert swapped.calibration is calib
    assert swapped._saliency is None  # saliency belongs to a model: recomputed for the new one
    w_new = next(iter(swapped.base.state_dict().values()))
    w_old = next(iter(ctx.base.state_dict().values()))
    assert not torch.equal(w_new, w_old)
    assert not swapped.base.training

    alien = _checkpoint(tmp_path / "c.pt", PhoneInventory(("<blank>", "x")), 0)
    with pytest.raises(ConfigError, match=r"c\.pt: its phone inventory differs"):
        ctx.with_checkpoint(alien)
