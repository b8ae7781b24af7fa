"""The deployment page's chart of a rollout: both variants side by side (baseline and
candidate) for each analysed step: requests, errors and p95 latency in that step's window,
from the figures stored with each decision."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

COLORS = {"baseline": "#4c78a8", "candidate": "#f58518"}


def rollout_chart(summary: dict | None) -> str:
    """HTML of the chart (plotly.js loaded by the page), or "" with nothing analysed yet."""
    if not summary:
        return ""
    entries = [e for e in summary.get("decisions", []) if e.get("variants")]
    if not entries:
        return ""
    fig = make_subplots(
        rows=1, cols=3, subplot_titles=("requests", "errors (5xx)", "p95 latency (ms)")
    )
    for role in ("baseline", "candidate"):
        label = None
        xs, reqs, errs, p95 = [], [], [], []
        for e in entries:
            v = e["variants"].get(role) or {}
            label = label or f"{role} r{v.get('revision')} (v{v.get('version')})"
            xs.append(f"step {e['step'] + 1}: {e['decision']}")
            reqs.append(v.get("requests"))
            errs.append(v.get("errors"))
            p95.append(v.get("p95_ms"))
        for col, ys in enumerate((reqs, errs, p95), start=1):
            fig.add_trace(
                go.Bar(
                    x=xs,
                    y=ys,
                    name=label,
                    legendgroup=role,
                    showlegend=col == 1,
                    marker_color=COLORS[role],
                ),
                row=1,
                col=col,
            )
    fig.update_layout(
        barmode="group",
        height=260,
        margin={"l": 40, "r": 10, "t": 30, "b": 40},
        legend={"orientation": "h", "y": -0.25},
    )
    return pio.to_html(
        fig,
        include_plotlyjs=False,
        full_html=False,
        div_id="rollout-chart",
        config={"displayModeBar": False, "responsive": True},
    )
