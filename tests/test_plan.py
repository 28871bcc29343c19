from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxfit.errors import ConfigError
from voxfit.plan import ACT_BITS, WEIGHT_BITS, AdapterPlan, Candidate, GroupPlan, LayerPlan

names = st.text("abcdefgh.0123", min_size=1, max_size=12)


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    gs = draw(st.lists(names, unique=True, max_size=5))
    ls = draw(st.lists(names, unique=True, max_size=5))
    ss = draw(st.lists(names, unique=True, max_size=4))
    return Candidate(
        groups=tuple(
            GroupPlan(n, draw(st.floats(0.05, 1.0, allow_nan=False).map(lambda x: round(x, 4))))
            for n in gs
        ),
        layers=tuple(
            LayerPlan(n, draw(st.sampled_from(WEIGHT_BITS)), draw(st.sampled_from(ACT_BITS)))
            for n in ls
        ),
        adapters=tuple(
            AdapterPlan(n, draw(st.integers(0, 64)), draw(st.sampled_from(["residual", "lora"])))
            for n in ss
        ),
        importance=draw(st.sampled_from(["magnitude", "adaptation"])),
        recovery_steps=draw(st.integers(0, 500)),
    )


@given(candidates())
def test_dict_and_yaml_round_trip(c: Candidate) -> None:
    assert Candidate.from_dict(c.to_dict()) == c
    assert Candidate.load_yaml(c.dump_yaml()) == c
    assert Candidate.load_yaml(c.dump_yaml()).stable_hash() == c.stable_hash()


@given(candidates())
def test_hash_ignores_order_and_default_entries(c: Candidate) -> None:
    shuffled = Candidate(
        groups=tuple(reversed(c.groups)),
        layers=tuple(reversed(c.layers)),
        adapters=(*reversed(c.adapters), AdapterPlan("unused-slot", 0)),
        importance=c.importance,
        recovery_steps=c.recovery_steps,
    )
    assert shuffled.stable_hash() == c.stable_hash()


def test_hash_changes_with_any_setting() -> None:
    base = Candidate(groups=(GroupPlan("g", 0.5),), layers=(LayerPlan("l", 8, 32),))
    assert Candidate(groups=(GroupPlan("g", 0.75),), layers=base.layers).stable_hash() != (
        base.stable_hash()
    )
    assert Candidate(groups=base.groups, layers=(LayerPlan("l", 4, 32),)).stable_hash() != (
        base.stable_hash()
    )


def test_defaults_for_unnamed_entries() -> None:
    c = Candidate(groups=(GroupPlan("a", 0.5),), adapters=(AdapterPlan("s", 8), AdapterPlan("t")))
    assert c.keep_ratio("a") == 0.5
    assert c.keep_ratio("other") == 1.0
    assert c.layer("x") == LayerPlan("x", 32, 32)
    assert c.adapter_dims() == {"s": 8}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Candidate(groups=(GroupPlan("g", 0.0),)), r"groups\.g\.keep_ratio: 0\.0 not in"),
        (lambda: Candidate(groups=(GroupPlan("g", 1.5),)), r"groups\.g\.keep_ratio: 1\.5"),
        (lambda: Candidate(layers=(LayerPlan("l", 5),)), r"layers\.l\.weight_bits: 5 not in"),
        (lambda: Candidate(layers=(LayerPlan("l", 8, 4),)), r"layers\.l\.act_bits: 4 not in"),
        (lambda: Candidate(adapters=(AdapterPlan("s", -1),)), r"adapters\.s\.dim: -1"),
        (lambda: Candidate(groups=(GroupPlan("g"), GroupPlan("g"))), "named more than once: g"),
        (lambda: Candidate(recovery_steps=-5), "recovery_steps: -5 must be"),
    ],
)
def test_invalid_values_name_the_field(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        make()


def test_yaml_errors_name_source_and_key() -> None:
    with pytest.raises(ConfigError, match=r"p\.yaml: unknown key\(s\) colour"):
        Candidate.load_yaml("schema_version: 1\ncolour: red\n", "p.yaml")
    with pytest.raises(ConfigError, match=r"p\.yaml: layers\.x: unknown key\(s\) bits"):
        Candidate.load_yaml("schema_version: 1\nlayers: {x: {bits: 8}}\n", "p.yaml")
    with pytest.raises(ConfigError, match=r"p\.yaml:3: invalid YAML"):
        Candidate.load_yaml("schema_version: 1\nlayers: [a, b\nnote: x\n", "p.yaml")
    with pytest.raises(ConfigError, match=r"p\.yaml: layers\.x\.weight_bits: 3 not in"):
        Candidate.load_yaml("schema_version: 1\nlayers: {x: {weight_bits: 3}}\n", "p.yaml")


def test_validate_names_against_a_model() -> None:
    c = Candidate(layers=(LayerPlan("blocks.9.conv1", 8),))
    with pytest.raises(ConfigError, match=r"layers\.blocks\.9\.conv1: not a layer of this model"):
        c.validate_names(groups=["stream"], layers=["blocks.0.conv1"], slots=["blocks.0"])
    Candidate(layers=(LayerPlan("blocks.0.conv1", 8),)).validate_names(
        ["stream"], ["blocks.0.conv1"], ["blocks.0"]
    )
