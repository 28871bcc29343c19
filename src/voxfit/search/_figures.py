"""The search's figures (plotly): Pareto projections, the front's plan, parameter
importances, predicted vs measured latency, per-speaker adaptation.

Each builder reads the study through :mod:`voxfit.search._access` (so feasibility and the
front are the search's own) and returns ``None`` when the study lacks what it shows (a study
still running, or written by an older voxfit); :data:`NOTES` says why, in one sentence.
Builders read the study each time they are called, so a notebook can re-run any cell while
the search goes on.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import FrozenTrial
from plotly.subplots import make_subplots

from voxfit.search._access import complete, natural, study_frame
from voxfit.search._record import OBJECTIVES, TrialRecord

LABELS = {
    "latency_ms": "latency (ms)",
    "post_adapt_per": "post-adaptation PER (%)",
    "dev_per": "dev PER (%)",
    "size_mb": "size (MB, packed weights)",
}
# The sentence shown in place of each figure when its builder returns None.
NOTES = {
    "pareto_figure": "No complete trial yet: nothing to place on the Pareto front.",
    "pareto_3d_figure": "No complete trial yet: nothing to place on the Pareto front.",
    "plan_heatmap": (
        "No feasible complete trial, or the front trials record no keep:/wbits:/adapter: "
        "parameters and no plan: no plan to show."
    ),
    "importance_figure": (
        "Parameter importances need at least 2 complete trials whose objective values differ "
        "and at least one parameter that varies between them."
    ),
    "latency_figure": "No complete trial has both a predicted and a measured latency.",
    "speaker_figure": "No trial on the front records per-speaker adaptation results.",
}
# Parameter families drawn in the plan heatmap, in panel order.
_PLAN_PANELS = (("keep:", "keep ratio"), ("wbits:", "weight bits"), ("adapter:", "adapter size"))
# Where a plan column's value sits in a recorded plan dict, and its default when absent.
_PLAN_SOURCES = {
    "keep": ("groups", "keep_ratio", 1.0),
    "wbits": ("layers", "weight_bits", 32),
    "adapter": ("adapters", "dim", 0),
}
_COLORS = {"front": "#d62728", "feasible": "#1f77b4", "infeasible": "#bbbbbb"}


def _label(row: Any) -> str:
    return f"#{int(row.number)}" + (f" ({row.baseline})" if row.baseline else "")


# -- Pareto front ----------------------------------------------------------------------------
def _category(f: pd.DataFrame) -> pd.Series:
    cat = pd.Series("feasible", index=f.index)
    cat[~f["feasible"].astype(bool)] = "infeasible"
    cat[f["on_front"].astype(bool)] = "front"
    return cat


def _symbols(f: pd.DataFrame) -> list[str]:
    # Open markers for predicted latency: the reader should see which points rest on a model.
    return ["circle-open" if s == "predicted" else "circle" for s in f["latency_source"]]


def _hover(f: pd.DataFrame) -> list[str]:
    out = []
    for r in f.itertuples():
        out.append(
            f"{_label(r)}<br>latency {r.latency_ms:.2f} ms ({r.latency_source or '?'})"
            f"<br>post-adapt PER {r.post_adapt_per:.2f}<br>dev PER {r.dev_per:.2f}"
            + ("" if pd.isna(r.size_mb) else f"<br>size {r.size_mb:.2f} MB")
        )
    return out


def _trials_trace(kind: Any, sub: pd.DataFrame, name: str, **kwargs: Any) -> Any:
    """One category of trials as a (2-D or 3-D) scatter: baselines labelled, hover per trial."""
    return kind(
        mode="markers+text",
        name=name,
        legendgroup=name,
        text=sub["baseline"],
        hovertext=_hover(sub),
        hoverinfo="text",
        **kwargs,
    )


def pareto_figure(study: optuna.Study) -> go.Figure | None:
    """The front in four 2-D projections: latency vs post-adapt PER, latency vs dev PER,
    dev vs post-adapt PER, latency vs size.

    Front trials are red, other feasible trials blue, infeasible ones grey; baselines and
    the base model (study attr ``base``) are labelled; open markers = predicted latency; the
    dashed line is the profile's latency budget. ``None`` when no trial completed.
    """
    f = study_frame(study)
    if f.empty:
        return None
    pairs = [
        ("latency_ms", "post_adapt_per"),
        ("latency_ms", "dev_per"),
        ("dev_per", "post_adapt_per"),
        ("latency_ms", "size_mb"),
    ]
    fig = make_subplots(
        rows=1,
        cols=len(pairs),
        subplot_titles=[f"{LABELS[y]} vs {LABELS[x]}" for x, y in pairs],
        horizontal_spacing=0.07,
    )
    cat = _category(f)
    base = study.user_attrs.get("base") or {}
    budget = _number((study.user_attrs.get("profile") or {}).get("latency_budget_ms"))
    for col, (x, y) in enumerate(pairs, start=1):
        for name in ("infeasible", "feasible", "front"):
            sub = f[cat == name]
            if sub.empty:
                continue
            marker: dict[str, Any] = {"color": _COLORS[name], "size": 11 if name == "front" else 8}
            marker |= {"symbol": _symbols(sub), "line": {"width": 1.5, "color": _COLORS[name]}}
            trace = _trials_trace(go.Scatter, sub, name, x=sub[x], y=sub[y], marker=marker)
            fig.add_trace(trace.update(showlegend=col == 1, textposition="top center"), 1, col)
        bx, by = _number(base.get(x)), _number(base.get(y))
        if bx is not None and by is not None:
            fig.add_trace(
                go.Scatter(
                    x=[bx],
                    y=[by],
                    mode="markers+text",
                    name="base model",
                    legendgroup="base",
                    showlegend=col == 1,
                    text=["base"],
                    textposition="bottom center",
                    marker={"color": "black", "symbol": "diamond", "size": 10},
                ),
                row=1,
                col=col,
            )
        if budget is not None and x == "latency_ms":
            fig.add_vline(x=budget, line_dash="dash", line_color="grey", row=1, col=col)
        fig.update_xaxes(title_text=LABELS[x], row=1, col=col)
        fig.update_yaxes(title_text=LABELS[y], row=1, col=col)
    fig.update_layout(
        title="Pareto front: 2-D projections (open markers: predicted latency)",
        height=480,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def pareto_3d_figure(study: optuna.Study) -> go.Figure | None:
    """All complete trials by latency, dev and post-adaptation PER (size in the hover),
    colored as in :func:`pareto_figure`.

    ``None`` when no trial completed.
    """
    f = study_frame(study)
    if f.empty:
        return None
    fig = go.Figure()
    cat = _category(f)
    for name in ("infeasible", "feasible", "front"):
        sub = f[cat == name]
        if sub.empty:
            continue
        xyz = {"x": sub["latency_ms"], "y": sub["dev_per"], "z": sub["post_adapt_per"]}
        marker = {"color": _COLORS[name], "size": 6 if name == "front" else 4}
        fig.add_trace(_trials_trace(go.Scatter3d, sub, name, marker=marker, **xyz))
    fig.update_layout(
        title="Pareto front: 3-D",
        height=600,
        scene={
            "xaxis_title": LABELS["latency_ms"],
            "yaxis_title": LABELS["dev_per"],
            "zaxis_title": LABELS["post_adapt_per"],
        },
    )
    return fig


# -- plan heatmap ----------------------------------------------------------------------------
def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _plan_value(r: TrialRecord, column: str) -> float | None:
    """``column``'s value from the trial's params, else from its recorded plan's defaults."""
    if column in r.trial_params:
        return _number(r.trial_params[column])
    plan = r.plan_dict
    if not plan:
        return None
    prefix, _, name = column.partition(":")
    section, key, default = _PLAN_SOURCES[prefix]
    return _number(((plan.get(section) or {}).get(name) or {}).get(key, default))


