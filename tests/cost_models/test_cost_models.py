from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from voxfit.compress import apply
from voxfit.cost_models import (
    ADAPTERS,
    FEATURES,
    KINDS,
    MIXING,
    CostModel,
    Task,
    attribute_calls,
    decompose,
    evaluate,
    fit,
    metrics,
    predicted_estimator,
    refeaturize,
    roofline_ms,
)
from voxfit.errors import ConfigError, ModelError
from voxfit.hw_profiles import HardwareProfile, pick_local_profile
from voxfit.models import build_model, default_config
from voxfit.plan import AdapterPlan, Candidate, GroupPlan, LayerPlan
from voxfit.structure import ModelStructure

ROOT = Path(__file__).resolve().parents[2]


def _base(kind: str = "tdnn") -> nn.Module:
    torch.manual_seed(0)
    return build_model(default_config(kind, 20, "tiny")).eval()


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    return pick_local_profile(ROOT / "hw_profiles")


def test_features_are_deterministic_and_follow_the_plan() -> None:
    base = _base()
    cand = Candidate(
        groups=(GroupPlan("stream", 0.5), GroupPlan("blocks.1.hidden", 0.25)),
        layers=(LayerPlan("blocks.0.conv1", 4),),
        adapters=(AdapterPlan("blocks.1", 8),),
    )
    m = apply(base, cand, channel_multiple=8)
    a, b = decompose(m, 100), decompose(apply(base, cand, channel_multiple=8), 100)
    assert [t.features for t in a] == [t.features for t in b]
    names = [t.name for t in a]
    assert names == ["stem", "blocks.0", "blocks.1", "head"]
    stem, b0, b1, head = a
    assert stem.features["t_out"] == 50  # stride-2 stem halves 100 frames
    assert stem.features["c_out"] == 16  # 32 channels kept at 50%
    assert b1.features["hidden"] == 16  # 48 * 0.25 = 12, rounded up to the multiple of 8
    assert b1.features["adapter_dim"] == 8
    assert b0.features["adapter_dim"] == 0
    assert b0.features["w_bits_min"] == 4
    assert b0.features["mflops"] == pytest.approx(
        (2 * 16 * 48 * 5 * 50 + 2 * 48 * 16 * 1 * 50) / 1e6  # tiny: 5-tap convs
    )
    assert head.features["c_out"] == 20


def _mix(tasks: list[Task]) -> list[tuple[float, ...]]:
    return [tuple(t.features[f] for f in MIXING) for t in tasks]


def test_mixing_features_count_int8_layers_and_the_switches_around_them() -> None:
    base = _base()  # tiny TDNN: stem, blocks.0 (conv1, conv2), blocks.1 (conv1, conv2), head
    calib = [(torch.randn(2, 100, 80), torch.tensor([100, 80]))]
    plan = Candidate(
        layers=(
            LayerPlan("blocks.0.conv2", 8, 8),  # int8 between float layers
            LayerPlan("blocks.1.conv1", 8, 8),
            LayerPlan("blocks.1.conv2", 4, 8),
            LayerPlan("head", 8),  # packed, computed in float
        )
    )
    ts = decompose(apply(base, plan, channel_multiple=8, calibration=calib), 100)
    stem, b0, b1, head = ts
    # (n_int8, n_packed, mflops_int8, switch_in, switch_inner, switch_out)
    conv2 = 2 * 48 * 32 * 1 * 50 / 1e6
    assert _mix(ts)[0] == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # float after the float input
    assert _mix(ts)[1] == pytest.approx((1.0, 0.0, conv2, 0.0, 1.0, 0.0))
    assert b1.features["n_int8"] == 2.0
    assert (b1.features["switch_in"], b1.features["switch_inner"]) == (0.0, 0.0)
    assert b1.features["switch_out"] == 1.0  # the head computes in float
    assert (head.features["n_packed"], head.features["switch_in"]) == (1.0, 1.0)
    # a float model has none of it; an all-int8 one switches only at the ends
    assert all(x == (0.0,) * 6 for x in _mix(decompose(apply(base, Candidate()), 100)))
    s = base.structure()  # type: ignore[operator]
    int8 = Candidate(layers=tuple(LayerPlan(q, 8, 8) for q in s.quantizable))
    m = _mix(decompose(apply(base, int8, calibration=calib), 100))
    assert [x[3] for x in m] == [1.0, 0.0, 0.0, 0.0]
    assert [x[5] for x in m] == [0.0, 0.0, 0.0, 1.0]
    assert sum(x[4] for x in m) == 0.0
    # the Conformer's modules get them too
    conf = _base("conformer")
    lin = Candidate(layers=(LayerPlan(conf.structure().quantizable[0], 8, 8),))  # type: ignore[operator]
    ct = decompose(apply(conf, lin, calibration=calib), 100)
    assert sum(t.features["n_int8"] for t in ct) == 1.0
    assert ct[0].features["switch_in"] == 1.0


