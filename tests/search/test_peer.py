"""The peer on a study's latency scale: the base's objective times the back-to-back ratio,
unknown until both are recorded; --no-peer and RPC profiles measure nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from voxfit.search import peer_latency_ms
from voxfit.search._study import measure_peer


def test_the_peer_is_scaled_by_the_base_objective() -> None:
    study = optuna.create_study(directions=["minimize"])
    assert peer_latency_ms(study) is None
    study.set_user_attr("peer", {"ratio_to_tvm_base": 0.4, "rounds": []})
    assert peer_latency_ms(study) is None  # the fp32 baseline has not finished
    study.set_user_attr("base", {"latency_ms": 3.0})
    assert peer_latency_ms(study) == pytest.approx(1.2)


def test_a_recorded_peer_is_reused_and_rpc_profiles_have_none() -> None:
    study = optuna.create_study(directions=["minimize"])
    rpc = SimpleNamespace(profile=SimpleNamespace(measurement=SimpleNamespace(method="rpc")))
    assert measure_peer(rpc, None, study) is None  # type: ignore[arg-type]
    assert "peer" not in study.user_attrs
    study.set_user_attr("peer", {"ratio_to_tvm_base": 0.5})
    local = SimpleNamespace(
        profile=SimpleNamespace(measurement=SimpleNamespace(method="local")), work=Path("nowhere")
    )
    assert measure_peer(local, None, study) == {"ratio_to_tvm_base": 0.5}  # type: ignore[arg-type]
