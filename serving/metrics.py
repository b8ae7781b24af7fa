"""Prometheus metrics of one server process, rendered in the text exposition format.

Hand-written (no client library) because the hot path only needs a dict increment and a
bisect; everything is touched from the event loop thread only.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Histogram:
    """Cumulative-bucket histogram (buckets counted individually, summed when rendered)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        lines = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{{labels}{sep}le="{_number(bound)}"}} {running}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{braces} {repr(self.sum)}")
        lines.append(f"{name}_count{braces} {self.count}")
        return lines


class Metrics:
    """All metrics of the process; `render()` is the body of GET /metrics."""

    def __init__(self, model_name: str, model_version: str) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.start_time = time.time()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.in_flight = 0
        self.predictions = 0
        self.model_errors = 0
        self.model_load_seconds: float | None = None
        self.loader: str | None = None
        self.ready = False
        self.log_dropped = lambda: 0
        self.log_buffered = lambda: 0
        self.log_bytes = lambda: 0
        self.log_max_bytes = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        histogram = self.latency.get(endpoint)
        if histogram is None:
            histogram = self.latency[endpoint] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)

    def render(self) -> bytes:
        model = _labels(name=self.model_name, version=self.model_version)
        out = [
            "# HELP serving_requests_total HTTP requests by endpoint and status code.",
            "# TYPE serving_requests_total counter",
        ]
        for (endpoint, status), count in sorted(self.requests.items()):
            out.append(
                f"serving_requests_total{{{_labels(endpoint=endpoint, status=str(status))}}} {count}"
            )
        out += [
            "# HELP serving_request_duration_seconds Time from request received to response "
            "written.",
            "# TYPE serving_request_duration_seconds histogram",
        ]
        for endpoint, histogram in sorted(self.latency.items()):
            out += histogram.render("serving_request_duration_seconds", _labels(endpoint=endpoint))
        out += [
            "# HELP serving_batch_size Rows per model call.",
            "# TYPE serving_batch_size histogram",
            *self.batch_size.render("serving_batch_size", ""),
            "# HELP serving_inflight_requests Requests received and not yet answered.",
            "# TYPE serving_inflight_requests gauge",
            f"serving_inflight_requests {self.in_flight}",
            "# HELP serving_predictions_total Rows predicted.",
            "# TYPE serving_predictions_total counter",
            f"serving_predictions_total {self.predictions}",
            "# HELP serving_model_errors_total Model calls that raised.",
            "# TYPE serving_model_errors_total counter",
            f"serving_model_errors_total {self.model_errors}",
            "# HELP serving_model_info The model this process serves.",
            "# TYPE serving_model_info gauge",
            f"serving_model_info{{{model}}} 1",
            "# HELP serving_model_ready 1 once the model loaded and warmed up.",
            "# TYPE serving_model_ready gauge",
            f"serving_model_ready {int(self.ready)}",
        ]
        if self.loader is not None:
            out += [
                "# HELP serving_model_loader_info How the model was loaded: sklearn-skops, "
                "sklearn-pickle, sklearn-cloudpickle or onnx without MLflow, else pyfunc.",
                "# TYPE serving_model_loader_info gauge",
                f"serving_model_loader_info{{{_labels(loader=self.loader)}}} 1",
            ]
        if self.model_load_seconds is not None:
            out += [
                "# HELP serving_model_load_seconds Time to load the model and warm it up.",
                "# TYPE serving_model_load_seconds gauge",
                f"serving_model_load_seconds {self.model_load_seconds!r}",
            ]
        out += [
            "# HELP serving_prediction_log_dropped_total Prediction records dropped because "
            "the buffer was full.",
            "# TYPE serving_prediction_log_dropped_total counter",
            f"serving_prediction_log_dropped_total {self.log_dropped()}",
            "# HELP serving_prediction_log_buffered Prediction records in the buffer.",
            "# TYPE serving_prediction_log_buffered gauge",
            f"serving_prediction_log_buffered {self.log_buffered()}",
            "# HELP serving_prediction_log_bytes Bytes the prediction log's records hold.",
            "# TYPE serving_prediction_log_bytes gauge",
            f"serving_prediction_log_bytes {self.log_bytes()}",
            "# HELP serving_prediction_log_max_bytes The most bytes the prediction log holds.",
            "# TYPE serving_prediction_log_max_bytes gauge",
            f"serving_prediction_log_max_bytes {self.log_max_bytes}",
            "# HELP serving_process_start_time_seconds Start time of the process (unix seconds).",
            "# TYPE serving_process_start_time_seconds gauge",
            f"serving_process_start_time_seconds {self.start_time!r}",
        ]
        return ("\n".join(out) + "\n").encode()