def test_rows_stored_before_the_mixing_features_are_refeaturized(
    profile: HardwareProfile,
) -> None:
    base = build_model(default_config("tdnn", 55, "tiny")).eval()
    calib = [(torch.randn(2, 100, 80), torch.tensor([100, 80]))]
    plan = Candidate(
        groups=(GroupPlan("blocks.0.hidden", 0.5),),
        layers=(LayerPlan("blocks.0.conv1", 8, 8), LayerPlan("head", 4)),
    )
    ts = decompose(
        apply(base, plan, channel_multiple=profile.channel_multiple, calibration=calib), 100
    )
    from voxfit.cost_models import reference_key

    models = pd.DataFrame(
        [
            {
                "cand": "c0",
                "input": "utterance_1s",
                "frames": 100,
                "plan": json.dumps(plan.to_dict()),
                "reference": reference_key(base),
            },
            {  # a model that is not built in: its rows cannot be recomputed
                "cand": "c1",
                "input": "utterance_1s",
                "frames": 100,
                "plan": json.dumps(Candidate().to_dict()),
                "reference": "UsersNet-123",
            },
        ]
    )
    old = [f for f in FEATURES if f not in MIXING]
    tasks = pd.DataFrame(
        [{"cand": c, "input": "utterance_1s", "task": t.name, **{f: t.features[f] for f in old}}
         for c in ("c0", "c1") for t in ts]
    )  # fmt: skip
    out = refeaturize(models, tasks, profile)
    assert set(out["cand"]) == {"c0"}
    assert out[list(MIXING)].to_numpy().tolist() == [list(x) for x in _mix(ts)]
    assert list(tasks.columns) == ["cand", "input", "task", *old]  # the input is not changed
    assert refeaturize(models, out, profile) is out  # nothing stale: nothing recomputed
    # a store where newer rows have them and older ones not: the older ones are filled
    partial = out.assign(**{f: float("nan") for f in MIXING})
    again = refeaturize(models, partial, profile)
    assert again[list(MIXING)].to_numpy().tolist() == out[list(MIXING)].to_numpy().tolist()


def test_a_model_fitted_before_the_mixing_features_still_predicts(
    profile: HardwareProfile, tmp_path: Path
) -> None:
    models, tasks = _synthetic(profile, 30, 0)
    old = tuple(f for f in FEATURES if f not in MIXING)
    cm = fit(models, tasks, profile, features=old)  # fitted the way it was
    cm.save(tmp_path)
    again = CostModel.load(tmp_path)
    assert list(again.card["features"]) == list(old)
    ts = decompose(apply(_base(), Candidate(), channel_multiple=8), 100)
    assert again.predict_tasks(ts).ms == pytest.approx(cm.predict_tasks(ts).ms)
    card = (tmp_path / "card.yaml").read_text().replace("- act_kb", "- act_kb\n- gpu_clock")
    (tmp_path / "card.yaml").write_text(card)
    with pytest.raises(ConfigError, match="unknown features"):
        CostModel.load(tmp_path)


