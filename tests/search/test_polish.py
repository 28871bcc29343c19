"""Polishing at export: an inherited candidate of an elastic base is fine-tuned only when
asked, exported polished only if its dev PER beats the searched one, and refused where there
is nothing to polish."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from voxfit.errors import ConfigError
from voxfit.models import ELASTIC_ATTR, build_model, default_config
from voxfit.plan import Candidate, GroupPlan
from voxfit.search._bundle import _check_polish, build_for_export


class _Ctx:
    """A search context whose builds are recorded: a model per plan, tagged with its steps."""

    def __init__(self, elastic: bool = True) -> None:
        torch.manual_seed(0)
        self.base = build_model(default_config("tdnn", 12, "tiny"))
        if elastic:
            setattr(self.base, ELASTIC_ATTR, {"blocks.0.hidden": [0.5, 1.0]})
        self.checkpoint = Path("base.pt")
        self.recovery: Any = object()
        self.built: list[Candidate] = []

    def build(self, cand: Candidate, cm: int, seed: int, **kw: Any) -> nn.Module:
        self.built.append(cand)
        return SimpleNamespace(steps=cand.recovery_steps)  # type: ignore[return-value]


PLAN = Candidate(groups=(GroupPlan("blocks.0.hidden", 0.5),))


@pytest.mark.parametrize(("polished_per", "used"), [(3.0, True), (5.0, False), (4.0, False)])
def test_the_polished_candidate_is_exported_only_if_it_is_better(
    polished_per: float, used: bool
) -> None:
    ctx = _Ctx()

    def dev_per(m: Any) -> float:
        assert m.steps == 200  # only the polished model is judged (the trial has the other)
        return polished_per

    model, plan, polish = build_for_export(
        ctx,  # type: ignore[arg-type]
        PLAN,
        7,
        8,
        False,
        polish_steps=200,
        searched_dev_per=4.0,
        dev_per=dev_per,
    )
    assert polish is not None
    assert polish["used"] is used
    assert polish["dev_per_polished"] == polished_per
    assert polish["dev_per_inherited"] == 4.0
    assert polish["searched_plan_hash"] == PLAN.stable_hash()
    assert plan.recovery_steps == (200 if used else 0)  # the bundle's plan rebuilds it
    assert model.steps == plan.recovery_steps  # type: ignore[attr-defined]
    assert [c.recovery_steps for c in ctx.built] == ([200] if used else [200, 0])


def test_without_polish_the_searched_candidate_is_built_once() -> None:
    ctx = _Ctx()
    model, plan, polish = build_for_export(
        ctx,  # type: ignore[arg-type]
        PLAN,
        7,
        8,
        False,
        polish_steps=0,
        searched_dev_per=4.0,
        dev_per=lambda m: pytest.fail("no dev PER without polishing"),
    )
    assert polish is None
    assert plan == PLAN
    assert ctx.built == [PLAN]


def test_polish_is_refused_where_there_is_nothing_to_polish() -> None:
    _check_polish(_Ctx(), 3, PLAN, 0)  # type: ignore[arg-type]  # not asked: fine
    _check_polish(_Ctx(), 3, PLAN, 100)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="is not elastic"):
        _check_polish(_Ctx(elastic=False), 3, PLAN, 100)  # type: ignore[arg-type]
    distilled = Candidate(groups=PLAN.groups, recovery_steps=500)
    with pytest.raises(ConfigError, match="trial 3 was distilled already"):
        _check_polish(_Ctx(), 3, distilled, 100)  # type: ignore[arg-type]
    ctx = _Ctx()
    ctx.recovery = None
    with pytest.raises(ConfigError, match="no training data"):
        _check_polish(ctx, 3, PLAN, 100)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="negative"):
        _check_polish(_Ctx(), 3, PLAN, -1)  # type: ignore[arg-type]
