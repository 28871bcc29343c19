"""Layer-wise sensitivity: what compressing one group or layer alone costs.

For every channel group at each keep ratio, and every quantizable layer at each weight
bit-width, the base model is compressed in that one place only (with the default adapters
at every slot) and measured: dev PER and post-adaptation PER of held-out speakers (the
adaptation proxy by default, the full measurement on request). The table narrows and
warm-starts the search; the heatmap shows where personalization is fragile.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from voxfit._progress import progress_bar
from voxfit.compress._apply import apply
from voxfit.data import FeatureStore, Manifest, PhoneInventory
from voxfit.errors import ConfigError
from voxfit.metrics import phone_error_rate
from voxfit.models import StructuredModel
from voxfit.plan import WEIGHT_BITS, Candidate, GroupPlan, LayerPlan
from voxfit.train import AdaptConfig, ProxyConfig, adaptation_proxy, measure_adaptation


@dataclass(frozen=True, slots=True)
class SensitivityConfig:
    """Which settings to try; ``full`` uses the full adaptation measurement (slow)."""

    keep_ratios: tuple[float, ...] = (0.75, 0.5, 0.25)
    weight_bits: tuple[int, ...] = (8, 4)
    channel_multiple: int = 8
    full: bool = False


def _probes(
    model: StructuredModel, cfg: SensitivityConfig
) -> list[tuple[str, str, str, Candidate]]:
    s = model.structure()
    out: list[tuple[str, str, str, Candidate]] = []
    for g in s.groups:
        for r in cfg.keep_ratios:
            out.append(
                (
                    g.name,
                    "prune",
                    f"keep {r:g}",
                    Candidate(groups=(GroupPlan(g.name, r),)),
                )
            )
    for q in s.quantizable:
        for b in cfg.weight_bits:
            out.append((q, "quantize", f"w{b}", Candidate(layers=(LayerPlan(q, b),))))
    return out


def sensitivity(
    model: nn.Module,
    manifest: Manifest,
    store: FeatureStore,
    inventory: PhoneInventory,
    adapt: AdaptConfig,
    cfg: SensitivityConfig,
    proxy: ProxyConfig | None = None,
) -> pd.DataFrame:
    """One row per (layer or group, setting): dev PER, post-adaptation PER, and their deltas.

    Raises:
        ConfigError: the model declares no structure, or an invalid bit-width/ratio.
    """
    if not isinstance(model, StructuredModel):
        raise ConfigError(f"{type(model).__name__} does not declare structure()")
    for b in cfg.weight_bits:
        if b not in WEIGHT_BITS:
            raise ConfigError(f"weight_bits: {b} not in {WEIGHT_BITS}")
    proxy = proxy or ProxyConfig()

    def post(m: nn.Module, slots: Sequence[str] | None) -> float:
        if cfg.full:
            return measure_adaptation(m, manifest, store, inventory, adapt, slots=slots).per_after
        return adaptation_proxy(m, manifest, store, inventory, adapt, proxy, slots=slots).per_after

    dev = manifest.split("dev")
    base_dev = phone_error_rate(model, dev, store, inventory)
    base_post = post(model, None)
    rows = []
    probes = _probes(model, cfg)
    with progress_bar() as bar:
        task = bar.add_task("sensitivity", total=len(probes))
        for name, kind, setting, cand in probes:
            torch.manual_seed(0)
            m = apply(model, cand, channel_multiple=cfg.channel_multiple)
            d = phone_error_rate(m, dev, store, inventory)
            p = post(m, None)  # the plan has no adapters: the default ones at every slot
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "setting": setting,
                    "dev_per": d,
                    "dev_per_delta": d - base_dev,
                    "post_adapt_per": p,
                    "post_adapt_per_delta": p - base_post,
                }
            )
            bar.advance(task)
    return pd.DataFrame(rows)


def save_sensitivity(table: pd.DataFrame, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``sensitivity.csv`` and ``sensitivity.html`` (plotly heatmaps); returns paths."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "sensitivity.csv"
    table.to_csv(csv, index=False)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("dev PER change (points)", "post-adaptation PER change (points)"),
    )
    for col, metric in enumerate(("dev_per_delta", "post_adapt_per_delta"), start=1):
        pivot = table.pivot_table(index="name", columns="setting", values=metric)
        fig.add_trace(
            go.Heatmap(
                z=pivot.values, x=list(pivot.columns), y=list(pivot.index), coloraxis="coloraxis"
            ),
            row=1,
            col=col,
        )
    fig.update_layout(
        title="voxfit layer sensitivity",
        coloraxis={"colorscale": "RdBu_r", "cmid": 0},
        height=max(400, 22 * table["name"].nunique()),
    )
    html = out / "sensitivity.html"
    fig.write_html(html, include_plotlyjs=True)  # self-contained: reviewers may be offline
    return [csv, html]
