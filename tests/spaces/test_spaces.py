from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from voxfit.errors import ConfigError
from voxfit.plan import Candidate, LayerPlan
from voxfit.spaces import find_space, load_space, params_of, sample, space_from_dict

SPACES = Path(__file__).resolve().parents[2] / "spaces"


class _Random:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.asked: list[str] = []

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.asked.append(name)
        return self.r.choice(choices)


class _Replay:
    """Answers each suggestion from ``answers`` (what params_of gave), checking it is offered."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        assert self.answers[name] in choices
        return self.answers[name]


def _raw() -> dict[str, Any]:
    return yaml.safe_load((SPACES / "tdnn-default.yaml").read_text())


def test_shipped_spaces_bind_to_their_models(tdnn_structure) -> None:  # type: ignore[no-untyped-def]
    from voxfit.models import build_model, default_config

    conformer = build_model(default_config("conformer", 55, "default")).structure()
    models = set()
    for path in SPACES.glob("*.yaml"):
        space = load_space(path)
        models.add(space.model)
        structure = tdnn_structure if space.model == "tdnn" else conformer
        bound = space.bind(structure)
        assert set(bound.groups) == {g.name for g in structure.groups}
        assert bound.weight_bits["head"] == (8, 32)  # the later, specific rule wins
        assert bound.weight_bits["stem"] == (4, 8, 32)
    assert models == {"tdnn", "conformer"}


def test_the_conformer_space_prunes_whole_heads_and_builds() -> None:
    import torch

    from voxfit.compress import apply
    from voxfit.cost_models import sample_candidates
    from voxfit.models import build_model, default_config

    torch.manual_seed(0)
    base = build_model(default_config("conformer", 55, "default")).eval()
    bound = find_space("conformer-default", SPACES).bind(base.structure())
    assert bound.groups["stream"] == (1.0,)  # the adapters' stream is kept whole
    assert set(bound.space.adapter_kinds) == {"residual", "lora"}
    # int8 compute is offered for the stem and the Linear layers, never the depthwise convs
    assert bound.act_bits["blocks.0.ff1.fc1"] == (8, 32)
    assert bound.act_bits["stem"] == (8, 32)
    assert bound.act_bits["blocks.0.conv.dw"] == (32,)
    x, n = torch.randn(1, 100, 80), torch.tensor([100])
    cal = [(torch.randn(2, 100, 80), torch.tensor([100, 80]))]
    heads = set()
    # one shared width for the layers with a choice; the depthwise convs keep their one
    assert bound.shared_act_choices() == (8, 32)
    acts_seen = set()
    for cand in sample_candidates(bound, 6, seed=1, levelled=2):
        acts = {x.name: x.act_bits for x in cand.layers}
        shared = {a for n, a in acts.items() if not n.endswith(".dw")}
        assert len(shared) <= 1
        assert all(a == 32 for n, a in acts.items() if n.endswith(".dw"))
        if shared == {8}:  # int8 compute: every linear layer's weights quantized
            assert len([n for n in acts if not n.endswith(".dw")]) == len(bound.act_bits) - 4
        acts_seen |= shared or {32}
        assert params_of(bound, cand) is not None
        m = apply(base, cand, channel_multiple=8, calibration=cal)
        for blk in m.blocks:  # type: ignore[union-attr]
            width = blk.attn.q.out_features
            assert width % 36 == 0  # whole heads of 36 channels
            heads.add(width // 36)
        lp, _ = m(x, n)
        assert lp.shape == (1, 50, 55)
        assert torch.isfinite(lp).all()
    assert heads >= {2, 4}  # the space's corners are reached
    assert acts_seen == {8, 32}


def test_sample_round_trips_through_params(tdnn_structure) -> None:  # type: ignore[no-untyped-def]
    bound = find_space("tdnn-default", SPACES).bind(tdnn_structure)
    seen = set()
    for seed in range(30):
        fake = _Random(seed)
        cand = sample(bound, fake)
        seen.add(cand.stable_hash())
        params = params_of(bound, cand)
        assert set(params) == set(fake.asked)

        assert sample(bound, _Replay(params)) == cand
        for g in cand.groups:
            assert g.keep_ratio in bound.groups[g.name]
    assert len(seen) == 30


def test_sample_with_an_optuna_trial(tdnn_structure) -> None:  # type: ignore[no-untyped-def]
    bound = find_space("tdnn-default", SPACES).bind(tdnn_structure)
    study = optuna.create_study()
    trial = study.ask()
    cand = sample(bound, trial)
    assert trial.params["keep:stream"] == cand.keep_ratio("stream")
    assert all(
        k.split(":")[0]
        in {"keep", "wbits", "abits", "adapter", "adapter_kind", "importance", "recovery_steps"}
        for k in trial.params
    )


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda r: r["pruning"]["groups"].update({"blocks.*.hiden": [0.5]}),
            "pruning.groups.blocks.*.hiden",
        ),
        (
            lambda r: r["quantization"]["weight_bits"].update({"head": [3]}),
            "quantization.weight_bits.head: 3",
        ),
        (lambda r: r["pruning"]["groups"].update({"stream": [1.5]}), "pruning.groups.stream: 1.5"),
        (lambda r: r.update({"recovery_step": [0]}), "recovery_step: unknown key"),
        (lambda r: r["adapters"].update({"kinds": ["prefix"]}), "adapters.kinds: 'prefix'"),
        (lambda r: r.update({"model": "rnn"}), "model: 'rnn'"),
    ],
)
def test_malformed_space_names_file_and_key(tmp_path, tdnn_structure, edit, needle) -> None:  # type: ignore[no-untyped-def]
    raw = _raw()
    edit(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_space(p).bind(tdnn_structure)
    msg = str(e.value)
    assert str(p) in msg
    assert needle in msg
    assert "\n" not in msg


def test_params_of_rejects_a_plan_outside_the_space(tdnn_structure) -> None:  # type: ignore[no-untyped-def]
    from voxfit.plan import Candidate, GroupPlan

    bound = space_from_dict(_raw(), "s.yaml").bind(tdnn_structure)
    with pytest.raises(ConfigError, match="keep:stream = 0.3"):
        params_of(bound, Candidate(groups=(GroupPlan("stream", 0.3),)))


def test_broken_yaml_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_space(p)


def test_the_conformer_space_comments_count_the_macs_they_quote() -> None:
    """spaces/conformer-default.yaml quotes where the default Conformer's Linear/Conv1d
    multiply-accumulates are and what halving a group leaves: recounted here."""
    import torch
    from torch import nn

    from voxfit.compress import apply
    from voxfit.models import build_model, default_config
    from voxfit.plan import Candidate, GroupPlan

    def macs(model: nn.Module) -> dict[str, int]:
        out: dict[str, int] = {}
        hooks = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear | nn.Conv1d):

                def hook(m: nn.Module, _i: object, y: torch.Tensor, name: str = name) -> None:
                    if isinstance(m, nn.Linear):
                        out[name] = y.numel() // y.shape[-1] * m.in_features * m.out_features
                    else:
                        assert isinstance(m, nn.Conv1d)
                        out[name] = y.numel() * m.in_channels // m.groups * m.kernel_size[0]

                hooks.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.randn(1, 100, 80), torch.tensor([100]))
        for h in hooks:
            h.remove()
        return out

    base = build_model(default_config("conformer", 55, "default")).eval()
    full = macs(base)
    total = sum(full.values())
    share = {k: sum(v for n, v in full.items() if k in n) / total for k in ("ff", "attn", "conv.")}
    assert round(total / 1e6, 1) == 99.1
    assert (round(share["ff"], 2), round(share["attn"], 2), round(share["conv."], 2)) == (
        0.67,
        0.17,
        0.13,
    )
    groups = [g.name for g in base.structure().groups]
    for key, left in ((".ff", 0.67), ("heads", 0.92), ("conv.channels", 0.94)):
        plan = Candidate(groups=tuple(GroupPlan(g, 0.5) for g in groups if key in g))
        pruned = sum(macs(apply(base, plan, channel_multiple=8)).values())
        assert round(pruned / total, 2) == left, key


def _shared_space(tdnn_structure):  # type: ignore[no-untyped-def]
    raw = _raw()
    raw["quantization"]["shared_act_bits"] = True
    return space_from_dict(raw, "shared.yaml").bind(tdnn_structure)


def test_shared_activation_bits_are_one_choice_and_int8_takes_quantized_weights(
    tdnn_structure,  # type: ignore[no-untyped-def]
) -> None:
    bound = _shared_space(tdnn_structure)
    assert bound.shared_act_choices() == (8, 32)
    acts_seen = set()
    for seed in range(40):
        fake = _Random(seed)
        cand = sample(bound, fake)
        assert fake.asked.count("abits:*") == 1
        assert not [n for n in fake.asked if n.startswith("abits:") and n != "abits:*"]
        acts = {cand.layer(n).act_bits for n in bound.act_bits}
        assert len(acts) == 1  # every layer at the one shared width
        acts_seen |= acts
        if acts == {8}:  # int8 compute: no layer left at float weights
            assert all(cand.layer(n).weight_bits in (4, 8) for n in bound.weight_bits)
        params = params_of(bound, cand)
        assert set(params) == set(fake.asked)  # enqueueing replays the same names

        assert sample(bound, _Replay(params)) == cand
    assert acts_seen == {8, 32}


def test_shared_activation_bits_with_optuna_and_the_baselines(tdnn_structure) -> None:  # type: ignore[no-untyped-def]
    from voxfit.search import baselines

    bound = _shared_space(tdnn_structure)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True))
    for name, cand in baselines(bound, 32).items():  # every baseline is expressible
        study.enqueue_trial(params_of(bound, cand), user_attrs={"baseline": name})
    for _ in range(12):  # dynamic names (wbits@a8:...) do not upset Optuna
        trial = study.ask()
        cand = sample(bound, trial)
        study.tell(trial, float(sum(x.weight_bits + x.act_bits for x in cand.layers)))
    assert len(study.trials) == 12


def test_shared_activation_bits_refuse_mixed_plans_and_leave_other_hashes_alone(
    tdnn_structure,  # type: ignore[no-untyped-def]
) -> None:
    bound = _shared_space(tdnn_structure)
    first = next(iter(bound.act_bits))
    with pytest.raises(ConfigError, match="not one shared choice"):
        params_of(bound, Candidate(layers=(LayerPlan(first, 8, 8),)))
    plain = find_space("tdnn-default", SPACES)
    assert "shared_act_bits" not in plain.to_dict()["quantization"]
    assert bound.space.stable_hash() != plain.stable_hash()
    raw = _raw()
    raw["quantization"]["shared_act_bits"] = True
    raw["quantization"]["act_bits"] = {"blocks.0.*": [8], "head": [32]}
    with pytest.raises(ConfigError, match=r"shared\.yaml: quantization\.shared_act_bits"):
        space_from_dict(raw, "shared.yaml").bind(tdnn_structure)
    raw["quantization"]["shared_act_bits"] = "yes"
    with pytest.raises(ConfigError, match="quantization.shared_act_bits"):
        space_from_dict(raw, "shared.yaml")


def test_int8_weight_bits_narrow_the_weights_at_int8_compute_only(
    tdnn_structure,  # type: ignore[no-untyped-def]
) -> None:
    """At the shared 8-bit width a layer with an int8_weight_bits rule draws from it (here:
    8 only); at float activations its weight_bits (4, 8, 32) still hold."""
    raw = _raw()
    raw["quantization"]["shared_act_bits"] = True
    raw["quantization"]["int8_weight_bits"] = {"*": [8]}
    bound = space_from_dict(raw, "int8w.yaml").bind(tdnn_structure)
    weights: dict[int, set[int]] = {8: set(), 32: set()}
    for seed in range(60):
        cand = sample(bound, _Random(seed))
        (act,) = {cand.layer(n).act_bits for n in bound.act_bits}
        weights[act] |= {cand.layer(n).weight_bits for n in bound.weight_bits}
        assert sample(bound, _Replay(params_of(bound, cand))) == cand
    assert weights[8] == {8}
    assert weights[32] == {4, 8, 32}
    w4a8 = Candidate(layers=tuple(LayerPlan(n, 4, 8) for n in bound.act_bits))
    with pytest.raises(ConfigError, match="wbits@a8:.* = 4 is not offered"):
        params_of(bound, w4a8)
    assert "int8_weight_bits" in bound.space.to_dict()["quantization"]
    assert bound.space.stable_hash() != _shared_space(tdnn_structure).space.stable_hash()
    raw["quantization"]["int8_weight_bits"] = {"*": [32]}
    with pytest.raises(ConfigError, match=r"int8w\.yaml: quantization\.int8_weight_bits"):
        space_from_dict(raw, "int8w.yaml")
    raw["quantization"]["int8_weight_bits"] = {"head": [4]}  # head's weight_bits: 8, 32
    with pytest.raises(ConfigError, match="int8_weight_bits: head offers"):
        space_from_dict(raw, "int8w.yaml").bind(tdnn_structure)
    raw["quantization"]["int8_weight_bits"] = {"*": [8]}
    raw["quantization"]["shared_act_bits"] = False
    with pytest.raises(ConfigError, match="int8_weight_bits: needs shared_act_bits"):
        space_from_dict(raw, "int8w.yaml")