def _plan_columns(r: TrialRecord) -> list[str]:
    cols = [p for p in r.trial_params if p.startswith(tuple(pre for pre, _ in _PLAN_PANELS))]
    plan = r.plan_dict
    if plan:
        for prefix, (section, _, _) in _PLAN_SOURCES.items():
            cols += [f"{prefix}:{n}" for n in (plan.get(section) or {})]
    return cols


def plan_matrix(study: optuna.Study) -> pd.DataFrame:
    """The front's plans: one row per front trial (fastest first, index ``#<number>`` plus
    the baseline name), one column per ``keep:<group>``, ``wbits:<layer>`` and
    ``adapter:<slot>`` (keep ratio, weight bits, adapter size; in that order, names in
    natural order). Values come from the trial params, else from the recorded plan (whose
    absent entries mean keep 1.0, 32 bits, no adapter). Empty when there is no front.
    """
    f = study_frame(study)
    f = f[f["on_front"]].sort_values(["latency_ms", "number"])
    by_number = {r.number: r for r in complete(study)}
    trials = [by_number[int(n)] for n in f["number"]]
    seen = dict.fromkeys(c for t in trials for c in _plan_columns(t))
    columns = [
        c
        for prefix, _ in _PLAN_PANELS
        for c in sorted((c for c in seen if c.startswith(prefix)), key=natural)
    ]
    return pd.DataFrame(
        [[_plan_value(t, c) for c in columns] for t in trials],
        index=[_label(r) for r in f.itertuples()],
        columns=columns,
        dtype=float,
    )


