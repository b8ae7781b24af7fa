"""The metric names the API, the charts and the alert rules understand."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    source: str  # traffic | classification | regression | drift | probe
    unit: str
    description: str


_ALL = [
    Metric("requests", "traffic", "requests", "prediction requests answered (any status)"),
    Metric(
        "errors", "traffic", "requests", "prediction requests answered with a status of 500 or more"
    ),
    Metric("error_rate", "traffic", "ratio", "errors / requests"),
    Metric("throughput", "traffic", "req/s", "requests per second over the window"),
    Metric("latency_p50", "traffic", "ms", "median latency, from the servers' histograms"),
    Metric("latency_p95", "traffic", "ms", "95th percentile latency"),
    Metric("latency_p99", "traffic", "ms", "99th percentile latency"),
    Metric("accuracy", "classification", "ratio", "share of labeled predictions that were right"),
    Metric(
        "precision",
        "classification",
        "ratio",
        "binary (class 1) for 0/1 labels, else macro-averaged",
    ),
    Metric(
        "recall", "classification", "ratio", "binary (class 1) for 0/1 labels, else macro-averaged"
    ),
    Metric("f1", "classification", "ratio", "binary (class 1) for 0/1 labels, else macro-averaged"),
    Metric("mae", "regression", "label units", "mean absolute error of labeled predictions"),
    Metric("rmse", "regression", "label units", "root mean squared error of labeled predictions"),
    Metric(
        "drift_psi",
        "drift",
        "PSI",
        "population stability index of inputs vs the reference (largest feature)",
    ),
    Metric("probe_latency_ms", "probe", "ms", "mean latency of successful scheduled probes"),
    Metric("probe_success_rate", "probe", "ratio", "share of scheduled probes answered with 200"),
]

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
TRAFFIC = [m.name for m in _ALL if m.source == "traffic"]
CLASSIFICATION = [m.name for m in _ALL if m.source == "classification"]
REGRESSION = [m.name for m in _ALL if m.source == "regression"]
