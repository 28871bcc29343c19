"""The README's cost-model figures re-derive from the shipped dataset through today's code.

``benchmarks/results/cost_model.json`` was written by ``benchmarks/cost_model.py``; this
re-runs its split, fit and held-out evaluation on the shipped (read-only) dataset without
measuring anything, so a change to loading, features, fitting or metrics that moves the
published figures fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from voxfit.cost_models import dataset_dir, evaluate, fit, load_dataset, load_for, split
from voxfit.hw_profiles import find_profile, load_profile

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "cost_model.json"


def test_shipped_dataset_reproduces_the_published_held_out_figures() -> None:
    published = json.loads(RESULTS.read_text())
    profile = load_profile(find_profile(published["profile"]))
    assert profile.stable_hash() == published["profile_hash"], "the profile changed"
    models, tasks = load_dataset(dataset_dir(profile, ROOT / "cost_models"))
    models = models[models["input"] == published["input"]]
    assert len(models) == published["dataset_candidates"]
    # the held-out candidates are the held-out model's (every candidate before it was recorded)
    own = models
    if published.get("held_out_model"):
        own = models[models["reference"] == published["held_out_model"]]
    frac = published.get("test_frac", published["n_test"] / len(own))
    _, test_ids = split(own, frac, published.get("split_seed", 0))
    train_ids = set(models["cand"]) - test_ids
    assert (len(train_ids), len(test_ids)) == (published["n_train"], published["n_test"])
    train = models[models["cand"].isin(train_ids)]
    # the features the shipped model (written with these figures) learned from
    features = load_for(profile, ROOT / "cost_models").card["features"]
    seed = published.get("split_seed", 0)
    cm = fit(train, tasks[tasks["cand"].isin(train_ids)], profile, seed=seed, features=features)
    m, frame = evaluate(
        cm, models[models["cand"].isin(test_ids)], tasks[tasks["cand"].isin(test_ids)], profile
    )
    assert m["within_10pct"] == pytest.approx(published["within_10pct"], abs=1.5 / len(frame))
    assert m["spearman"] == pytest.approx(published["spearman"], abs=0.01)
    assert m["mape"] == pytest.approx(published["mape"], rel=0.05)
    assert m["roofline"]["within_10pct"] == published["roofline"]["within_10pct"]
