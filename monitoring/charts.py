"""Plotly figures of one deployment: one line per model version, markers for deploys and
rollbacks. Rendered with ``include_plotlyjs=False``: the page loads the local
``monitoring/plotly.min.js`` (see staticfiles.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import plotly.graph_objects as go
import plotly.io as pio

from deployments.models import DeploymentEvent

from .selectors import Point, Series

PALETTE = ["#2456c9", "#d9730d", "#1d7a46", "#8e44ad", "#c0342b", "#0f8b8d", "#7a5500", "#596273"]
DASH = {
    "latency_p50": "dot",
    "latency_p95": "solid",
    "latency_p99": "dash",
    "mae": "solid",
    "rmse": "dash",
}
LABEL = {
    "latency_p50": "p50",
    "latency_p95": "p95",
    "latency_p99": "p99",
    "mae": "MAE",
    "rmse": "RMSE",
}
CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
}


@dataclass
class MarkerGroup:
    x: str
    label: str
    hover: str
    rollback: bool


# Markers closer than this share of the range are drawn as one, so labels never overlap.
MARKER_MIN_GAP = 0.02


def _marker_label(event: DeploymentEvent) -> str:
    rollback = event.kind != "traffic"
    label = (
        ("auto rollback" if event.kind == "auto_rollback" else "rollback") if rollback else "deploy"
    )
    if event.revision is not None:
        label += f" r{event.revision.number} (v{event.revision.model_version.version})"
    return label


def marker_groups(markers: list[DeploymentEvent], *, start: int, end: int) -> list[MarkerGroup]:
    """Deploy and rollback markers, those within MARKER_MIN_GAP of the range of each other
    merged into one line at the last of them, labelled with the count and the outcome."""
    gap = max(1.0, (end - start) * MARKER_MIN_GAP)
    clusters: list[list[DeploymentEvent]] = []
    for event in sorted(markers, key=lambda e: e.created_at):
        t = event.created_at.timestamp()
        if clusters and t - clusters[-1][-1].created_at.timestamp() < gap:
            clusters[-1].append(event)
        else:
            clusters.append([event])
    out = []
    for cluster in clusters:
        last = cluster[-1]
        labels = [_marker_label(e) for e in cluster]
        label = labels[-1] if len(cluster) == 1 else f"{len(cluster)} events, last: {labels[-1]}"
        rollbacks = [lab for e, lab in zip(cluster, labels, strict=True) if e.kind != "traffic"]
        if rollbacks and last.kind == "traffic":
            # the traffic switch a rollback causes must not hide the rollback itself
            label += f" after {rollbacks[-1]}"
        out.append(
            MarkerGroup(
                x=last.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                label=label,
                hover="<br>".join(
                    f"{e.created_at.astimezone(UTC):%H:%M:%S} {lab}"
                    for e, lab in zip(cluster, labels, strict=True)
                ),
                rollback=any(e.kind != "traffic" for e in cluster),
            )
        )
    return out


def hourly_xy(points: list[Point], *, end: int, since: float | None = None) -> tuple[list, list]:
    """An hourly value drawn across the hour it covers (from its start, or from ``since``
    when the version began serving within that hour, to its end or ``end``)."""
    xs: list = []
    ys: list = []
    previous = None
    for p in sorted(points, key=lambda p: p.t):
        hour = p.t // 3600 * 3600
        x0 = hour if since is None or since <= hour or since >= hour + 3600 else int(since)
        x1 = min(hour + 3600, end)
        if previous is not None and hour > previous:
            xs.append(_iso(previous))
            ys.append(None)
        xs += [_iso(x0), _iso(x1)]
        ys += [p.value, p.value]
        previous = hour + 3600
    return xs, ys


@dataclass
class Chart:
    id: str
    title: str
    html: str
    has_data: bool


def _xy(points: list[Point], step: int, scale: float = 1.0) -> tuple[list, list]:
    """x as ISO times, y scaled; a gap longer than a step breaks the line."""
    xs: list = []
    ys: list = []
    previous = None
    for p in sorted(points, key=lambda p: p.t):
        if previous is not None and p.t - previous > step:
            xs.append(_iso(previous + step))
            ys.append(None)
        xs.append(_iso(p.t))
        ys.append(p.value * scale)
        previous = p.t
    return xs, ys


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _color(version: int | None, versions: list[int | None]) -> str:
    return PALETTE[versions.index(version) % len(PALETTE)] if version in versions else PALETTE[0]


def _layout(
    fig: go.Figure,
    *,
    y_title: str,
    start: int,
    end: int,
    markers: list[DeploymentEvent],
    y_range: list | None = None,
    hlines: tuple[float, ...] = (),
) -> None:
    shapes, annotations = [], []
    for y in hlines:
        shapes.append(
            {
                "type": "line",
                "xref": "paper",
                "yref": "y",
                "x0": 0,
                "x1": 1,
                "y0": y,
                "y1": y,
                "line": {"color": "#e5a400", "width": 1, "dash": "dot"},
            }
        )
    for group in marker_groups(markers, start=start, end=end):
        color = "#c0342b" if group.rollback else "#667085"
        shapes.append(
            {
                "type": "line",
                "xref": "x",
                "yref": "paper",
                "x0": group.x,
                "x1": group.x,
                "y0": 0,
                "y1": 1,
                "line": {"color": color, "width": 1, "dash": "dot"},
            }
        )
        annotations.append(
            {
                "x": group.x,
                "y": 1,
                "xref": "x",
                "yref": "paper",
                "text": group.label,
                "hovertext": group.hover,
                "showarrow": False,
                "xanchor": "left",
                "yanchor": "top",
                "textangle": -90,
                "font": {"size": 10, "color": color},
            }
        )
    fig.update_layout(
        template="none",
        height=280,
        margin={"l": 56, "r": 16, "t": 28, "b": 36},
        font={
            "family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
            "size": 12,
            "color": "#1d2430",
        },
        paper_bgcolor="#ffffff",
        plot_bgcolor="#ffffff",
        hovermode="x unified",
        legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom", "font": {"size": 11}},
        xaxis={
            "type": "date",
            "range": [_iso(start), _iso(end)],
            "gridcolor": "#eef0f4",
            "linecolor": "#dde1e7",
        },
        yaxis={
            "title": {"text": y_title},
            "gridcolor": "#eef0f4",
            "zerolinecolor": "#dde1e7",
            "rangemode": "tozero",
            **({"range": y_range} if y_range else {}),
        },
        shapes=shapes,
        annotations=annotations,
    )


def _render(fig: go.Figure, chart_id: str, title: str, has_data: bool) -> Chart:
    html = pio.to_html(
        fig,
        include_plotlyjs=False,
        full_html=False,
        div_id=chart_id,
        config=CONFIG,
        default_height=280,
    )
    return Chart(chart_id, title, html, has_data)


def _line_chart(
    chart_id: str,
    title: str,
    series_by_name: dict[str, Series],
    *,
    y_title: str,
    step: int,
    start: int,
    end: int,
    markers: list[DeploymentEvent],
    versions: list[int | None],
    scale: float = 1.0,
    y_range: list | None = None,
    shape: str = "linear",
    hlines: tuple[float, ...] = (),
) -> Chart:
    fig = go.Figure()
    has_data = False
    for name, series in series_by_name.items():
        for version in sorted(series, key=lambda v: v or 0):
            xs, ys = _xy(series[version], step, scale)
            has_data = has_data or bool(xs)
            suffix = f" {LABEL.get(name, name)}" if len(series_by_name) > 1 else ""
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers" if len(xs) < 60 else "lines",
                    name=f"v{version}{suffix}" if version is not None else f"all{suffix}",
                    legendgroup=f"v{version}",
                    line={
                        "color": _color(version, versions),
                        "dash": DASH.get(name, "solid"),
                        "shape": shape,
                        "width": 2 if DASH.get(name) != "dot" else 1.5,
                    },
                    marker={"size": 4},
                    connectgaps=False,
                )
            )
    _layout(
        fig, y_title=y_title, start=start, end=end, markers=markers, y_range=y_range, hlines=hlines
    )
    return _render(fig, chart_id, title, has_data)


def _drift_chart(
    series: Series,
    *,
    start: int,
    end: int,
    markers: list[DeploymentEvent],
    versions: list[int | None],
) -> Chart:
    deployed: dict[int, float] = {}
    for event in markers:
        if event.kind == "traffic" and event.revision is not None:
            deployed[event.revision.model_version.version] = event.created_at.timestamp()
    fig = go.Figure()
    has_data = False
    for version in sorted(series, key=lambda v: v or 0):
        xs, ys = hourly_xy(series[version], end=end, since=deployed.get(version))
        has_data = has_data or bool(xs)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name=f"v{version}" if version is not None else "all",
                legendgroup=f"v{version}",
                line={"color": _color(version, versions), "width": 2},
                connectgaps=False,
            )
        )
    _layout(fig, y_title="PSI", start=start, end=end, markers=markers, hlines=(0.1, 0.25))
    return _render(
        fig,
        "chart-drift",
        "Input drift per hour (largest feature PSI; 0.1 and 0.25 dotted)",
        has_data,
    )


def deployment_charts(
    *,
    data: dict[str, Series],
    start: int,
    end: int,
    step: int,
    markers: list[DeploymentEvent],
    task: str | None = None,
) -> list[Chart]:
    """The charts of one deployment; ``task`` (classification, regression or None when
    unknown) picks accuracy or MAE/RMSE, else whichever has data."""
    versions = sorted({v for series in data.values() for v in series}, key=lambda v: v or 0)
    common = {"step": step, "start": start, "end": end, "markers": markers, "versions": versions}
    charts = [
        _line_chart(
            "chart-latency",
            "Latency percentiles (p50 dotted, p95 solid, p99 dashed)",
            {n: data[n] for n in ("latency_p50", "latency_p95", "latency_p99")},
            y_title="ms",
            **common,
        ),
        _line_chart(
            "chart-throughput",
            "Throughput",
            {"throughput": data["throughput"]},
            y_title="requests / s",
            **common,
        ),
        _line_chart(
            "chart-errors",
            "Error rate (5xx)",
            {"error_rate": data["error_rate"]},
            y_title="%",
            scale=100.0,
            **common,
        ),
    ]
    has_accuracy, has_mae = any(data["accuracy"].values()), any(data["mae"].values())
    if task == "classification" or (task is None and (has_accuracy or not has_mae)):
        charts.append(
            _line_chart(
                "chart-accuracy",
                "Accuracy from ground truth",
                {"accuracy": data["accuracy"]},
                y_title="accuracy",
                y_range=[0, 1.02],
                **common,
            )
        )
    if task == "regression" or (task is None and has_mae):
        charts.append(
            _line_chart(
                "chart-regression",
                "Regression error (MAE solid, RMSE dashed)",
                {"mae": data["mae"], "rmse": data["rmse"]},
                y_title="label units",
                **common,
            )
        )
    drift = _drift_chart(
        data["drift_psi"], start=start, end=end, markers=markers, versions=versions
    )
    charts.append(drift)
    charts.append(
        _line_chart(
            "chart-probes",
            "Scheduled probes (mean latency)",
            {"probe_latency_ms": data["probe_latency_ms"]},
            y_title="ms",
            **common,
        )
    )
    return charts


CHART_METRICS = [
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "throughput",
    "error_rate",
    "accuracy",
    "mae",
    "rmse",
    "drift_psi",
    "probe_latency_ms",
]