def plan_heatmap(study: optuna.Study) -> go.Figure | None:
    """Heatmap of :func:`plan_matrix`: one panel per family (keep ratio, weight bits,
    adapter size), values written in the cells. ``None`` when there is no front or it
    records no plan.
    """
    m = plan_matrix(study)
    if m.empty or m.shape[1] == 0:
        return None
    panels = [
        (title, [c for c in m.columns if c.startswith(prefix)])
        for prefix, title in _PLAN_PANELS
        if any(c.startswith(prefix) for c in m.columns)
    ]
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        column_widths=[len(cols) for _, cols in panels],
        subplot_titles=[title for title, _ in panels],
        horizontal_spacing=0.02,
    )
    scales = {"keep ratio": "Blues", "weight bits": "Greens", "adapter size": "Oranges"}
    for i, (title, cols) in enumerate(panels, start=1):
        z = m[cols]
        fig.add_trace(
            go.Heatmap(
                z=z.to_numpy(),
                x=[c.partition(":")[2] for c in cols],
                y=list(m.index),
                text=z.map(lambda v: "" if pd.isna(v) else f"{v:g}").to_numpy(),
                texttemplate="%{text}",
                colorscale=scales[title],
                showscale=False,
                hovertemplate="%{y}<br>%{x}: %{text}<extra>" + title + "</extra>",
            ),
            row=1,
            col=i,
        )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=-45)
    fig.update_layout(
        title="Plan of the front trials (rows: front trials, fastest first)",
        height=220 + 26 * len(m.index),
    )
    return fig


# -- importances -----------------------------------------------------------------------------
def _objective(i: int) -> Callable[[FrozenTrial], float]:
    return lambda t: float(t.values[i])


def _importances(study: optuna.Study) -> dict[str, dict[str, float] | str]:
    """Objective -> parameter importances (PED-ANOVA, normalized), or why they are missing."""
    trials = complete(study)
    varying = [
        p
        for p in dict.fromkeys(k for t in trials for k in t.trial_params)
        if len({json.dumps(t.trial_params.get(p), default=str) for t in trials}) > 1
    ]
    out: dict[str, dict[str, float] | str] = {}
    for i, name in enumerate(OBJECTIVES):
        vals = [v[i] for t in trials if (v := t.values) and math.isfinite(v[i])]
        if len(vals) < 2 or len(set(vals)) < 2:
            out[name] = f"needs >= 2 complete trials whose {name} differ ({len(vals)} complete)"
            continue
        if not varying:
            out[name] = "no parameter varies between the complete trials"
            continue
        with warnings.catch_warnings():
            # Optuna warns (and returns equal importances) when too few trials separate
            # the top quantile from the rest; that case is reported below.
            warnings.simplefilter("ignore")
            try:
                imp = optuna.importance.get_param_importances(
                    study, params=varying, target=_objective(i)
                )
            except (ValueError, RuntimeError) as e:
                out[name] = f"Optuna could not evaluate importances: {e}"
                continue
        if len(imp) > 1 and len({round(v, 12) for v in imp.values()}) == 1:
            out[name] = f"too few trials to separate parameters ({len(vals)} complete)"
            continue
        out[name] = imp
    return out


