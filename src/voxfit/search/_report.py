"""One static HTML report of a search: the summary, the front as a table, every figure.

Reads the study through :mod:`voxfit.search._access` (study user attrs ``profile``,
``space``, ``objectives``, ``base``, ``checkpoint``, ``versions``) and each trial through its
:class:`~voxfit.search._record.TrialRecord`; the figures are :mod:`voxfit.search._figures`'.
A section whose figure has no data shows its sentence from :data:`NOTES` instead.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from voxfit.search._access import check_objectives, front_table, peer_latency_ms, records
from voxfit.search._figures import (
    NOTES,
    importance_figure,
    latency_figure,
    pareto_3d_figure,
    pareto_figure,
    plan_heatmap,
    speaker_figure,
)

# -- the HTML report -------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; }
td.k { text-align: left; font-weight: 600; }
p.note { color: #666; font-style: italic; }
"""


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td class='k'>{html.escape(str(k))}</td>"
        f"<td>{html.escape(v if isinstance(v, str) else json.dumps(v, default=str))}</td></tr>"
        for k, v in items.items()
    )
    return f"<table>{rows}</table>"


def _latency_model(attrs: Mapping[str, Any]) -> str:
    """Where the latency model holds: the host it was fitted on, and the calibration to
    this host (how many measurements) when the search made one."""
    cards = {k: v for k, v in attrs.items() if k.startswith("cost_model_")}
    if not cards:
        return "<p class='note'>Latency: every candidate measured (no latency model).</p>"
    card = next(iter(cards.values()))
    host = card.get("host") or {}
    info = {
        "latency model": card.get("hardware_key", "?"),
        "fitted on": host.get("cpu_model", "host not recorded"),
        "this host": " ".join(str(x) for x in card.get("host_check", [])),
    }
    cal = attrs.get("latency_calibration")
    if cal:
        here = (cal.get("host") or {}).get("cpu_model", "?")
        info["calibrated to this host"] = (
            f"yes, from {cal['samples']} measurements ({here}; fit MAPE {cal['fit_mape']:.1%})"
            if cal.get("active")
            else f"not yet: {cal['samples']} of {cal['needed']} measurements"
        )
        hk = cal.get("kernels")
        if hk:
            info["by this host's kernel times"] = (
                f"yes: {hk['timed_here']} kernels timed here, fitted on {hk['samples']} "
                f"measurements (fit MAPE {hk['fit_mape']:.1%})"
                if hk.get("active")
                else f"not yet: {hk['samples']} measurements, {hk['timed_here']} kernels "
                "timed here"
            )
    kern = attrs.get("latency_kernels")
    if kern:
        info["kernel model (kernel times measured on the device)"] = (
            f"{kern['kernels']} predictions from known kernels, {kern['estimated']} with "
            f"kernels estimated from their pattern, {kern['transfer']} by the transfer model"
        )
    return "<h3>Latency model</h3>" + _kv_table(info)


def _peer(study: optuna.Study) -> str:
    """The peer the front is judged against (the front table's ``vs_peer`` column)."""
    peer = study.user_attrs.get("peer")
    if not peer:
        return (
            "<h3>Peer</h3><p class='note'>Not measured (an RPC profile, --no-peer, or it "
            "failed: see the search's log).</p>"
        )
    on_scale = peer_latency_ms(study)
    front = [r["vs_peer"] for r in front_table(study) if r.get("vs_peer")]
    info = {
        "peer": peer["name"],
        "peer / TVM base, back to back": f"{peer['ratio_to_tvm_base']:.3f} "
        f"(median of {len(peer['rounds'])} rounds, {peer['threads']} threads)",
        "peer on the latency objective's scale (ms)": (
            f"{on_scale:.3f}" if on_scale else "when the fp32 baseline has finished"
        ),
        "best front speed-up over the peer": f"{max(front):.2f}x" if front else "-",
    }
    return "<h3>Peer</h3>" + _kv_table(info)