def test_any_declared_model_featurizes_by_module() -> None:
    """The Conformer (no conv backbone): one task per module of quantizable layers, its kind
    from what runs there, adapters with the module that ran before them."""
    base = _base("conformer")  # tiny: d=32, FFN 48, 2 heads of 16
    cand = Candidate(
        groups=(GroupPlan("blocks.0.ff1", 0.5), GroupPlan("blocks.1.attn.heads", 0.5)),
        layers=(LayerPlan("blocks.0.ff1.fc1", 4),),
        adapters=(AdapterPlan("blocks.0", 8), AdapterPlan("blocks.1", 4, "lora")),
    )
    m = apply(base, cand, channel_multiple=8).train()
    bn = m.get_submodule("blocks.0.conv.bn").running_mean.clone()
    tasks = decompose(m, 100)
    assert m.training  # the traced forward pass leaves the model as it was
    assert torch.equal(m.get_submodule("blocks.0.conv.bn").running_mean, bn)
    assert [t.features for t in tasks] == [t.features for t in decompose(m, 100)]
    by = {t.name: t for t in tasks}
    blocks = [f"blocks.{i}.{s}" for i in range(2) for s in ("ff1", "attn", "conv", "ff2")]
    assert [t.name for t in tasks] == ["stem", *blocks, "head"]
    kinds = {n: int(t.features["kind"]) for n, t in by.items()}
    assert kinds["blocks.0.ff1"] == kinds["blocks.1.ff2"] == KINDS["ffn"]
    assert kinds["blocks.0.attn"] == KINDS["attention"]
    assert kinds["blocks.0.conv"] == KINDS["conv_module"]
    assert (kinds["stem"], kinds["head"]) == (KINDS["stem"], KINDS["head"])
    ff1 = by["blocks.0.ff1"].features
    assert (ff1["c_in"], ff1["hidden"], ff1["c_out"], ff1["w_bits_min"]) == (32, 24, 32, 4)
    assert ff1["t_in"] == ff1["t_out"] == 50  # after the stride-2 stem
    assert ff1["mflops"] == pytest.approx(2 * 2 * 32 * 24 * 50 / 1e6)
    # attention: q, k, v, o and the two matmuls of the scores; one head of 16 left in block 1
    a0, a1 = by["blocks.0.attn"], by["blocks.1.attn"]
    assert a0.n_anchors == 6
    assert a1.features["hidden"] == 16
    assert a1.features["mflops"] == pytest.approx((2 * 4 * 32 * 16 * 50 + 4 * 50 * 50 * 16) / 1e6)
    assert by["blocks.0.conv"].features["kernel"] == 5
    # the residual adapter of block 0 runs after ff2 (and the block's norm); LoRA on ff2.fc2
    assert by["blocks.0.ff2"].features["adapter_dim"] == 8
    assert by["blocks.0.ff2"].n_anchors == 4
    assert by["blocks.1.ff2"].features["adapter_kind"] == ADAPTERS["lora"]
    assert by["blocks.1.ff2"].n_anchors == 4
    assert all(t.features["adapter_dim"] == 0 for n, t in by.items() if not n.endswith("ff2"))
    # kernels attribute by matmul/conv anchors: the score softmax is the attention's
    calls = []
    for t in tasks:
        for i in range(t.n_anchors):
            calls.append((f"fused_matmul{i}_add" if t.name != "stem" else "fused_conv1d", 1.0))
            calls.append(("fused_softmax" if t.name.endswith("attn") else "layer_norm", 0.5))
    per, loose = attribute_calls([("transpose", 0.25), *calls], tasks)
    assert per == pytest.approx({t.name: 1.5 * t.n_anchors for t in tasks})
    assert loose == 0.25
    with pytest.raises(ModelError, match="matmul/conv kernels"):
        attribute_calls(calls[2:], tasks)


def test_a_users_model_featurizes_and_a_broken_one_is_named() -> None:
    from tests._user_model import build

    tasks = decompose(build(n_outputs=20, size="tiny"), 100)
    assert [t.name for t in tasks][0] == "stem"
    assert tasks[-1].name == "head"
    # conv blocks, but not the TDNN's: a model that learned only those has not seen them
    assert {int(t.features["kind"]) for t in tasks[1:-1]} == {KINDS["conv_block"]}

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(80, 4)

        def structure(self) -> ModelStructure:
            return ModelStructure(groups=(), quantizable=("head",), adapter_slots=())

        def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no")

    with pytest.raises(ModelError, match="Broken failed a forward pass of 100 frames"):
        decompose(Broken(), 100)


def _tasks() -> list[Task]:
    return decompose(apply(_base(), Candidate(adapters=(AdapterPlan("blocks.0", 8),))), 100)