def importance_figure(study: optuna.Study, top: int = 15) -> go.Figure | None:
    """Parameter importances for each objective (PED-ANOVA through
    ``optuna.importance.get_param_importances`` with ``target = values[i]``), the ``top``
    largest per objective; an objective without enough data gets a sentence in its panel.
    ``None`` when no objective has importances.
    """
    imps = _importances(study)
    if not any(isinstance(v, dict) for v in imps.values()):
        return None
    fig = make_subplots(
        rows=1,
        cols=len(OBJECTIVES),
        subplot_titles=[LABELS[o] for o in OBJECTIVES],
        horizontal_spacing=0.16,
    )
    for col, name in enumerate(OBJECTIVES, start=1):
        imp = imps[name]
        if isinstance(imp, str):
            fig.add_annotation(
                text=imp,
                showarrow=False,
                xref=f"x{col if col > 1 else ''} domain",
                yref=f"y{col if col > 1 else ''} domain",
                x=0.5,
                y=0.5,
            )
            continue
        items = sorted(imp.items(), key=lambda kv: kv[1])[-top:]
        fig.add_trace(
            go.Bar(
                x=[v for _, v in items],
                y=[k for k, _ in items],
                orientation="h",
                name=name,
                showlegend=False,
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="importance (sum = 1)", row=1, col=col)
    n = max((len(v) for v in imps.values() if isinstance(v, dict)), default=1)
    fig.update_layout(
        title="Parameter importances per objective (PED-ANOVA)",
        height=200 + 22 * min(n, top),
    )
    return fig


# -- latency ---------------------------------------------------------------------------------
def latency_figure(study: optuna.Study) -> go.Figure | None:
    """Predicted vs measured latency for the trials that record both, with y = x, the ±10%
    band, and the predictor's MAPE and ±10% accuracy in the title (nn-Meter's metrics).
    Low-confidence predictions are orange. ``None`` when no trial has both. A measurement
    that timed the base alongside is compared at the cost model's reference speed (what
    predictions mean), others by their raw median.
    """
    f = study_frame(study).dropna(subset=["predicted_ms", "measured_ms"])
    if f.empty:
        return None
    f = f.assign(measured_ms=f["measured_ref_ms"].fillna(f["measured_ms"]))
    pred, meas = f["predicted_ms"], f["measured_ms"]
    err = (pred - meas).abs() / meas
    within = float((err <= 0.10).mean())
    low = f["low_confidence"].eq(True)  # None/NaN (not recorded) count as confident
    fig = go.Figure()
    for flag, color, name in ((False, "#1f77b4", "prediction"), (True, "#ff7f0e", "low conf.")):
        sub = f[low == flag]
        if sub.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=sub["measured_ms"],
                y=sub["predicted_ms"],
                mode="markers",
                name=name,
                marker={"color": color, "size": 8},
                hovertext=[
                    f"{_label(r)}<br>measured {r.measured_ms:.2f} ms"
                    f"<br>predicted {r.predicted_ms:.2f} ms"
                    for r in sub.itertuples()
                ],
                hoverinfo="text",
            )
        )
    hi = float(max(pred.max(), meas.max())) * 1.05
    for k, dash, name in ((1.0, "solid", "y = x"), (1.1, "dot", "+10%"), (0.9, "dot", "-10%")):
        fig.add_trace(
            go.Scatter(
                x=[0, hi],
                y=[0, k * hi],
                mode="lines",
                name=name,
                line={"color": "grey", "dash": dash, "width": 1},
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=(
            f"Predicted vs measured latency: {len(f)} trials, "
            f"MAPE {100 * float(err.mean()):.1f}%, within ±10%: {100 * within:.0f}%"
        ),
        xaxis_title="measured latency (ms)",
        yaxis_title="predicted latency (ms)",
        height=500,
    )
    return fig


# -- per-speaker adaptation ------------------------------------------------------------------
def speaker_figure(study: optuna.Study) -> go.Figure | None:
    """Per-speaker adaptation of the front trials: cell = PER after - PER before (points;
    blue = adaptation helped), text = ``before→after``; the row label carries the means.
    ``None`` when no front trial records ``per_speaker``.
    """
    f = study_frame(study)
    f = f[f["on_front"]].sort_values(["latency_ms", "number"])
    by_number = {r.number: r for r in complete(study)}
    rows = [(r, dict(by_number[int(r.number)].accuracy.per_speaker)) for r in f.itertuples()]
    rows = [(r, s) for r, s in rows if s]
    if not rows:
        return None
    speakers = sorted({k for _, s in rows for k in s}, key=natural)
    z, text, labels = [], [], []
    for r, s in rows:
        z.append([s[k][1] - s[k][0] if k in s else None for k in speakers])
        text.append([f"{s[k][0]:.1f}→{s[k][1]:.1f}" if k in s else "" for k in speakers])
        before = sum(b for b, _ in s.values()) / len(s)
        after = sum(a for _, a in s.values()) / len(s)
        labels.append(f"{_label(r)} mean {before:.1f}→{after:.1f}")
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=speakers,
            y=labels,
            text=text,
            texttemplate="%{text}",
            colorscale="RdBu_r",
            zmid=0,
            colorbar={"title": {"text": "PER change<br>(points)"}},
            hovertemplate="%{y}<br>speaker %{x}: %{text}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title="Per-speaker adaptation of the front trials (PER before→after)",
        xaxis_title="speaker",
        height=220 + 30 * len(labels),
    )
    return fig
