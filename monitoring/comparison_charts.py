"""The A/B comparison's charts (monitoring/comparison.py): both variants side by side,
latency percentiles, and accuracy and error rate with their 95 % intervals."""

from __future__ import annotations

import plotly.graph_objects as go

from .charts import PALETTE, Chart, _render


def _bars(name: str, x: list[str], y: list, color: str, ci: list | None = None) -> go.Bar:
    error = None
    if ci is not None:
        error = {
            "type": "data",
            "symmetric": False,
            "array": [
                None if (v is None or c is None) else c[1] - v for v, c in zip(y, ci, strict=True)
            ],
            "arrayminus": [
                None if (v is None or c is None) else v - c[0] for v, c in zip(y, ci, strict=True)
            ],
            "color": "#333",
        }
    return go.Bar(name=name, x=x, y=y, marker_color=color, error_y=error)


def _layout(fig: go.Figure, y_title: str, y_range=None) -> None:
    fig.update_layout(
        barmode="group",
        margin={"l": 50, "r": 10, "t": 10, "b": 40},
        legend={"orientation": "h", "y": -0.2},
        paper_bgcolor="white",
        plot_bgcolor="white",
        yaxis={"title": y_title, "gridcolor": "#eef0f3", "rangemode": "tozero",
               **({"range": y_range} if y_range else {})},
    )  # fmt: skip


def comparison_charts(comparison: dict) -> list[Chart]:
    a, b = comparison["a"], comparison["b"]
    names = [f"v{a['version']} (A)", f"v{b['version']} (B)"]
    latency = go.Figure()
    for variant, name, color in zip((a, b), names, PALETTE, strict=False):
        lat = variant["latency_ms"]
        latency.add_trace(
            _bars(name, ["p50", "p95", "p99"], [lat["p50"], lat["p95"], lat["p99"]], color)
        )
    _layout(latency, "ms")
    accuracy = go.Figure()
    errors = go.Figure()
    for variant, name, color in zip((a, b), names, PALETTE, strict=False):
        accuracy.add_trace(
            _bars(name, ["accuracy"], [variant["accuracy"]], color, ci=[variant["accuracy_ci"]])
        )
        rate, ci = variant["error_rate"], variant["error_ci"]
        errors.add_trace(
            _bars(
                name,
                ["error rate"],
                [None if rate is None else rate * 100],
                color,
                ci=[None if ci is None else (ci[0] * 100, ci[1] * 100)],
            )
        )
    _layout(accuracy, "accuracy (95 % CI)", [0, 1.05])
    _layout(errors, "% of requests (95 % CI)")
    has_latency = any(v["latency_ms"]["p50"] is not None for v in (a, b))
    return [
        _render(latency, "chart-ab-latency", "Latency by variant", has_latency),
        _render(
            accuracy,
            "chart-ab-accuracy",
            "Accuracy from late labels by variant",
            any(v["accuracy"] is not None for v in (a, b)),
        ),
        _render(
            errors,
            "chart-ab-errors",
            "Error rate (5xx) by variant",
            any(v["error_rate"] is not None for v in (a, b)),
        ),
    ]
