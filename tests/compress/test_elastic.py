"""The elastic (once-for-all) model: importance ordering keeps the function, a sliced
candidate computes what masking its channels in the supernet computes, a tiny supernet
trains and its sub-networks work, checkpoints say they are elastic."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from voxfit.compress import (
    ElasticConfig,
    apply,
    elastic_widths,
    int8_layers_of_space,
    masked,
    subnet_forward,
    train_elastic,
    train_elastic_cached,
)
from voxfit.compress._elastic import (
    _input_widths,
    _int8_weight,
    elastic_groups,
    order_by_importance,
    prefix_widths,
)
from voxfit.data import FeatureStore, Manifest, PhoneInventory, batches, collate
from voxfit.errors import ConfigError
from voxfit.models import ELASTIC_ATTR, build_model, default_config
from voxfit.plan import Candidate, GroupPlan, LayerPlan
from voxfit.train import ctc_loss, load_checkpoint, train_cached, train_preset


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(default_config(kind, 12, "tiny")).eval()  # type: ignore[arg-type]
    for mod in m.modules():  # non-trivial statistics: a dropped or misordered BN shows
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _x() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 61, 80, generator=g), torch.tensor([61, 45])


def _widths(kind: str, model: nn.Module) -> dict[str, tuple[float, ...]]:
    names = [g.name for g in model.structure().groups]  # type: ignore[operator]
    if kind == "tdnn":  # hidden widths and the residual stream
        return {n: (0.25, 0.5, 1.0) for n in names}
    return {n: (0.5, 1.0) for n in names if n != "stream"}  # the stream has LayerNorms


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_a_sliced_candidate_computes_what_masking_the_supernet_computes(kind: str) -> None:
    model = _model(kind)
    x, lens = _x()
    with torch.no_grad():
        before = model(x, lens)[0]
    widths = _widths(kind, model)
    groups = elastic_groups(model, widths)
    order_by_importance(model, groups)
    with torch.no_grad():  # a permutation: the same function
        torch.testing.assert_close(model(x, lens)[0], before, rtol=1e-5, atol=1e-5)
    setattr(model, ELASTIC_ATTR, {n: list(r) for n, r in widths.items()})
    # mixed widths: the smallest in every other group
    ratios = {g.name: (min(widths[g.name]) if i % 2 else 1.0) for i, g in enumerate(groups)}
    plan = Candidate(groups=tuple(GroupPlan(n, r) for n, r in ratios.items()))
    sliced = apply(model, plan, channel_multiple=8, recalibrate=False)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())
    k = prefix_widths(model, groups, ratios, 8)
    with torch.no_grad(), masked(model, groups, k):
        want = model(x, lens)[0]
    with torch.no_grad():
        got = sliced(x, lens)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the hooks are gone after the block: the full model again
        torch.testing.assert_close(model(x, lens)[0], before, rtol=1e-5, atol=1e-5)
    # the sub-network is the prefix, whatever scores the channels would get now
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
    again = apply(model, plan, channel_multiple=8, recalibrate=False)
    g = groups[1]  # at its smallest width
    out = next(m.module for m in g.members if m.side == "out")
    w_full = model.get_submodule(out).weight
    assert k[g.name] < w_full.shape[0]
    torch.testing.assert_close(again.get_submodule(out).weight, w_full[: k[g.name]])


@pytest.mark.parametrize("kind", ["tdnn", "conformer"])
def test_an_int8_subnet_pass_computes_the_sliced_int8_candidate(kind: str) -> None:
    """A quant-aware sub-network pass quantizes each weight as ``apply`` quantizes the
    sliced layer (per output channel over the kept inputs: exactly), passes gradients
    straight through, and with uint8 inputs too computes what the int8 candidate computes
    more closely than the float sub-network does (the inputs' ranges are each pass's own,
    the candidate's calibrated: close, not equal)."""
    model = _model(kind)
    x, lens = _x()
    widths = _widths(kind, model)
    groups = elastic_groups(model, widths)
    order_by_importance(model, groups)
    setattr(model, ELASTIC_ATTR, {n: list(r) for n, r in widths.items()})
    ratios = {g.name: (min(widths[g.name]) if i % 2 else 1.0) for i, g in enumerate(groups)}
    k = prefix_widths(model, groups, ratios, 8)
    names = [n for n in model.structure().quantizable if not n.endswith(".dw")]  # type: ignore[operator]
    kept_inputs = _input_widths(model, groups, k)
    assert set(kept_inputs) & set(names)  # some int8 layer sees a masked input

    def candidate(act_bits: int) -> nn.Module:
        plan = Candidate(
            groups=tuple(GroupPlan(n, r) for n, r in ratios.items()),
            layers=tuple(LayerPlan(n, 8, act_bits) for n in names),
        )
        return apply(model, plan, channel_multiple=8, recalibrate=False, calibration=[(x, lens)])

    w8 = candidate(32)
    for n in names:
        want = w8.get_submodule(n).weight  # sliced on both sides (its rows: their own scales)
        q = _int8_weight(model.get_submodule(n).weight, kept_inputs.get(n))
        torch.testing.assert_close(q[: want.shape[0], : want.shape[1]], want, rtol=0, atol=0)
    w = model.get_submodule(names[0]).weight
    _int8_weight(w, None).mul(2.0).sum().backward()
    torch.testing.assert_close(w.grad, torch.full_like(w, 2.0))  # straight through
    with torch.no_grad():
        deployed = candidate(8)(x, lens)[0]
        sim = subnet_forward(model, x, lens, groups, k, names)[0]
        flt = subnet_forward(model, x, lens, groups, k)[0]
        # measured: mean |diff| 0.0016 vs 0.0023 (tdnn), 0.0038 vs 0.0063 (conformer)
        assert (sim - deployed).abs().mean() < 0.8 * (flt - deployed).abs().mean()
        # and the hooks are gone after the pass: the float sub-network again
        with masked(model, groups, k):
            torch.testing.assert_close(model(x, lens)[0], flt, rtol=0, atol=0)


def test_the_int8_chain_of_a_space() -> None:
    from voxfit.spaces import find_space

    structure = _model("tdnn").structure()  # type: ignore[operator]
    chain = int8_layers_of_space(find_space("tdnn-int8").bind(structure))
    assert chain == tuple(sorted(structure.quantizable))  # every layer: one shared width
    assert int8_layers_of_space(find_space("tdnn-default").bind(structure)) == ()  # per layer
    conformer = _model("conformer").structure()  # type: ignore[operator]
    chain = int8_layers_of_space(find_space("conformer-default").bind(conformer))
    assert chain
    assert not any(n.endswith(".dw") for n in chain)  # float-only layers left out
    # the cache name of a supernet without an int8 chain is what it was before the field
    assert "int8_layers" not in ElasticConfig(widths={"a": (0.5, 1.0)}).cache_key()
    assert ElasticConfig(widths={"a": (0.5, 1.0)}, int8_layers=("x",)).cache_key()["int8_layers"]


def test_a_group_with_a_layernorm_is_not_elastic() -> None:
    model = _model("conformer")
    with pytest.raises(ConfigError, match="stream.*LayerNorm"):
        elastic_groups(model, {"stream": (0.5, 1.0)})
    with pytest.raises(ConfigError, match="'nope' is not a channel group"):
        elastic_groups(model, {"nope": (0.5, 1.0)})


@pytest.mark.slow
def test_a_tiny_supernet_trains_and_its_smallest_and_full_subnets_beat_chance(
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
    tmp_path: Path,
) -> None:
    dev = tiny_manifest.split("dev")
    cfg = replace(train_preset("tiny"), epochs=24)
    base_path = train_cached(tiny_manifest, tiny_store, "tdnn", "tiny", cfg, tmp_path)
    base = load_checkpoint(base_path).model
    assert elastic_widths(base) is None  # an old-style checkpoint: not elastic
    widths = {f"blocks.{i}.hidden": (0.25, 0.5, 1.0) for i in range(len(base.blocks))}
    ecfg = replace(train_preset("tiny"), epochs=12, lr=2e-3)
    # with an int8 chain (every layer, as tdnn-int8 has): half the sub-network passes
    # fake-quantized, so both kinds of candidate below inherit weights trained for them
    chain = tuple(sorted(base.structure().quantizable))
    elastic = ElasticConfig(widths=widths, int8_layers=chain)
    path = train_elastic_cached(base_path, tiny_manifest, tiny_store, elastic, ecfg)
    ckpt = load_checkpoint(path)
    assert elastic_widths(ckpt.model) == {k: list(v) for k, v in widths.items()}
    steps = ckpt.meta["elastic"]["steps"]
    assert steps > 0
    passes = steps * (1 + elastic.random_subnets)
    assert 0.25 * passes < ckpt.meta["elastic"]["int8_passes"] < 0.75 * passes
    assert train_elastic_cached(base_path, tiny_manifest, tiny_store, elastic, ecfg) == path

    train = tiny_manifest.split("train")
    calib = [
        (b.feats, b.lengths)
        for b in (collate(u, tiny_store, tiny_inventory) for u in list(batches(train, 20.0))[:4])
    ]
    dev_batch = collate(dev, tiny_store, tiny_inventory)

    def dev_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(ctc_loss(m.eval(), dev_batch))

    torch.manual_seed(1)
    chance = dev_loss(build_model(default_config("tdnn", tiny_inventory.size, "tiny")))
    smallest = Candidate(groups=tuple(GroupPlan(n, 0.25) for n in widths))
    int8 = replace(smallest, layers=tuple(LayerPlan(n, 8, 8) for n in chain))
    loss = {
        name: dev_loss(apply(ckpt.model, plan, channel_multiple=8, calibration=calib))
        for name, plan in (("full", Candidate()), ("smallest", smallest), ("int8", int8))
    }
    loss["base_smallest"] = dev_loss(apply(base, smallest, channel_multiple=8, calibration=calib))
    # chance: an untrained model's dev CTC loss (18.2 here); measured: full 3.0-3.1, smallest
    # (a quarter of every block's hidden width) 3.2, the same width sliced from the base 4.4-4.9
    assert loss["full"] < 0.3 * chance, (loss, chance)
    assert loss["smallest"] < 0.3 * chance, (loss, chance)
    assert loss["int8"] < 0.3 * chance, (loss, chance)  # the smallest at 8-bit everything
    assert loss["smallest"] < loss["base_smallest"], loss  # what the elastic training buys


def test_training_needs_an_elastic_group(
    tiny_manifest: Manifest, tiny_store: FeatureStore, tiny_inventory: PhoneInventory
) -> None:
    model = _model("tdnn")
    narrow = {"blocks.0.hidden": (0.5, 1.0)}
    for elastic, match in (
        (ElasticConfig(widths={"stream": (1.0,)}), "no group has a width below 1.0"),
        (
            ElasticConfig(widths=narrow, int8_layers=("blocks.0.nope",)),
            "int8_layers: 'blocks.0.nope' is not a layer",
        ),
        (ElasticConfig(widths=narrow, int8_share=1.5), "int8_share: 1.5 is not a probability"),
    ):
        with pytest.raises(ConfigError, match=match):
            train_elastic(
                model,
                tiny_manifest.split("train"),
                tiny_store,
                tiny_inventory,
                train_preset("tiny"),
                elastic,
            )


def test_an_elastic_model_trains_on_with_its_prefixes(
    tiny_manifest: Manifest,
    tiny_store: FeatureStore,
    tiny_inventory: PhoneInventory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain model's channels are put in importance order first; a supernet's are not
    (its prefixes are its sub-networks): training an elastic model again goes on."""
    import voxfit.compress._elastic as elastic_module

    ordered: list[int] = []
    monkeypatch.setattr(
        elastic_module, "order_by_importance", lambda _m, g: ordered.append(len(g))
    )
    torch.manual_seed(0)
    model = build_model(default_config("tdnn", tiny_inventory.size, "tiny"))
    cfg = replace(train_preset("tiny"), epochs=1, max_minutes=0.02)
    elastic = ElasticConfig(widths={"blocks.0.hidden": (0.5, 1.0)})
    train = tiny_manifest.split("train")
    train_elastic(model, train, tiny_store, tiny_inventory, cfg, elastic)
    assert ordered == [1]
    assert elastic_widths(model) == {"blocks.0.hidden": [0.5, 1.0]}  # marked: a supernet
    train_elastic(model, train, tiny_store, tiny_inventory, cfg, elastic)
    assert ordered == [1]  # not reordered


def test_a_search_of_an_elastic_base_inherits_instead_of_distilling() -> None:
    from types import SimpleNamespace

    from voxfit.hw_profiles import find_profile, load_profile
    from voxfit.search._study import SearchSettings, for_base
    from voxfit.spaces import find_space

    model = _model("tdnn")
    bound = find_space("tdnn-default").bind(model.structure())  # type: ignore[operator]
    assert max(bound.space.recovery_steps) > 0
    s = SearchSettings(load_profile(find_profile("x86-avx2-2core")), bound, "sqlite://", "x", 1)
    plain = SimpleNamespace(base=model, checkpoint=Path("base.pt"))
    assert for_base(s, plain) is s  # type: ignore[arg-type]  # an old checkpoint: as before
    setattr(model, ELASTIC_ATTR, {"blocks.0.hidden": [0.25, 1.0]})
    inherited = for_base(s, plain)  # type: ignore[arg-type]
    assert inherited.space.space.recovery_steps == (0,)
    assert inherited.space.groups == bound.groups  # the widths to choose are the space's


def test_a_space_without_narrower_widths_has_no_supernet(tmp_path: Path) -> None:
    """`voxfit train --elastic` and `voxfit search --elastic` refuse, before any training, a
    space that keeps every width (naming it) and a preset without an elastic recipe."""
    from voxfit.compress import elastic_for_space
    from voxfit.spaces import find_space, load_space

    structure = _model("tdnn").structure()  # type: ignore[operator]
    text = find_space("tdnn-default").source
    full = tmp_path / "full-width.yaml"
    raw = Path(text).read_text()
    assert "[0.25, 0.5, 0.75, 1.0]" in raw
    full.write_text(raw.replace("[0.25, 0.5, 0.75, 1.0]", "[1.0]"))
    bound = load_space(full).bind(structure)
    with pytest.raises(ConfigError, match=r"full-width\.yaml: no group has a width below 1\.0"):
        elastic_for_space(tmp_path / "base.pt", None, None, bound, "tiny")  # type: ignore[arg-type]
    narrow = find_space("tdnn-default").bind(structure)
    with pytest.raises(ConfigError, match="--preset: no elastic recipe for 'huge'"):
        elastic_for_space(tmp_path / "base.pt", None, None, narrow, "huge")  # type: ignore[arg-type]
