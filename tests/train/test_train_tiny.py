"""A tiny end-to-end run: corpus -> features -> CTC training -> checkpoint -> adaptation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from voxfit.data import FeatureStore, Manifest, PhoneInventory, batches, collate
from voxfit.errors import ModelError
from voxfit.models import build_model, count_parameters, default_config
from voxfit.train import (
    AdaptConfig,
    adapt_preset,
    adapt_speaker,
    ctc_loss,
    evaluate_cached,
    load_checkpoint,
    train_base,
    train_cached,
    train_preset,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_training_loss_falls(
    kind: str, tiny_manifest: Manifest, tiny_store: FeatureStore, tiny_inventory: PhoneInventory
) -> None:
    torch.manual_seed(0)
    model = build_model(default_config(kind, tiny_inventory.size, "tiny"))
    hist = train_base(
        model,
        tiny_manifest.split("train"),
        tiny_store,
        tiny_inventory,
        replace(train_preset("tiny"), epochs=8),
    )
    assert len(hist.epoch_loss) == 8
    assert hist.epoch_loss[-1] < 0.6 * hist.epoch_loss[0], hist.epoch_loss
    assert not model.training  # left in eval mode


def test_adaptation_trains_only_adapters_and_lowers_loss(
    tiny_manifest: Manifest, tiny_store: FeatureStore, tiny_inventory: PhoneInventory
) -> None:
    torch.manual_seed(0)
    model = build_model(default_config("tdnn", tiny_inventory.size, "tiny"))
    train_base(
        model,
        tiny_manifest.split("train"),
        tiny_store,
        tiny_inventory,
        replace(train_preset("tiny"), epochs=3),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spk, utts = next(iter(tiny_manifest.by_speaker("adapt").items()))
    b = collate(next(batches(utts, 1e9)), tiny_store, tiny_inventory)
    loss0 = ctc_loss(model.eval(), b).item()
    adapted = adapt_speaker(
        model, utts, tiny_store, tiny_inventory, AdaptConfig(bottleneck=4, steps=30, lr=1e-2)
    )
    assert ctc_loss(adapted, b).item() < loss0
    for k, v in model.state_dict().items():  # the base model is untouched
        assert torch.equal(v, before[k]), k
    extra = count_parameters(adapted) - count_parameters(model)
    assert 0 < extra < 0.05 * count_parameters(model)


def test_cached_training_checkpoint_round_trip_and_report(
    tiny_manifest: Manifest, tiny_store: FeatureStore, tmp_path: Path
) -> None:
    cfg = replace(train_preset("tiny"), epochs=2)
    path = train_cached(tiny_manifest, tiny_store, "tdnn", "tiny", cfg, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert train_cached(tiny_manifest, tiny_store, "tdnn", "tiny", cfg, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not retrained
    ckpt = load_checkpoint(path)
    assert ckpt.meta["corpus_hash"]
    assert ckpt.meta["steps"] > 0
    x, lens = torch.randn(1, 50, 80), torch.tensor([50])
    again = load_checkpoint(path)
    torch.testing.assert_close(ckpt.model(x, lens)[0], again.model(x, lens)[0])
    report = evaluate_cached(ckpt, tiny_manifest, tiny_store, adapt_preset("tiny"))
    assert report.n_heldout_speakers == len(tiny_manifest.speakers("eval"))
    assert report.dev_per >= 0
    mean_before = sum(r.per_before for r in report.speakers) / len(report.speakers)
    assert report.heldout_per_before == pytest.approx(mean_before)
    assert 0 < report.adapter_param_fraction < 0.05
    assert [r.speaker for r in report.speakers] == tiny_manifest.speakers("eval")
    cached = evaluate_cached(ckpt, tiny_manifest, tiny_store, adapt_preset("tiny"))
    assert cached == report


def test_corrupt_checkpoint_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(ModelError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
