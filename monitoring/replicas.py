"""Replicas over time beside traffic: the autoscaler's samples (deployments.ScaleSample, one
per poll) drawn per window as the replicas wanted and ready (the highest in the window, so a
short scale-up shows) and the requests in flight at the router (the window's average), with
the cold starts marked."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from deployments.models import Deployment, DeploymentEvent, ScaleSample

from . import charts
from .selectors import Point, Series

POINTS_PER_STEP = 6  # finer than the traffic charts: scaling happens within minutes


def replica_series(*, deployment_id: int, start: int, end: int, step: int) -> dict[str, Series]:
    """``replicas`` and ``ready`` (highest per window), ``in_flight`` (average per window)."""
    rows = list(
        ScaleSample.objects.filter(deployment_id=deployment_id, ts__gte=start, ts__lt=end)
        .order_by("ts")
        .values_list("ts", "replicas", "ready", "in_flight")
    )
    out: dict[str, Series] = {"replicas": {}, "ready": {}, "in_flight": {}}
    if not rows:
        return out
    data = np.array(rows, dtype=np.float64)
    windows = ((data[:, 0] - start) // step).astype(np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(windows)) + 1))
    counts = np.diff(np.append(starts, len(windows)))
    t = (start + windows[starts] * step).tolist()
    n = counts.tolist()
    highest = np.maximum.reduceat(data[:, 1:3], starts, axis=0)
    mean = np.add.reduceat(data[:, 3], starts) / counts
    out["replicas"][None] = list(map(Point, t, highest[:, 0].tolist(), n))
    out["ready"][None] = list(map(Point, t, highest[:, 1].tolist(), n))
    out["in_flight"][None] = list(map(Point, t, mean.tolist(), n))
    return out


def cold_starts(*, deployment: Deployment, start: int, end: int) -> list[DeploymentEvent]:
    return list(
        DeploymentEvent.objects.filter(
            deployment=deployment,
            kind="cold_start",
            created_at__gte=_dt(start),
            created_at__lt=_dt(end),
        ).order_by("created_at")
    )


def _dt(t: int):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, tz=UTC)


def replica_chart(
    *, deployment: Deployment, start: int, end: int, step: int, markers: list[DeploymentEvent]
) -> charts.Chart | None:
    """The chart, or None for a deployment never autoscaled (it has no samples)."""
    if (
        deployment.autoscaling is None
        and not ScaleSample.objects.filter(deployment=deployment).exists()
    ):
        return None
    fine = max(5, step // POINTS_PER_STEP)
    data = replica_series(deployment_id=deployment.pk, start=start, end=end, step=fine)
    colds = cold_starts(deployment=deployment, start=start, end=end)
    fig = go.Figure()
    styles = {
        "replicas": ("replicas wanted", {"color": charts.PALETTE[0], "width": 2, "shape": "hv"}),
        "ready": (
            "replicas ready",
            {"color": charts.PALETTE[2], "width": 2, "dash": "dash", "shape": "hv"},
        ),
        "in_flight": ("in flight (avg)", {"color": charts.PALETTE[1], "width": 1.5, "dash": "dot"}),
    }
    has_data = False
    for name, (label, line) in styles.items():
        xs, ys = charts._xy(data[name].get(None, []), fine)
        has_data = has_data or bool(xs)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name=label,
                line=line,
                connectgaps=False,
                yaxis="y2" if name == "in_flight" else "y",
            )
        )
    if colds:
        fig.add_trace(
            go.Scatter(
                x=[charts._iso(int(e.created_at.timestamp())) for e in colds],
                y=[0] * len(colds),
                mode="markers",
                name="cold start",
                marker={"symbol": "triangle-up", "size": 10, "color": charts.PALETTE[4]},
                hovertext=[e.message for e in colds],
            )
        )
    charts._layout(fig, y_title="replicas", start=start, end=end, markers=markers)
    fig.update_layout(
        yaxis2={
            "title": {"text": "in flight"},
            "overlaying": "y",
            "side": "right",
            "rangemode": "tozero",
            "showgrid": False,
        },
        margin={"l": 56, "r": 56, "t": 28, "b": 36},
    )
    total = deployment.cold_starts
    title = f"Replicas (autoscaling) and requests in flight · cold starts: {len(colds)} in range, {total} in all"
    return charts._render(fig, "chart-replicas", title, has_data)
