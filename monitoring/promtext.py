"""Reading the model server's ``/metrics`` (Prometheus text exposition format 0.0.4).

Only what monitoring needs is extracted, into a ``ServingCounters`` snapshot: requests and
5xx responses on the prediction endpoints, their latency histogram (mapped onto the
server's bucket bounds), the process start time (to see restarts) and the version served.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field

from serving.metrics import LATENCY_BUCKETS

# The route templates of the prediction endpoints (serving/app.py); /metrics, /ping,
# /predictions and the rest are the control plane's own traffic, not the model's.
PREDICTION_ENDPOINTS = frozenset(
    {"/invocations", "/v1/models/{name}:predict", "/v2/models/{name}/infer"}
)

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


class ParseError(ValueError):
    """The body is not the text exposition format."""


@dataclass
class ServingCounters:
    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1)
    )  # cumulative
    process_start: float | None = None
    version: str | None = None

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_sum": self.latency_sum,
            "buckets": list(self.buckets),
        }


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            raise ParseError(f"line {number} is not a sample: {line[:80]!r}")
        name, _, raw_labels, raw_value = match.groups()
        labels: dict[str, str] = {}
        if raw_labels:
            pos = 0
            while pos < len(raw_labels):
                label = _LABEL.match(raw_labels, pos)
                if not label:
                    raise ParseError(f"line {number}: bad labels {raw_labels[:80]!r}")
                labels[label.group(1)] = _unescape(label.group(2))
                pos = label.end()
        try:
            value = float(raw_value)
        except ValueError:
            raise ParseError(f"line {number}: bad value {raw_value!r}") from None
        samples.append((name, labels, value))
    return samples


def serving_counters(text: str) -> ServingCounters:
    """The snapshot monitoring keeps from one scrape."""
    out = ServingCounters()
    bounds = list(LATENCY_BUCKETS)
    # Cumulative counts per (endpoint, le); summed over the prediction endpoints below.
    per_endpoint: dict[str, list[tuple[float, float]]] = {}
    for name, labels, value in parse(text):
        if name == "serving_requests_total":
            if labels.get("endpoint") in PREDICTION_ENDPOINTS:
                out.requests += int(value)
                try:
                    if int(labels.get("status", "0")) >= 500:
                        out.errors += int(value)
                except ValueError:
                    pass
        elif name == "serving_request_duration_seconds_bucket":
            endpoint = labels.get("endpoint")
            if endpoint in PREDICTION_ENDPOINTS:
                le = labels.get("le", "+Inf")
                bound = math.inf if le in ("+Inf", "Inf", "inf") else float(le)
                per_endpoint.setdefault(endpoint, []).append((bound, value))
        elif name == "serving_request_duration_seconds_sum":
            if labels.get("endpoint") in PREDICTION_ENDPOINTS:
                out.latency_sum += value
        elif name == "serving_process_start_time_seconds":
            out.process_start = value
        elif name == "serving_model_info":
            out.version = labels.get("version")
    for series in per_endpoint.values():
        # Map the server's cumulative buckets onto ours: a count at bound ``le`` is known to
        # be at most ``le``, so it lands in the first of our buckets at or above ``le``.
        series.sort()
        previous = 0.0
        for bound, cumulative in series:
            count = int(cumulative - previous)
            previous = cumulative
            slot = (
                len(bounds) if math.isinf(bound) else bisect.bisect_left(bounds, bound * (1 - 1e-9))
            )
            for i in range(slot, len(out.buckets)):
                out.buckets[i] += count
    return out