def test_kernel_times_are_attributed_to_the_segment_that_ran_them() -> None:
    calls = [
        ("transpose", 0.01),
        ("fused_conv1d_add_relu", 0.5),
        ("fused_conv1d1_add_relu", 0.3),
        ("fused_conv1d2_add_add_relu", 0.2),
        ("fused_matmul_add_relu", 0.05),  # the adapter of block 0
        ("fused_conv1d1_add_relu", 0.3),
        ("fused_conv1d2_add_add_relu", 0.2),
        ("fused_conv1d3_add", 0.1),
        ("log_softmax", 0.02),
    ]
    per, loose = attribute_calls(calls, _tasks())
    assert per == pytest.approx({"stem": 0.5, "blocks.0": 0.55, "blocks.1": 0.5, "head": 0.12})
    assert loose == pytest.approx(0.01)
    with pytest.raises(ModelError, match="cannot attribute"):
        attribute_calls(calls[:-3], _tasks())


def test_the_conformers_attention_kernels_are_its_attention_tasks_anchors() -> None:
    """The deploy graph runs each attention's two products as ``attn_scores`` and
    ``attn_values`` kernels (``voxfit::attention``), not as matmuls: they still count as that
    attention task's anchors, so a collected Conformer's times line up with its tasks."""
    tasks = decompose(_base("conformer"), 100)
    calls = [("transpose", 0.01)]
    for t in tasks:
        kernels = [("fused_matmul_add", 1.0)] * t.n_anchors
        if "attn" in t.name:  # q, k, v, the products with the softmax between, o
            kernels[-3:-1] = [("attn_scores", 1.0), ("softmax", 0.5), ("attn_values", 1.0)]
        calls += kernels
    per, loose = attribute_calls(calls, tasks)
    assert loose == pytest.approx(0.01)
    for t in tasks:
        assert per[t.name] == pytest.approx(t.n_anchors + (0.5 if "attn" in t.name else 0.0))
    assert sum("attn" in t.name for t in tasks) == 2
    renamed = [(n.replace("attn_", "softmax_"), ms) for n, ms in calls]  # no longer anchors
    with pytest.raises(ModelError, match="cannot attribute"):
        attribute_calls(renamed, tasks)


