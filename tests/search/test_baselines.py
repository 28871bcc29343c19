"""The enqueued baselines follow what the space lets be changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from voxfit.search import baselines
from voxfit.spaces import SearchSpace, load_space

SPACES = Path(__file__).resolve().parents[2] / "spaces"


def test_prune50_halves_only_the_groups_the_space_may_halve(tdnn_structure) -> None:  # type: ignore[no-untyped-def]
    default = baselines(load_space(SPACES / "tdnn-default.yaml").bind(tdnn_structure), 32)
    wide = baselines(load_space(SPACES / "tdnn-wide.yaml").bind(tdnn_structure), 32)
    assert list(default) == ["fp32", "int8", "prune50"]
    halved = {g.name for g in default["prune50"].groups}
    assert "stream" not in halved  # tdnn-default keeps the stream whole
    assert halved == {g.name for g in tdnn_structure.groups} - {"stream"}
    assert {g.name for g in wide["prune50"].groups} == {g.name for g in tdnn_structure.groups}
    assert all(g.keep_ratio == 0.5 for g in default["prune50"].groups)
    assert default["prune50"].recovery_steps == 1000  # the longest the space offers
    # every baseline carries the same adapters: the largest offered size <= 32 at each slot
    assert {a.dim for b in default.values() for a in b.adapters} == {32}
    small = baselines(load_space(SPACES / "tdnn-default.yaml").bind(tdnn_structure), 8)
    assert small["fp32"].adapters
    assert {a.dim for a in small["fp32"].adapters} == {8}


def test_no_prune50_when_nothing_may_be_halved(tdnn_structure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    text = (SPACES / "tdnn-default.yaml").read_text()
    text = text.replace("[0.25, 0.5, 0.75, 1.0]", "[0.75, 1.0]")
    (tmp_path / "s.yaml").write_text(text)
    out = baselines(load_space(tmp_path / "s.yaml").bind(tdnn_structure), 32)
    assert list(out) == ["fp32", "int8"]


def test_a_study_with_other_objectives_is_not_resumed(tdnn_structure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A study made by a version with three objectives (no size) cannot take 4-value trials:
    resuming it is a one-line error naming the study, before any work."""
    import optuna

    from voxfit.errors import ConfigError
    from voxfit.hw_profiles import load_profile
    from voxfit.search import OBJECTIVES, SearchSettings, prepare_study

    url = f"sqlite:///{tmp_path}/s.db"
    old = optuna.create_study(storage=url, study_name="old", directions=["minimize"] * 3)
    old.set_user_attr("objectives", ["latency_ms", "post_adapt_per", "dev_per"])
    settings = SearchSettings(
        profile=load_profile(SPACES.parent / "hw_profiles" / "x86-avx2-2core.yaml"),
        space=load_space(SPACES / "tdnn-default.yaml").bind(tdnn_structure),
        storage=url,
        study_name="old",
        n_trials=1,
    )
    with pytest.raises(ConfigError, match="study 'old' optimizes .*size_mb.*another --study"):
        prepare_study(settings, None)  # type: ignore[arg-type]
    assert OBJECTIVES[-1] == "size_mb"


def _begun_study(url: str, profile: str, space: SearchSpace, **more: Any) -> Any:
    """Study "s" in ``url`` as a search of ``space`` for ``profile`` leaves it (``more``:
    further attributes)."""
    import optuna

    from voxfit.search import OBJECTIVES

    study = optuna.create_study(storage=url, study_name="s", directions=["minimize"] * 4)
    for k, v in {
        "objectives": list(OBJECTIVES),
        "profile": {"name": profile},
        "space": space.name,
        "space_choices_hash": space.choices_hash(),
        "space_choices": space.choices(),
        **more,
    }.items():
        study.set_user_attr(k, v)
    return study


def test_a_study_resumes_by_space_choices_not_prose(tdnn_structure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Only what a search can draw decides whether a study goes on with an edited space."""
    import optuna

    from voxfit.errors import ConfigError
    from voxfit.hw_profiles import load_profile
    from voxfit.search import SearchSettings, prepare_study

    original = load_space(SPACES / "tdnn-default.yaml")
    url = f"sqlite:///{tmp_path}/s.db"
    profile = load_profile(SPACES.parent / "hw_profiles" / "x86-avx2-2core.yaml")
    study = _begun_study(url, profile.name, original, space_hash=original.stable_hash())

    def space(text: str) -> SearchSpace:
        (tmp_path / "edited.yaml").write_text(text)
        return load_space(tmp_path / "edited.yaml")

    def resume(text: str, study_name: str = "s") -> optuna.Study:
        s = SearchSettings(
            profile=profile,
            space=space(text).bind(tdnn_structure),
            storage=url,
            study_name=study_name,
            n_trials=1,
        )
        return prepare_study(s, None)  # type: ignore[arg-type]

    text = (SPACES / "tdnn-default.yaml").read_text()
    reworded = text.replace("description: >", "description: >\n  Reworded.")
    assert space(reworded).stable_hash() != original.stable_hash()
    assert resume(reworded).study_name == "s"  # the description is prose: it goes on
    changed = text.replace("head: [8, 32]", "head: [4, 8, 32]")
    with pytest.raises(ConfigError, match=r"changed: quantization\.weight_bits\.head\)"):
        resume(changed)
    # a study from before the choices were recorded: the file's hash, as it was
    old = optuna.create_study(storage=url, study_name="old", directions=["minimize"] * 4)
    for k in ("objectives", "space"):
        old.set_user_attr(k, study.user_attrs[k])
    old.set_user_attr("profile", {"name": profile.name})
    old.set_user_attr("space_hash", original.stable_hash())
    with pytest.raises(ConfigError, match="file changed since the study began"):
        resume(reworded, "old")


def test_a_study_resumes_only_on_the_model_it_began_with(tdnn_structure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A study begun on the plain base is not continued on its elastic supernet (or another
    base): its trials would mix two models. The same checkpoint named from another working
    directory goes on."""
    from types import SimpleNamespace

    from voxfit.errors import ConfigError
    from voxfit.hw_profiles import load_profile
    from voxfit.search import SearchSettings, prepare_study

    url = f"sqlite:///{tmp_path}/s.db"
    profile = load_profile(SPACES.parent / "hw_profiles" / "x86-avx2-2core.yaml")
    space = load_space(SPACES / "tdnn-default.yaml")
    _begun_study(
        url, profile.name, space, checkpoint="work/models/tdnn-ae2e1c29e8d0/checkpoint.pt"
    )
    s = SearchSettings(profile, space.bind(tdnn_structure), url, "s", 1)
    elastic = SimpleNamespace(
        checkpoint=Path("work/models/tdnn-ae2e1c29e8d0-elastic-27a9dd9c91a3/checkpoint.pt")
    )
    with pytest.raises(ConfigError, match="study 's' searches the model .*tdnn-ae2e1c29e8d0/"):
        prepare_study(s, elastic)  # type: ignore[arg-type]
    elsewhere = SimpleNamespace(checkpoint=Path("/srv/w/models/tdnn-ae2e1c29e8d0/checkpoint.pt"))
    assert prepare_study(s, elsewhere).study_name == "s"  # type: ignore[arg-type]
