"""Adaptation measurement, proxy, saliency and sensitivity on the tiny corpus."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from voxfit.compress import (
    SensitivityConfig,
    adaptation_saliency,
    apply,
    save_sensitivity,
    sensitivity,
)
from voxfit.data import FeatureStore, Manifest, PhoneInventory
from voxfit.models import build_model, default_config, group_size
from voxfit.plan import AdapterPlan, Candidate, GroupPlan
from voxfit.train import (
    AdaptConfig,
    ProxyConfig,
    adaptation_proxy,
    measure_adaptation,
    proxy_speakers,
    train_base,
    train_preset,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(
    tiny_manifest: Manifest, tiny_store: FeatureStore, tiny_inventory: PhoneInventory
) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(default_config("tdnn", tiny_inventory.size, "tiny"))
    train_base(
        m,
        tiny_manifest.split("train"),
        tiny_store,
        tiny_inventory,
        replace(train_preset("tiny"), epochs=4),
    )
    return m


CFG = AdaptConfig(bottleneck=4, steps=8, lr=1e-2, max_batch_s=10.0)


def test_plan_without_adapters_cannot_adapt(
    base: nn.Module,
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
) -> None:
    res = measure_adaptation(base, tiny_manifest, tiny_store, tiny_inventory, CFG, slots=[])
    assert [s.speaker for s in res.speakers] == tiny_manifest.speakers("eval")
    assert all(s.per_before == s.per_after for s in res.speakers)
    assert res.gain == 0.0


def test_measurement_trains_the_plans_adapters(
    base: nn.Module,
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
) -> None:
    slot = base.structure().adapter_slots[-1].name
    m = apply(base, Candidate(adapters=(AdapterPlan(slot, 4),)))
    res = measure_adaptation(m, tiny_manifest, tiny_store, tiny_inventory, CFG, slots=[])
    assert any(s.per_before != s.per_after for s in res.speakers)
    base_res = measure_adaptation(base, tiny_manifest, tiny_store, tiny_inventory, CFG)
    if base_res.gain > 0:
        assert res.retention(base_res) == pytest.approx(res.gain / base_res.gain)


def test_proxy_uses_fewer_speakers_and_utterances(
    base: nn.Module,
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
) -> None:
    px = adaptation_proxy(
        base,
        tiny_manifest,
        tiny_store,
        tiny_inventory,
        CFG,
        ProxyConfig(n_speakers=1, steps=3, max_eval_utts=2),
    )
    assert [s.speaker for s in px.speakers] == proxy_speakers(tiny_manifest, 1)
    assert len(px.speakers) == 1


def test_saliency_scores_every_channel_and_drives_adaptation_pruning(
    base: nn.Module,
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
) -> None:
    sal = adaptation_saliency(
        base, tiny_manifest.by_speaker("adapt"), tiny_store, tiny_inventory, CFG
    )
    s = base.structure()
    for g in s.groups:
        assert sal[g.name].shape == (group_size(base, g),)
        assert bool((sal[g.name] >= 0).all())
        assert float(sal[g.name].std()) > 0  # it discriminates between channels
    g = s.group("blocks.0.hidden")
    keep = 0.5
    m = apply(
        base, Candidate(groups=(GroupPlan(g.name, keep),), importance="adaptation"), saliency=sal
    )
    n = group_size(base, g)
    top = set(torch.topk(sal[g.name], n // 2).indices.tolist())
    kept_rows = m.blocks[0].conv1.weight.detach()
    orig = base.blocks[0].conv1.weight.detach()
    kept = {i for i in range(n) for r in kept_rows if torch.equal(orig[i], r)}
    assert kept == top


def test_sensitivity_table_and_heatmap(
    base: nn.Module,
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
    tmp_path: Path,
) -> None:
    cfg = SensitivityConfig(keep_ratios=(0.5,), weight_bits=(4,), channel_multiple=4)
    table = sensitivity(
        base,
        tiny_manifest,
        tiny_store,
        tiny_inventory,
        CFG,
        cfg,
        ProxyConfig(n_speakers=1, steps=2, max_eval_utts=2),
    )
    s = base.structure()
    assert len(table) == len(s.groups) + len(s.quantizable)
    assert set(table["kind"]) == {"prune", "quantize"}
    assert table["dev_per_delta"].abs().sum() > 0  # compressing somewhere changes something
    csv, html = save_sensitivity(table, tmp_path)
    assert csv.read_text().startswith("name,kind,setting,dev_per")
    assert "plotly" in html.read_text()[:5000].lower()


def test_recovery_distills_a_pruned_model_toward_the_base(
    base: nn.Module,
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
) -> None:
    from voxfit.compress import Recovery, distill
    from voxfit.errors import ConfigError

    groups = tuple(GroupPlan(g.name, 0.5) for g in base.structure().groups)
    with pytest.raises(ConfigError, match="recovery_steps > 0 needs recovery data"):
        apply(base, Candidate(groups=groups, recovery_steps=5))
    rec = Recovery(tiny_manifest.split("train"), tiny_store, tiny_inventory, lr=2e-3)
    student = apply(base, Candidate(groups=groups))
    losses = distill(student, base, 40, rec)
    assert sum(losses[-5:]) < sum(losses[:5])
    recovered = apply(base, Candidate(groups=groups, recovery_steps=3), recovery=rec)
    assert not recovered.training


def test_distillation_reuses_the_teacher_outputs(
    base: nn.Module,
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
) -> None:
    """A second distillation from the same teacher (the next search trial) runs the teacher
    on no batch it has already seen, and trains exactly as if it had."""
    from voxfit.compress import Recovery, distill

    teacher = copy.deepcopy(base)  # a fresh module: no outputs cached by other tests
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    rec = Recovery(tiny_manifest.split("train"), tiny_store, tiny_inventory, lr=2e-3)
    groups = tuple(GroupPlan(g.name, 0.5) for g in base.structure().groups)

    def run(t: nn.Module) -> list[float]:
        torch.manual_seed(0)
        return distill(apply(base, Candidate(groups=groups)), t, 6, rec)

    first = run(teacher)
    n_first = len(calls)
    assert n_first > 0
    assert run(teacher) == first  # trains exactly as the first did
    assert len(calls) == n_first  # without running the teacher again
    fresh = copy.deepcopy(base)  # another teacher module does not share the first's outputs
    fresh_calls = []
    fresh.register_forward_hook(lambda *_: fresh_calls.append(1))
    assert run(fresh) == first
    assert len(fresh_calls) == n_first