def _synthetic(
    profile: HardwareProfile, n: int, seed: int, drift: float = 0.0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Candidates whose task times follow a known law (FLOPs-bound + a fixed cost).

    ``drift``: each candidate is timed on a host running up to that much slower (raw ms and
    instrumented task ms), beside a reference model of 2 ms that slowed down with it.
    """
    rng = np.random.default_rng(seed)
    base = _base()
    models, tasks = [], []
    for i in range(n):
        cand = Candidate(
            groups=(
                GroupPlan("stream", float(rng.choice([0.5, 0.75, 1.0]))),
                GroupPlan("blocks.0.hidden", float(rng.choice([0.25, 0.5, 1.0]))),
            ),
            adapters=((AdapterPlan("blocks.1", 8),) if i % 2 else ()),
        )
        ts = decompose(apply(base, cand, channel_multiple=8), 100)
        ms = [0.02 + t.features["mflops"] * 0.05 for t in ts]
        slow = 1.0 + drift * float(rng.random())
        key = f"c{i}"
        models.append(
            {
                "cand": key,
                "input": "utterance_1s",
                "measured_ms": (sum(ms) + 0.03) * slow,
                "kernels_ms": (sum(ms) + 0.03) * slow,
                "loose_ms": 0.03 * slow,
                "reference_ms": 2.0 * slow if drift else None,
                "relative": (sum(ms) + 0.03) / 2.0 if drift else None,
                "reference": "Ref-1" if drift else None,
                "profile_hash": profile.stable_hash(),
                "tvm_version": "0.27.0",
            }
        )
        tasks += [
            {"cand": key, "input": "utterance_1s", "task": t.name, **t.features, "ms": v * slow}
            for t, v in zip(ts, ms, strict=True)
        ]
    return pd.DataFrame(models), pd.DataFrame(tasks)


def test_fit_learns_a_known_law_and_round_trips(profile: HardwareProfile, tmp_path: Path) -> None:
    models, tasks = _synthetic(profile, 40, 0)
    cm = fit(models, tasks, profile)
    m, frame = evaluate(cm, models, tasks, profile)
    assert m["within_10pct"] >= 0.9
    assert m["spearman"] > 0.9
    assert cm.card["overhead"]["coef"] == pytest.approx([0.03, 0.0], abs=1e-6)
    cm.save(tmp_path)
    again = CostModel.load(tmp_path)
    m2, frame2 = evaluate(again, models, tasks, profile)
    assert np.array_equal(frame["predicted_ms"].to_numpy(), frame2["predicted_ms"].to_numpy())
    assert (tmp_path / "model.json").read_text().startswith("{")  # JSON, no pickle
    (tmp_path / "model.json").write_text((tmp_path / "model.json").read_text() + " ")
    with pytest.raises(ConfigError, match="sha256"):
        CostModel.load(tmp_path)


def test_labels_are_normalized_by_the_reference_timed_alongside(
    profile: HardwareProfile,
) -> None:
    models, tasks = _synthetic(profile, 40, 3, drift=1.0)  # the host up to 2x slower
    cm = fit(models, tasks, profile)
    # the reference's typical time: the median over the collection
    assert cm.card["reference_ms"]["utterance_1s@Ref-1"] == pytest.approx(
        float(models["reference_ms"].median())
    )
    m, frame = evaluate(cm, models, tasks, profile)
    assert m["within_10pct"] >= 0.9
    assert m["spearman"] > 0.95
    # the normalized labels are the law's times scaled to the reference's median speed
    typical = float(models["reference_ms"].median()) / 2.0
    law = models["relative"] * 2.0 * typical
    assert frame["measured_ms"].to_numpy() == pytest.approx(law.to_numpy())
    # against the raw (drifting) medians the same predictions miss far more often
    assert m["raw"]["within_10pct"] < m["within_10pct"] - 0.3


def test_a_model_refuses_another_profile(profile: HardwareProfile) -> None:
    models, tasks = _synthetic(profile, 10, 1)
    cm = fit(models, tasks, profile)
    other = replace(profile, name="other-board")
    with pytest.raises(ConfigError, match="trained for"):
        cm.predict(_base(), other, 100)
    with pytest.raises(ConfigError, match="trained for"):
        predicted_estimator(other, model=cm)
    (r,) = predicted_estimator(profile, model=cm).estimate(_base(), profile.inputs[:1])
    assert r.method == "predicted"
    assert r.median_ms is not None
    assert r.median_ms > 0
    # predicted peak memory: the weights plus the largest task's activations
    acts = max(t.features["act_kb"] for t in decompose(_base(), profile.inputs[0].frames))
    assert r.peak_memory_mb == pytest.approx((r.weight_bytes or 0) / 1e6 + acts / 1e3, rel=1e-3)
    assert acts > 0


def test_unseen_task_kinds_are_flagged_low_confidence(profile: HardwareProfile) -> None:
    models, tasks = _synthetic(profile, 10, 2)
    cm = fit(models, tasks[tasks["adapter_kind"] == 0], profile)
    lora = apply(_base(), Candidate(adapters=(AdapterPlan("blocks.0", 8, "lora"),)))
    p = cm.predict(lora, profile, 100)
    assert p.low_confidence
    assert any("never seen" in r for r in p.reasons)
    assert not cm.predict(_base(), profile, 100).low_confidence


def test_a_model_that_learned_only_the_tdnn_flags_other_families(
    profile: HardwareProfile,
) -> None:
    from tests._user_model import build

    models, tasks = _synthetic(profile, 10, 2)
    cm = fit(models, tasks, profile)
    for other in (_base("conformer"), build(n_outputs=20, size="tiny")):
        p = cm.predict(other, profile, 100)
        assert p.low_confidence
        assert any("task kind" in r and "never seen" in r for r in p.reasons), p.reasons


def test_a_model_fitted_on_float32_weight_libraries_flags_packed_plans(
    profile: HardwareProfile,
) -> None:
    models, tasks = _synthetic(profile, 10, 2)
    cm = fit(models, tasks, profile)
    # synthetic rows record no lowering: collected before packing, as the shipped dataset
    assert cm.card["library_weights"] == "float32"
    s = _base().structure()
    w8 = apply(_base(), Candidate(layers=tuple(LayerPlan(n, 8, 32) for n in s.quantizable)))
    p = cm.predict(w8, profile, 100)
    assert p.low_confidence
    assert any("8-bit weights run packed" in r for r in p.reasons)
    assert not cm.predict(_base(), profile, 100).low_confidence
    cm.card["library_weights"] = "packed"  # a dataset of packed libraries: trusted
    assert not cm.predict(w8, profile, 100).low_confidence


def _w8a8() -> nn.Module:
    """The synthetic base with 8-bit weights and activations in every layer (calibrated)."""
    s = _base().structure()
    return apply(
        _base(),
        Candidate(layers=tuple(LayerPlan(n, 8, 8) for n in s.quantizable)),
        calibration=[(torch.randn(2, 100, 80), torch.tensor([100, 80]))],
    )


def test_a_model_that_never_saw_int8_compute_flags_int8_plans(profile: HardwareProfile) -> None:
    models, tasks = _synthetic(profile, 10, 2)
    cm = fit(models, tasks, profile)
    assert cm.card["ranges"]["a_bits_min"] == [32.0, 32.0]
    cm.card["library_weights"] = "packed"  # only the activations are new
    w8a8 = _w8a8()
    p = cm.predict(w8a8, profile, 100)
    assert p.low_confidence
    assert any("a_bits_min=8 outside the training range [32, 32]" in r for r in p.reasons)


def test_roofline_and_metrics(profile: HardwareProfile) -> None:
    ts = _tasks()
    r = roofline_ms(ts, profile)
    flops = sum(t.features["mflops"] for t in ts) * 1e6
    assert r >= flops / (profile.peak_gflops or 1) / 1e9 * 1e3 * (1 - 1e-9)
    m = metrics([1.0, 2.0, 3.5], [1.0, 2.1, 3.0])
    assert m["within_10pct"] == pytest.approx(2 / 3)
    assert m["within_5pct"] == pytest.approx(2 / 3)
    assert m["spearman"] == pytest.approx(1.0)


def _mean_keep(c: Candidate, blocks: int) -> float:
    keep = {g.name: g.keep_ratio for g in c.groups}
    return sum(keep.get(f"blocks.{i}.hidden", 1.0) for i in range(blocks)) / blocks


def test_levelled_candidates_reach_the_corners_uniform_ones_miss() -> None:
    from voxfit.cost_models import sample_candidates
    from voxfit.spaces import find_space

    base = build_model(default_config("tdnn", 20, "default"))
    bound = find_space(ROOT / "spaces" / "tdnn-default.yaml").bind(base.structure())
    blocks = sum(1 for g in base.structure().groups if g.name.endswith(".hidden"))
    uniform = sample_candidates(bound, 60, 0)
    both = sample_candidates(bound, 60, 0, levelled=60)
    assert len(both) == 120
    assert len({c.stable_hash() for c in both}) == 120  # distinct
    assert [c.stable_hash() for c in both[:60]] == [c.stable_hash() for c in uniform]
    again = sample_candidates(bound, 60, 0, levelled=60)
    assert [c.stable_hash() for c in again] == [c.stable_hash() for c in both]  # deterministic
    u = np.array([_mean_keep(c, blocks) for c in uniform])
    lv = np.array([_mean_keep(c, blocks) for c in both[60:]])
    # the same per-layer choices, but whole candidates spread over the space's range
    assert lv.std() > 1.4 * u.std(), (lv.std(), u.std())
    corners = ((lv <= 0.35) | (lv >= 0.9)).sum()
    assert (lv <= 0.35).any()
    assert (lv >= 0.9).any()
    assert corners >= 3 * max(1, ((u <= 0.35) | (u >= 0.9)).sum()), corners


def _untuned(profile: HardwareProfile, tmp_path: Path) -> HardwareProfile:
    """One core, one input, short timing, untuned kernels: collection in CI's time (tuned
    collection is benchmarks/cost_model.py)."""
    return replace(
        profile,
        cores=1,
        inputs=profile.inputs[:1],
        measurement=replace(profile.measurement, repeats=3, min_repeat_ms=5, warmup=1),
        tuning=replace(profile.tuning, trials_per_task=0, database_dir=str(tmp_path / "db")),
    )


@pytest.mark.tvm
@pytest.mark.slow
def test_tiny_collect_fit_predict(profile: HardwareProfile, tmp_path: Path) -> None:
    from voxfit.cost_models import collect, load_dataset
    from voxfit.spaces import find_space

    p = _untuned(profile, tmp_path)
    base = _base()
    bound = find_space(ROOT / "spaces" / "tdnn-default.yaml").bind(base.structure())
    store = tmp_path / "work" / "measurements"
    out = collect(
        base, bound, p, 3, work_dir=tmp_path / "w", store=store, cost_models_dir=tmp_path / "cm"
    )
    assert out["stored"] == 3
    models, tasks = load_dataset(store)
    assert len(models) == 3
    assert len(tasks) == 3 * 4
    assert tasks["ms"].notna().all()
    # the kernels' sum is what the whole-model time is made of (VM overhead aside)
    ratio = models["kernels_ms"] / models["measured_ms"]
    assert ratio.between(0.25, 4.0).all(), ratio.tolist()  # same ballpark (shared machine)
    # the base was timed alongside each candidate; a compressed one is at most a few times
    # slower (untuned packed low-bit kernels here: benchmarks/results/artifacts.json has w8
    # at 1.4x the float32 time even tuned)
    assert (models["reference_ms"] > 0).all()
    assert (models["collect_s"] > 0).all()
    assert models["relative"].between(0.05, 4.0).all(), models["relative"].tolist()
    assert models["lowering"].notna().all()
    assert (
        (models["relative"] * models["reference_ms"] / models["measured_ms"])
        .between(0.5, 2.0)
        .all()
    )
    again = collect(
        base, bound, p, 3, work_dir=tmp_path / "w", store=store, cost_models_dir=tmp_path / "cm"
    )
    assert again["skipped"] == 3
    cm = fit(models, tasks, p)
    assert cm.card["library_weights"] == "packed"
    cm.save(tmp_path / "model")
    est = predicted_estimator(p, model=CostModel.load(tmp_path / "model"))
    (r,) = est.estimate(base, p.inputs)
    assert r.median_ms is not None
    assert r.median_ms > 0
    # predicted peak memory: the weights plus the largest task's activations
    acts = max(t.features["act_kb"] for t in decompose(base, p.inputs[0].frames))
    assert r.peak_memory_mb == pytest.approx((r.weight_bytes or 0) / 1e6 + acts / 1e3, rel=1e-3)
    assert acts > 0


@pytest.mark.tvm
@pytest.mark.slow
def test_a_collected_conformer_has_every_task_timed(
    profile: HardwareProfile, tmp_path: Path
) -> None:
    """Real TVM builds of tiny Conformer candidates (pruned heads and FFNs, 8-bit weights
    packed, residual and LoRA adapters): the compiled kernels line up with the tasks."""
    import yaml

    from tests._tiny import CI_TINY_CONFORMER_SPACE
    from voxfit.cost_models import collect, load_dataset
    from voxfit.spaces import space_from_dict

    p = _untuned(profile, tmp_path)
    base = _base("conformer")
    bound = space_from_dict(yaml.safe_load(CI_TINY_CONFORMER_SPACE)).bind(base.structure())
    store = tmp_path / "measurements"
    out = collect(
        base, bound, p, 3, work_dir=tmp_path / "w", store=store, cost_models_dir=tmp_path / "cm"
    )
    assert (out["stored"], out["failed"]) == (3, 0)
    models, tasks = load_dataset(store)
    assert len(tasks) == 3 * 10  # stem, 2 x (ff1, attn, conv, ff2), head
    assert tasks["ms"].notna().all()
    assert (tasks["ms"] > 0).all()
    attn = tasks[tasks["kind"] == KINDS["attention"]]
    assert len(attn) == 6
    # the tasks own nearly all the kernel time (input layout before the stem aside)
    assert (models["loose_ms"] < 0.1 * models["kernels_ms"]).all()
    plans = [json.loads(x) for x in models["plan"]]
    assert any(pl.get("adapters") for pl in plans)


def test_int8_compute_is_trusted_only_on_task_kinds_it_was_seen_on(
    profile: HardwareProfile,
) -> None:
    """A model that saw int8 compute on one kind of task (a TDNN block's conv) does not
    vouch for it on another (a Conformer's linear layers; here the stem and head)."""
    models, tasks = _synthetic(profile, 10, 2)
    block = int(tasks["kind"].value_counts().idxmax())  # the blocks' kind: most rows
    tasks.loc[tasks["kind"] == block, "a_bits_min"] = 8.0  # int8 seen on blocks only
    cm = fit(models, tasks, profile)
    assert cm.card["seen_int8_kinds"] == [block]
    cm.card["library_weights"] = "packed"
    w8a8 = _w8a8()
    p = cm.predict(w8a8, profile, 100)
    flagged = [r for r in p.reasons if "never seen with int8 compute" in r]
    assert p.low_confidence
    assert flagged
    assert not any(f"kind {block} never seen with int8" in r for r in flagged)
    del cm.card["seen_int8_kinds"]  # a card from before the check: not checked
    assert not any("never seen with int8" in r for r in cm.predict(w8a8, profile, 100).reasons)