def _summary(study: optuna.Study) -> str:
    attrs = study.user_attrs
    profile = attrs.get("profile") or {}
    states = Counter(t.state for t in study.get_trials(deepcopy=False))
    overview = {
        "study": study.study_name,
        "profile": profile.get("name", "?"),
        "target": profile.get("target", "?"),
        "latency budget (ms)": profile.get("latency_budget_ms", "?"),
        "memory budget (MB)": profile.get("memory_budget_mb", "?"),
        "space": attrs.get("space", "?"),
        "checkpoint": attrs.get("checkpoint", "?"),
        "trials complete / failed / running / other": " / ".join(
            str(n)
            for n in (states.pop(TrialState.COMPLETE, 0), states.pop(TrialState.FAIL, 0))
            + (states.pop(TrialState.RUNNING, 0), sum(states.values()))
        ),
        "versions": attrs.get("versions", {}),
    }
    parts = ["<h2>Summary</h2>", _kv_table(overview)]
    parts.append(_latency_model(attrs))
    base = attrs.get("base")
    parts.append("<h3>Base model</h3>")
    parts.append(_kv_table(base) if base else "<p class='note'>No base metrics recorded.</p>")
    parts.append(_peer(study))
    parts.append("<h3>Front</h3>")
    front = front_table(study)
    if front:
        parts.append(
            pd.DataFrame(front).to_html(index=False, float_format=lambda v: f"{v:.2f}", na_rep="")
        )
    else:
        parts.append("<p class='note'>No feasible complete trial: the front is empty.</p>")
    failed = records(study, (TrialState.FAIL,))
    if failed:
        reasons: dict[str, list[int]] = {}
        for t in failed:
            reason = t.failure or "(no reason recorded)"
            reasons.setdefault(reason[:300], []).append(t.number)
        frame = pd.DataFrame(
            [
                {"reason": r, "count": len(ns), "trials": ", ".join(map(str, ns[:20]))}
                for r, ns in sorted(reasons.items(), key=lambda kv: -len(kv[1]))
            ]
        )
        parts += ["<h3>Failed trials</h3>", frame.to_html(index=False)]
    return "\n".join(parts)


# Report sections after the summary; a builder's NOTES entry is keyed by its __name__.
_SECTIONS: tuple[tuple[str, Callable[[optuna.Study], go.Figure | None]], ...] = (
    ("Pareto front: 2-D projections", pareto_figure),
    ("Pareto front: 3-D", pareto_3d_figure),
    ("Plan of the front trials", plan_heatmap),
    ("Parameter importances", importance_figure),
    ("Predicted vs measured latency", latency_figure),
    ("Per-speaker adaptation", speaker_figure),
)


def write_report(study: optuna.Study, out_path: Path) -> Path:
    """Write one self-contained HTML file (plotly.js embedded once, works offline).

    Sections: summary (study, profile, space, trial counts, base metrics, the front as a
    table, failure reasons), the Pareto projections and 3-D view, the plan heatmap of the
    front, parameter importances, predicted vs measured latency, per-speaker adaptation.
    A section without data shows its sentence from :data:`NOTES`.

    Returns:
        ``out_path`` (parent folders are created).

    Raises:
        ConfigError: the study records objectives other than :data:`OBJECTIVES`.
    """
    check_objectives(study)
    body = [f"<h1>voxfit search report: {html.escape(study.study_name)}</h1>", _summary(study)]
    for title, build in _SECTIONS:
        body.append(f"<h2>{html.escape(title)}</h2>")
        fig = build(study)
        if fig is None:
            body.append(f"<p class='note'>{html.escape(NOTES[build.__name__])}</p>")
            continue
        height = int(fig.layout.height or 500)
        body.append(
            fig.to_html(
                full_html=False,
                include_plotlyjs=False,
                default_height=f"{height}px",
                config={"displaylogo": False},
            )
        )
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>voxfit report: {html.escape(study.study_name)}</title>"
        f"<style>{_CSS}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script>"
        "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path
