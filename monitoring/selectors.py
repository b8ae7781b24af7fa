"""Monitoring reads: metric series over a range and step, the fleet at a glance, alert
rules and their history, and the control plane's own Prometheus exposition.

Windows: point ``i`` of a series aggregates ``[from + i*step, from + (i+1)*step)`` (the last
one ends at ``to``); a step at least as long as the range gives one point. A rollup row
belongs to the window its start falls in (the minute or hour holding ``from`` counts in the
first window). Traffic is read from the coarsest table that fits the step and alignment
and still holds ``from``: hours, minutes, else raw samples.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import numpy as np
from django.conf import settings
from django.db import connection
from django.db.models import Count, QuerySet, Sum
from django.utils import timezone

from controlplane.lib.errors import NotFound
from deployments.models import Deployment, DeploymentEvent, Instance

from . import catalog, scoring
from .models import (
    BUCKET_FIELDS,
    AlertEvent,
    AlertNotification,
    AlertRule,
    DriftHour,
    DriftReference,
    FeedbackMinute,
    FeedbackPair,
    ProbeResult,
    TrafficHour,
    TrafficMinute,
    TrafficSample,
)

MAX_POINTS = 50_000
QUANTILES = {"latency_p50": 0.5, "latency_p95": 0.95, "latency_p99": 0.99}
MARKER_KINDS = ("traffic", "rollback", "auto_rollback")


class Point(NamedTuple):
    """One window of a series (a tuple: tens of thousands are made per query)."""

    t: int  # unix seconds: start of the window
    value: float
    n: int  # samples behind the value (requests, labeled rows, inputs, probes)


Series = dict[int | None, list[Point]]  # by model version (None: all versions together)


def iso_times(times: list[int]) -> list[str]:
    """ISO 8601 UTC ('...Z') of unix seconds, vectorized (43,200 points in milliseconds)."""
    if not times:
        return []
    return [
        f"{t}Z"
        for t in np.datetime_as_string(np.array(times, dtype="datetime64[s]"), unit="s").tolist()
    ]


# --- traffic ------------------------------------------------------------------------------------


def _traffic_source(start: int, step: int, now: float) -> tuple[type, str, int]:
    raw_ok = start >= now - settings.CONTROLPLANE_METRICS_RAW_RETENTION_HOURS * 3600
    minute_ok = start >= now - settings.CONTROLPLANE_METRICS_MINUTE_RETENTION_DAYS * 86400
    if step % 3600 == 0 and start % 3600 == 0:
        return TrafficHour, "bucket", 3600
    if step % 60 == 0 and start % 60 == 0 and minute_ok:
        return TrafficMinute, "bucket", 60
    if raw_ok:
        return TrafficSample, "ts", 1
    if minute_ok:
        return TrafficMinute, "bucket", 60
    return TrafficHour, "bucket", 3600


def _traffic_rows(
    deployment_id: int,
    start: int,
    end: int,
    step: int,
    version: int | None,
    by_version: bool,
    names: list[str],
) -> np.ndarray:
    """Per window (and version): window, version, requests, errors, then the latency
    percentiles asked for.

    All versions together come from the rollups' version-0 rows. A step equal to the rollup's
    resolution reads each row's stored percentiles: the 30-day, one-minute query is 43,200
    rows of five numbers through the index (deployment, model_version, bucket). Other steps
    read the bucket counts, summed per window here."""
    model, column, resolution = _traffic_source(start, step, time.time())
    qn = connection.ops.quote_name
    # A raw sample ends at ``ts``: it belongs to the window holding the second before ``ts``
    # (as in the rollups, which put the end of an interval in the minute it ends in).
    shift = 1 if resolution == 1 else 0
    where = f"{qn('deployment_id')} = %s AND {qn(column)} > %s AND {qn(column)} < %s"
    params: list = [deployment_id, start - resolution + shift, end + shift]
    if version is not None:
        where += f" AND {qn('model_version')} = %s"
        params.append(version)
    elif model is not TrafficSample:
        where += f" AND {qn('model_version')} {'>' if by_version else '='} 0"
    wanted = [name for name in names if name in QUANTILES]
    stored = model is not TrafficSample and step == resolution and start % resolution == 0
    fields = [column, "model_version", "requests", "errors"]
    fields += (
        [name.removeprefix("latency_") for name in wanted]
        if stored
        else (BUCKET_FIELDS if wanted else [])
    )
    sql = f"SELECT {', '.join(qn(f) for f in fields)} FROM {qn(model._meta.db_table)} WHERE {where}"
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    if not rows:
        return np.zeros((0, 4 + len(wanted)), dtype=np.float64)
    data = np.array(rows, dtype=np.float64)  # NULL percentiles become NaN
    data[:, 0] = (np.maximum(data[:, 0] - shift, start) - start) // step
    if not by_version:
        data[:, 1] = -1
    if stored:
        return data
    order = np.lexsort((data[:, 0], data[:, 1]))
    data = data[order]
    keys = data[:, :2]
    starts = np.concatenate(([0], np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1))
    sums = np.add.reduceat(data[:, 2:], starts, axis=0)
    out = [keys[starts], sums[:, :2]]
    out += [scoring.latency_quantiles(sums[:, 2:], QUANTILES[name])[:, None] for name in wanted]
    return np.concatenate(out, axis=1)


def _traffic_values(
    deployment_id: int,
    names: list[str],
    start: int,
    end: int,
    step: int,
    version: int | None,
    by_version: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, dict]:
    """Columns: window start, version, samples, and per name its values and where it has one."""
    rows = _traffic_rows(deployment_id, start, end, step, version, by_version, names)
    rows = rows[np.lexsort((rows[:, 0], rows[:, 1]))]
    t = start + rows[:, 0].astype(np.int64) * step
    v = rows[:, 1].astype(np.int64)
    n, errors = rows[:, 2], rows[:, 3]
    values: dict[str, np.ndarray] = {}
    has: dict[str, np.ndarray] = {}
    everywhere = np.ones(len(n), dtype=bool)
    for name in names:
        if name == "requests":
            values[name], has[name] = n, everywhere
        elif name == "errors":
            values[name], has[name] = errors, everywhere
        elif name == "throughput":
            values[name], has[name] = n / np.maximum(1, np.minimum(step, end - t)), everywhere
        elif name == "error_rate":
            with np.errstate(invalid="ignore", divide="ignore"):
                values[name], has[name] = errors / n, n > 0
    column = 4
    for name in names:
        if name in QUANTILES:
            q = rows[:, column]
            column += 1
            values[name], has[name] = q, (n > 0) & ~np.isnan(q)
    return t, v, n, values, has


def traffic_series(
    *,
    deployment_id: int,
    names: Iterable[str],
    start: int,
    end: int,
    step: int,
    version: int | None = None,
    by_version: bool = False,
) -> dict[str, Series]:
    names = list(names)
    t, v, n, values, has = _traffic_values(
        deployment_id, names, start, end, step, version, by_version
    )
    out: dict[str, Series] = {}
    for name in names:
        series: dict[int | None, list[Point]] = {}
        for key in np.unique(v).tolist() if by_version else [None]:
            mask = has[name] & (v == key) if by_version else has[name]
            points = list(
                map(
                    Point,
                    t[mask].tolist(),
                    values[name][mask].tolist(),
                    n[mask].astype(np.int64).tolist(),
                )
            )
            if points:
                series[key] = points
        out[name] = series
    return out


# --- ground truth -------------------------------------------------------------------------------


def _classification(
    deployment_id, names, start, end, step, version, by_version
) -> dict[str, Series]:
    qs = FeedbackMinute.objects.filter(
        deployment_id=deployment_id, bucket__gt=start - 60, bucket__lt=end
    )
    if version is not None:
        qs = qs.filter(model_version=version)
    confusion: dict[tuple, Counter] = defaultdict(Counter)
    for bucket, v, matrix in qs.values_list("bucket", "model_version", "confusion"):
        window = (max(bucket, start) - start) // step
        key = (v if by_version else None, window)
        for y_true, y_pred, count in matrix:
            confusion[key][(y_true, y_pred)] += count
    out: dict[str, Series] = {name: defaultdict(list) for name in names}
    for (v, window), counts in sorted(confusion.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        scores = scoring.classification_scores(counts)
        if scores is None:
            continue
        n = sum(counts.values())
        for name in names:
            out[name][v].append(Point(start + window * step, scores[name], n))
    return {name: dict(series) for name, series in out.items()}


def _regression(deployment_id, names, start, end, step, version, by_version) -> dict[str, Series]:
    qs = FeedbackPair.objects.filter(
        deployment_id=deployment_id,
        y_true_num__isnull=False,
        ts__gte=datetime.fromtimestamp(start, tz=UTC),
        ts__lt=datetime.fromtimestamp(end, tz=UTC),
    )
    if version is not None:
        qs = qs.filter(model_version=version)
    pairs: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    # Prediction order, so the sums run in the order scikit-learn would get the pairs.
    for ts, v, y_true, y_pred in qs.order_by("ts", "prediction_id", "row").values_list(
        "ts", "model_version", "y_true_num", "y_pred_num"
    ):
        window = (int(ts.timestamp()) - start) // step
        bucket = pairs[(v if by_version else None, window)]
        bucket[0].append(y_true)
        bucket[1].append(y_pred)
    out: dict[str, Series] = {name: defaultdict(list) for name in names}
    for (v, window), (y_true, y_pred) in sorted(
        pairs.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])
    ):
        scores = scoring.regression_scores(y_true, y_pred)
        for name in names:
            out[name][v].append(Point(start + window * step, scores[name], len(y_true)))
    return {name: dict(series) for name, series in out.items()}


# --- drift and probes -----------------------------------------------------------------------------


def drift_reference_reason(n_rows: int) -> str:
    minimum = settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS
    return (
        f"no verdict: the reference has {n_rows} row{'s' if n_rows != 1 else ''}, "
        f"at least {minimum} are needed (upload a reference dataset)"
    )


@dataclass
class DriftReferenceStatus:
    version: int
    source: str  # "input_example", "dataset" or "" (none yet)
    n_rows: int
    features: list[str]
    usable: bool
    reason: str


def drift_reference_status(*, deployment: Deployment) -> DriftReferenceStatus | None:
    """The active drift reference of the version a deployment serves, and whether drift is
    judged against it (CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS)."""
    revision = deployment.serving_revision or deployment.desired_revision
    if revision is None:
        return None
    mv = revision.model_version
    reference = DriftReference.objects.filter(model_version=mv, active=True).first()
    if reference is None:
        return DriftReferenceStatus(
            version=mv.version,
            source="",
            n_rows=0,
            features=[],
            usable=False,
            reason="no verdict: no reference yet (the model's input example is used once "
            "inputs arrive; upload a reference dataset)",
        )
    usable = reference.n_rows >= settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS
    return DriftReferenceStatus(
        version=mv.version,
        source=reference.source,
        n_rows=reference.n_rows,
        features=sorted(reference.profile),
        usable=usable,
        reason="" if usable else drift_reference_reason(reference.n_rows),
    )


def _drift(deployment_id, start, end, step, version, by_version, feature=None) -> Series:
    qs = DriftHour.objects.filter(
        deployment_id=deployment_id, bucket__gt=start - 3600, bucket__lt=end
    )
    if version is not None:
        qs = qs.filter(model_version=version)
    if feature:
        qs = qs.filter(feature=feature)
    merged: dict[tuple, list[int]] = {}
    rows_seen: dict[tuple, int] = defaultdict(int)
    references: set[int] = set()
    for bucket, v, ref, feat, counts, n in qs.values_list(
        "bucket", "model_version", "reference_id", "feature", "counts", "n"
    ):
        window = (max(bucket, start) - start) // step
        key = (v if by_version else None, window, ref, feat)
        merged[key] = (
            [a + b for a, b in zip(merged[key], counts, strict=False)]
            if key in merged
            else list(counts)
        )
        rows_seen[key] += n
        references.add(ref)
    profiles = dict(
        DriftReference.objects.filter(
            pk__in=references, n_rows__gte=settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS
        ).values_list("pk", "profile")
    )
    best: dict[tuple, tuple[float, int]] = {}
    for (v, window, ref, feat), counts in merged.items():
        spec = profiles.get(ref, {}).get(feat)
        value = (
            scoring.psi(spec["expected"], counts)
            if spec and len(spec["expected"]) == len(counts)
            else None
        )
        if value is None:
            continue
        key = (v, window)
        n = rows_seen[(v, window, ref, feat)]
        if key not in best or value > best[key][0]:
            best[key] = (value, max(n, best.get(key, (0, 0))[1]))
    out: Series = defaultdict(list)
    for (v, window), (value, n) in sorted(best.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        out[v].append(Point(start + window * step, value, n))
    return dict(out)


def _probes(deployment_id, names, start, end, step, version, by_version) -> dict[str, Series]:
    qs = ProbeResult.objects.filter(
        deployment_id=deployment_id,
        ts__gte=datetime.fromtimestamp(start, tz=UTC),
        ts__lt=datetime.fromtimestamp(end, tz=UTC),
    )
    if version is not None:
        qs = qs.filter(model_version=version)
    groups: dict[tuple, list] = defaultdict(list)
    for ts, v, ok, latency in qs.values_list("ts", "model_version", "ok", "latency_ms"):
        groups[(v if by_version else None, (int(ts.timestamp()) - start) // step)].append(
            (ok, latency)
        )
    out: dict[str, Series] = {name: defaultdict(list) for name in names}
    for (v, window), results in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        t = start + window * step
        good = [lat for ok, lat in results if ok and lat is not None]
        if "probe_success_rate" in names:
            out["probe_success_rate"][v].append(
                Point(t, sum(1 for ok, _ in results if ok) / len(results), len(results))
            )
        if "probe_latency_ms" in names and good:
            out["probe_latency_ms"][v].append(Point(t, sum(good) / len(good), len(results)))
    return {name: dict(series) for name, series in out.items()}


# --- the entry points -------------------------------------------------------------------------------


def metric_series(
    *,
    deployment_id: int,
    names: Iterable[str],
    start: int,
    end: int,
    step: int,
    version: int | None = None,
    by_version: bool = False,
    feature: str | None = None,
) -> dict[str, Series]:
    """Points of each named metric; ``by_version`` keeps model versions apart."""
    names = list(names)
    by_source: dict[str, list[str]] = defaultdict(list)
    for name in names:
        by_source[catalog.METRICS[name].source].append(name)
    args = (deployment_id, start, end, step, version, by_version)
    out: dict[str, Series] = {}
    for source, group in by_source.items():
        if source == "traffic":
            out.update(
                traffic_series(
                    deployment_id=deployment_id,
                    names=group,
                    start=start,
                    end=end,
                    step=step,
                    version=version,
                    by_version=by_version,
                )
            )
        elif source == "classification":
            out.update(_classification(deployment_id, group, *args[1:]))
        elif source == "regression":
            out.update(_regression(deployment_id, group, *args[1:]))
        elif source == "drift":
            out["drift_psi"] = _drift(*args, feature=feature)
        elif source == "probe":
            out.update(_probes(deployment_id, group, *args[1:]))
    return out


def metric_points(
    *,
    deployment_id: int,
    name: str,
    start: int,
    end: int,
    step: int,
    version: int | None = None,
    feature: str | None = None,
) -> list[Point]:
    """One series over all versions (or the one asked for)."""
    series = metric_series(
        deployment_id=deployment_id,
        names=[name],
        start=start,
        end=end,
        step=step,
        version=version,
        feature=feature,
    )[name]
    return sorted(series.get(None, []), key=lambda p: p.t)


def metric_window(
    *, deployment_id: int, name: str, end: float, seconds: int, version: int | None = None
) -> tuple[float | None, int]:
    """The metric over the last ``seconds`` before ``end``, with its sample count."""
    stop = int(math.ceil(end))
    points = metric_points(
        deployment_id=deployment_id,
        name=name,
        start=stop - seconds,
        end=stop,
        step=seconds,
        version=version,
    )
    if not points:
        return None, 0
    return points[0].value, points[0].n


def metric_columns(
    *,
    deployment_id: int,
    name: str,
    start: int,
    end: int,
    step: int,
    version: int | None = None,
    feature: str | None = None,
) -> tuple[list[int], list[float]]:
    """Window starts and values of one series over all versions (or the one asked for),
    without a Python object per point for traffic metrics (43,200 points per month)."""
    if catalog.METRICS[name].source == "traffic":
        t, _v, _n, values, has = _traffic_values(
            deployment_id, [name], start, end, step, version, False
        )
        mask = has[name]
        return t[mask].tolist(), values[name][mask].tolist()
    points = metric_points(
        deployment_id=deployment_id,
        name=name,
        start=start,
        end=end,
        step=step,
        version=version,
        feature=feature,
    )
    return [p.t for p in points], [p.value for p in points]


def deployment_markers(*, deployment: Deployment, start: int, end: int) -> list[DeploymentEvent]:
    """Deploys (traffic moved to a revision) and rollbacks, for the time axis."""
    return list(
        DeploymentEvent.objects.filter(
            deployment=deployment,
            kind__in=MARKER_KINDS,
            created_at__gte=datetime.fromtimestamp(start, tz=UTC),
            created_at__lt=datetime.fromtimestamp(end, tz=UTC),
        )
        .select_related("revision__model_version")
        .order_by("created_at")
    )


def deployment_get(*, name: str) -> Deployment:
    """The deployment, or 404. Names are slugs: anything else (a NUL byte, say) cannot exist
    and never reaches the database."""
    from deployments.selectors import deployment_get as get

    if not re.fullmatch(r"[a-z0-9-]{1,63}", name or ""):
        raise NotFound(f"deployment {name[:80]!r} not found")
    return get(name=name)


# --- the fleet ----------------------------------------------------------------------------------------


@dataclass
class FleetRow:
    deployment: Deployment
    requests: int = 0
    throughput: float | None = None
    error_rate: float | None = None
    latency_p95: float | None = None
    accuracy: float | None = None
    accuracy_n: int = 0
    drift_psi: float | None = None
    drift_reason: str = ""  # why there is no drift verdict, when there is none
    probe_ok: bool | None = None
    probe_latency_ms: float | None = None
    probe_at: datetime | None = None
    firing: int = 0

    @property
    def error_percent(self) -> float | None:
        return None if self.error_rate is None else 100 * self.error_rate


def fleet_overview(*, now: datetime | None = None, traffic_seconds: int = 900) -> list[FleetRow]:
    """Every deployment's health, traffic and latency (last 15 minutes), accuracy (last 24
    hours), drift (last 2 hours), last probe and firing alerts: a fixed number of queries."""
    from deployments.selectors import deployment_list

    now = now or timezone.now()
    epoch = int(now.timestamp())
    rows = {d.pk: FleetRow(deployment=d) for d in deployment_list()}
    if not rows:
        return []
    since = (epoch - traffic_seconds) // 60 * 60
    sums = {f: Sum(f) for f in ["requests", "errors", *BUCKET_FIELDS]}
    for agg in (
        TrafficMinute.objects.filter(bucket__gte=since, model_version=0)
        .values("deployment_id")
        .annotate(**sums)
    ):
        row = rows.get(agg["deployment_id"])
        if row is None:
            continue
        n = int(agg["requests"] or 0)
        row.requests = n
        row.throughput = n / max(1, epoch - since)
        if n:
            row.error_rate = (agg["errors"] or 0) / n
            buckets = np.array([[agg[f] or 0 for f in BUCKET_FIELDS]], dtype=np.float64)
            row.latency_p95 = float(scoring.latency_quantiles(buckets, 0.95)[0])
    confusion: dict[int, Counter] = defaultdict(Counter)
    for dep, matrix in FeedbackMinute.objects.filter(bucket__gte=epoch - 86400).values_list(
        "deployment_id", "confusion"
    ):
        for y_true, y_pred, count in matrix:
            confusion[dep][(y_true, y_pred)] += count
    for dep, counts in confusion.items():
        scores = scoring.classification_scores(counts)
        if dep in rows and scores:
            rows[dep].accuracy = scores["accuracy"]
            rows[dep].accuracy_n = sum(counts.values())
    drift_since = epoch // 3600 * 3600 - 3600
    drift_rows = DriftHour.objects.filter(bucket__gte=drift_since).values_list(
        "deployment_id", "reference_id", "feature", "counts"
    )
    merged: dict[tuple, list[int]] = {}
    refs: set[int] = set()
    for dep, ref, feat, counts in drift_rows:
        key = (dep, ref, feat)
        merged[key] = (
            [a + b for a, b in zip(merged[key], counts, strict=False)]
            if key in merged
            else list(counts)
        )
        refs.add(ref)
    minimum = settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS
    profiles, small = {}, {}
    for pk, profile, n_rows in DriftReference.objects.filter(pk__in=refs).values_list(
        "pk", "profile", "n_rows"
    ):
        if n_rows >= minimum:
            profiles[pk] = profile
        else:
            small[pk] = n_rows
    for (dep, ref, feat), counts in merged.items():
        if ref in small and dep in rows:
            rows[dep].drift_reason = drift_reference_reason(small[ref])
        spec = profiles.get(ref, {}).get(feat)
        if dep in rows and spec and len(spec["expected"]) == len(counts):
            value = scoring.psi(spec["expected"], counts)
            if value is not None and (rows[dep].drift_psi is None or value > rows[dep].drift_psi):
                rows[dep].drift_psi = value
    latest = (
        ProbeResult.objects.filter(ts__gte=now - timedelta(days=1))
        .order_by("deployment_id", "-ts", "-id")
        .values_list("deployment_id", "ok", "latency_ms", "ts")
    )
    for dep, ok, latency, ts in latest:
        if dep in rows and rows[dep].probe_at is None:
            rows[dep].probe_ok, rows[dep].probe_latency_ms, rows[dep].probe_at = ok, latency, ts
    for agg in (
        AlertRule.objects.filter(state=AlertRule.State.FIRING)
        .values("deployment_id")
        .annotate(n=Count("id"))
    ):
        if agg["deployment_id"] in rows:
            rows[agg["deployment_id"]].firing = agg["n"]
    return list(rows.values())


# --- alert rules -----------------------------------------------------------------------------------------


def alert_rule_list(*, deployment: Deployment | None = None) -> QuerySet[AlertRule]:
    qs = AlertRule.objects.select_related("deployment").filter(deployment__deleted=False)
    if deployment is not None:
        qs = qs.filter(deployment=deployment)
    return qs.order_by("deployment__name", "name", "id")


def alert_rule_get(*, rule_id: int) -> AlertRule:
    rule = alert_rule_list().filter(pk=rule_id).first()
    if rule is None:
        raise NotFound(f"alert rule {rule_id} not found")
    return rule


def alert_event_list(
    *, rule: AlertRule | None = None, deployment: Deployment | None = None, limit: int = 100
) -> list[AlertEvent]:
    qs = AlertEvent.objects.select_related("rule__deployment").prefetch_related("notifications")
    if rule is not None:
        qs = qs.filter(rule=rule)
    if deployment is not None:
        qs = qs.filter(rule__deployment=deployment)
    return list(qs.order_by("-created_at", "-id")[:limit])


def notification_list(*, event: AlertEvent) -> QuerySet[AlertNotification]:
    return event.notifications.order_by("id")


def probe_list(*, deployment: Deployment, limit: int = 20) -> list[ProbeResult]:
    return list(ProbeResult.objects.filter(deployment=deployment).order_by("-ts", "-id")[:limit])


# --- the control plane's own /metrics ------------------------------------------------------------------


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_exposition(*, now: datetime | None = None) -> str:
    """Fleet gauges in the Prometheus text format (for an existing Grafana to scrape)."""
    fleet = fleet_overview(now=now, traffic_seconds=300)
    by_status = dict(
        Deployment.objects.filter(deleted=False).values_list("status").annotate(n=Count("id"))
    )
    lines = [
        "# HELP controlplane_deployments Deployments by status.",
        "# TYPE controlplane_deployments gauge",
    ]
    for status in Deployment.Status.values:
        lines.append(f'controlplane_deployments{{status="{status}"}} {by_status.get(status, 0)}')
    gauges = [
        (
            "controlplane_deployment_up",
            "1 when the deployment is ready.",
            lambda r: 1 if r.deployment.status == "ready" else 0,
        ),
        (
            "controlplane_deployment_requests_per_second",
            "Prediction requests per second (last 5 minutes).",
            lambda r: r.throughput,
        ),
        (
            "controlplane_deployment_error_ratio",
            "Share of prediction requests answered 5xx (last 5 minutes).",
            lambda r: r.error_rate,
        ),
        (
            "controlplane_deployment_latency_p95_seconds",
            "95th percentile latency (last 5 minutes).",
            lambda r: None if r.latency_p95 is None else r.latency_p95 / 1000,
        ),
        (
            "controlplane_deployment_accuracy",
            "Accuracy from ground truth (last 24 hours).",
            lambda r: r.accuracy,
        ),
        (
            "controlplane_deployment_drift_psi",
            "Largest feature PSI of inputs vs the reference (last 2 hours).",
            lambda r: r.drift_psi,
        ),
        (
            "controlplane_deployment_probe_success",
            "1 if the last scheduled probe succeeded.",
            lambda r: None if r.probe_ok is None else int(r.probe_ok),
        ),
        ("controlplane_deployment_alerts_firing", "Alert rules firing.", lambda r: r.firing),
    ]
    for name, help_text, get in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for row in fleet:
            value = get(row)
            if value is None:
                continue
            model = row.deployment.model.name
            lines.append(
                f'{name}{{deployment="{_esc(row.deployment.name)}",model="{_esc(model)}"}} {float(value)!r}'
            )
    ready = dict(
        Instance.objects.filter(state=Instance.State.READY)
        .values_list("deployment_id")
        .annotate(n=Count("id"))
    )
    desired = dict(
        Deployment.objects.filter(deleted=False).values_list("pk", "desired_revision__spec")
    )
    for name, help_text, get in (
        (
            "controlplane_deployment_replicas_ready",
            "Model server instances ready.",
            lambda r: ready.get(r.deployment.pk, 0),
        ),
        (
            "controlplane_deployment_replicas_desired",
            "Replicas the desired revision asks for.",
            lambda r: (desired.get(r.deployment.pk) or {}).get("replicas"),
        ),
    ):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for row in fleet:
            value = get(row)
            if value is None:
                continue
            model = row.deployment.model.name
            lines.append(
                f'{name}{{deployment="{_esc(row.deployment.name)}",model="{_esc(model)}"}} {float(value)!r}'
            )
    return "\n".join(lines) + "\n"


def metric_names() -> list[str]:
    return list(catalog.METRICS)


# --- Prometheus service discovery ------------------------------------------------------------

# Instances that run a process Prometheus can scrape.
_SCRAPABLE = ("starting", "ready", "unhealthy")


def instance_metrics_path(*, deployment: str, revision: int, ordinal: int) -> str:
    return f"/api/v1/prometheus/instances/{deployment}/{revision}/{ordinal}/metrics"


def prometheus_targets(*, control_plane: str, scheme: str = "http") -> list[dict]:
    """Prometheus HTTP SD target groups: every running model server and router, labelled
    deployment, model, version, revision, runtime (and ``kind``, ``replica``).

    A model server on loopback TCP is listed at its address. One on a Unix socket (sandboxed
    local server, container without a network) cannot be reached by Prometheus: it is listed
    at ``control_plane`` with a ``__metrics_path__`` the control plane answers by reading the
    server's /metrics over its socket. A router (the stable endpoint) forwards /metrics to one
    of its servers in turn, so its target is for ``up`` (is the endpoint answering) only."""
    groups: list[dict] = []
    instances = (
        Instance.objects.filter(
            deployment__deleted=False, deployment__stopped=False, state__in=_SCRAPABLE
        )
        .exclude(runtime_id="")
        .select_related("deployment__model", "revision__model_version")
        .order_by("deployment__name", "revision__number", "ordinal")
    )
    for inst in instances:
        labels = {
            "kind": "model_server",
            "deployment": inst.deployment.name,
            "model": inst.deployment.model.name,
            "version": str(inst.revision.model_version.version),
            "revision": str(inst.revision.number),
            "runtime": inst.runtime,
            "replica": str(inst.ordinal),
        }
        address = inst.address
        if address.startswith("unix:"):
            labels["__metrics_path__"] = instance_metrics_path(
                deployment=inst.deployment.name, revision=inst.revision.number, ordinal=inst.ordinal
            )
            labels["__scheme__"] = scheme
            labels["via"] = "control_plane"
            address = control_plane
        groups.append({"targets": [address], "labels": labels})
    deployments = (
        Deployment.objects.filter(deleted=False, stopped=False)
        .exclude(router_pid="")
        .select_related("model", "serving_revision__model_version")
        .order_by("name")
    )
    for d in deployments:
        revision = d.serving_revision
        groups.append(
            {
                "targets": [d.endpoint.removeprefix("http://")],
                "labels": {
                    "kind": "router",
                    "deployment": d.name,
                    "model": d.model.name,
                    "version": str(revision.model_version.version) if revision else "",
                    "revision": str(revision.number) if revision else "",
                    "runtime": d.runtime,
                },
            }
        )
    return groups


def instance_for_metrics(*, deployment: str, revision: int, ordinal: int) -> Instance:
    """The running instance whose /metrics the control plane relays to Prometheus."""
    inst = (
        Instance.objects.filter(
            deployment__name=deployment,
            deployment__deleted=False,
            revision__number=revision,
            ordinal=ordinal,
            state__in=_SCRAPABLE,
        )
        .exclude(runtime_id="")
        .first()
    )
    if inst is None:
        raise NotFound("no such running instance")
    return inst


# --- what the charts show -------------------------------------------------------------------

_CLASS_TYPES = {"long", "integer", "int32", "int64", "string", "boolean", "bool", "str"}
_REGRESSION_TYPES = {"double", "float", "float32", "float64"}


def model_task(*, model_version) -> str | None:
    """``classification``, ``regression`` or None (unknown), from a ``task`` tag of the
    version or the types of its signature's outputs (integers and strings: classes)."""
    tags = model_version.tags or {}
    for key in ("task", "mlflow.task", "model_task"):
        value = str(tags.get(key, "")).lower()
        if value.startswith("class"):
            return "classification"
        if value.startswith("regress"):
            return "regression"
    outputs = (model_version.signature or {}).get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return None
    kinds = set()
    for column in outputs:
        if not isinstance(column, dict):
            return None
        kind = str(column.get("type", "")).lower()
        if kind == "tensor":
            kind = str((column.get("tensor-spec") or {}).get("dtype", "")).lower()
        kinds.add(kind)
    if kinds <= _CLASS_TYPES:
        return "classification"
    if kinds <= _REGRESSION_TYPES:
        return "regression"
    return None


def data_since(*, deployment: Deployment) -> int:
    """When the deployment's data begins (unix seconds): its first traffic minute, else its
    creation."""
    first = (
        TrafficMinute.objects.filter(deployment=deployment)
        .order_by("bucket")
        .values_list("bucket", flat=True)
        .first()
    )
    created = int(deployment.created_at.timestamp())
    return min(first, created) if first is not None else created
