"""Collection: scrapes of the model servers' /metrics turned into increases (raw samples and
their minute and hour rollups), pulls of their prediction logs, probes, retention.

Network calls never run inside a database transaction: the collector fetches first, then
records in a short transaction that checks, with a lock or a compare-and-swap on the
instance's cursor, that nobody recorded the same thing meanwhile. A retried or duplicated
task therefore changes nothing twice."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from deployments.models import Deployment, Instance
from deployments.serving_token import serving_admin_tokens

from .. import pgcopy, promtext, scoring
from ..adapters import PROBE_REQUEST_PREFIX, AdapterError, ModelServer
from ..models import (
    BUCKET_FIELDS,
    TRAFFIC_FIELDS,
    DriftHour,
    FeedbackMinute,
    PendingLabel,
    Prediction,
    ProbeResult,
    PullState,
    ScrapeState,
    TrafficHour,
    TrafficMinute,
    TrafficSample,
)
from .drift import _drift_count, _has_nul
from .feedback import REQUEST_ID, _apply_pending_labels

logger = logging.getLogger(__name__)

PULL_PAGE = 5_000
PULL_MAX_PAGES = 20
SCRAPE_TIMEOUT = 5.0


# --- traffic: samples and rollups ---------------------------------------------------------


@dataclass
class TrafficIn:
    """What one instance served between ``start`` and ``ts`` (unix seconds)."""

    deployment_id: int
    model_version: int
    instance: str
    start: float
    ts: float
    requests: int
    errors: int
    latency_sum: float
    buckets: Sequence[int]  # not cumulative, len(BUCKET_FIELDS)
    reset: bool = False


def _relaxed_commit() -> None:
    """Collected data may commit without waiting for the WAL flush (PostgreSQL). A crash can
    lose the last few hundred milliseconds of it, always together with the scrape or pull
    cursor of the same transaction, so the next collection redoes it: nothing is counted
    twice or lost for good."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _bulk(rows: list) -> bool:
    """COPY is worth its extra round trips for many rows; it exists on PostgreSQL (psycopg2)."""
    if len(rows) < 200 or connection.vendor != "postgresql":
        return False
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return not is_psycopg3


def _sql_number(value: int | float) -> str:
    # Only for values built here as int or float (never user text): inlined, they spare the
    # driver tens of thousands of parameters per statement.
    return repr(float(value)) if isinstance(value, float) else str(int(value))


# Transaction-level advisory lock class for rollup writes ("moni"): the second key is the
# deployment id. Rollup rows are read, merged and written back whole (with their percentiles),
# so two writers of one deployment must not interleave.
_ROLLUP_LOCK = 0x6D6F6E69


def _lock_deployments(deployment_ids: Sequence[int]) -> None:
    """Serialize rollup writers per deployment (PostgreSQL; SQLite has one writer anyway).
    In ascending order, so two writers of several deployments cannot deadlock."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for deployment_id in sorted(set(deployment_ids)):
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)", [_ROLLUP_LOCK, deployment_id % 2**31]
            )


@dataclass
class _Rollup:
    """Rollup rows to add: ``keys`` (deployment, bucket, model version), ``counts`` (requests,
    errors, then the latency buckets) and ``latency`` (sums in seconds), one row each."""

    keys: np.ndarray
    counts: np.ndarray
    latency: np.ndarray


def _array_literal(values: np.ndarray) -> str:
    return "{" + ",".join(map(str, values.tolist())) + "}"


def _possibly_stored(model, keys: np.ndarray) -> np.ndarray:
    """Positions of the keys that may have a stored row: those not after the latest stored
    bucket of their deployment and version. Collection moves forward in time, so most keys
    of a batch are new and need no lookup."""
    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    pairs, inverse = np.unique(keys[:, [0, 2]], axis=0, return_inverse=True)
    # Integers built here, never user text: inlined.
    wanted = ",".join(f"({d},{v})" for d, v in pairs.tolist())
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT k.column1, k.column2, (SELECT max(t.bucket) FROM {table} AS t "
            "WHERE t.deployment_id = k.column1 AND t.model_version = k.column2) "
            f"FROM (VALUES {wanted}) AS k"
        )
        latest = {(d, v): m for d, v, m in cursor.fetchall() if m is not None}
    if not latest:
        return np.empty(0, dtype=np.int64)
    none = np.iinfo(np.int64).min
    bound = np.array([latest.get((d, v), none) for d, v in pairs.tolist()], dtype=np.int64)
    return np.flatnonzero(keys[:, 1] <= bound[inverse.reshape(-1)])


def _rollup_existing(model, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored rows with these keys: their positions in ``keys``, counts and latency sums."""
    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    values = ", ".join(f"t.{qn(c)}" for c in TRAFFIC_FIELDS)
    found: list[tuple] = []
    # A few keys (one scrape) are looked up directly: a query less than ruling them out first.
    candidates = _possibly_stored(model, keys) if len(keys) > 50 else np.arange(len(keys))
    keys = keys[candidates]
    with connection.cursor() as cursor:
        if not len(keys):
            pass
        elif connection.vendor == "postgresql":
            cursor.execute(
                f"SELECT k.i - 1, {values} FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) "
                f"WITH ORDINALITY AS k(d, b, v, i) JOIN {table} AS t ON t.deployment_id = k.d "
                "AND t.model_version = k.v AND t.bucket = k.b",
                [_array_literal(keys[:, column]) for column in range(3)],
            )
            found = cursor.fetchall()
        else:
            position = {tuple(key): i for i, key in enumerate(keys.tolist())}
            for i in range(0, len(keys), 300):
                # Integers built here, never user text: inlined.
                wanted = ",".join(f"({d},{v},{b})" for d, b, v in keys[i : i + 300].tolist())
                cursor.execute(
                    f"SELECT t.deployment_id, t.bucket, t.model_version, {values} FROM {table} AS t "
                    f"WHERE (t.deployment_id, t.model_version, t.bucket) IN (VALUES {wanted})"
                )
                found.extend((position[tuple(row[:3])], *row[3:]) for row in cursor.fetchall())
    if not found:
        return (
            np.empty(0, dtype=np.int64),
            np.empty((0, 2 + len(BUCKET_FIELDS)), dtype=np.int64),
            np.empty(0),
        )
    positions = candidates[np.array([row[0] for row in found], dtype=np.int64)]
    counts = np.array([(row[1], row[2], *row[4:]) for row in found], dtype=np.int64)
    latency = np.array([row[3] for row in found], dtype=np.float64)
    return positions, counts, latency


def _rollup_write(model, rollup: _Rollup) -> None:
    """Add ``rollup`` to the stored rows and write them back whole, with the latency
    percentiles of their new counts: one write per row. The caller holds the deployments'
    rollup locks (``_lock_deployments``)."""
    if not len(rollup.keys):
        return
    counts, latency = rollup.counts.copy(), rollup.latency.copy()
    positions, stored_counts, stored_latency = _rollup_existing(model, rollup.keys)
    counts[positions] += stored_counts  # keys are unique: no position twice
    latency[positions] += stored_latency
    quantiles = np.stack(
        [scoring.latency_quantiles(counts[:, 2:], q) for q in (0.5, 0.95, 0.99)], axis=1
    )

    qn = connection.ops.quote_name
    table = qn(model._meta.db_table)
    key_columns = ["deployment_id", "bucket", "model_version"]
    fields = [*TRAFFIC_FIELDS, "p50", "p95", "p99"]
    names = ", ".join(qn(c) for c in key_columns + fields)
    # Written in key order, so writers that share rows (retention, another table) lock
    # them in the same order.
    conflict = ", ".join(qn(c) for c in ("deployment_id", "model_version", "bucket"))
    tail = f" ON CONFLICT ({conflict}) DO UPDATE SET " + ", ".join(
        f"{qn(f)} = excluded.{qn(f)}" for f in fields
    )
    with connection.cursor() as cursor:
        if _bulk(rollup.keys):
            types = pgcopy.column_types(model, key_columns + fields, connection)
            columns = [
                *rollup.keys.T,
                counts[:, 0],
                counts[:, 1],
                latency,
                *counts[:, 2:].T,
                *quantiles.T,
            ]
            new = np.ones(len(rollup.keys), dtype=bool)
            new[positions] = False
            if new.any():
                # The deployments' locks keep other writers out: new rows go straight in.
                pgcopy.copy(cursor.cursor, table, names, types, [c[new] for c in columns])
            if len(positions):
                stage = qn(f"stage_w_{model._meta.db_table}")
                cursor.execute(
                    f"CREATE TEMP TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
                    f"SELECT {names} FROM {table} WITH NO DATA"
                )
                pgcopy.copy(cursor.cursor, stage, names, types, [c[positions] for c in columns])
                assignments = ", ".join(f"{qn(f)} = s.{qn(f)}" for f in fields)
                matches = " AND ".join(f"{table}.{qn(c)} = s.{qn(c)}" for c in key_columns)
                cursor.execute(
                    f"UPDATE {table} SET {assignments} FROM {stage} AS s WHERE {matches}"
                )
                cursor.execute(f"DELETE FROM {stage}")
            return
        rows = [
            [*key, count[0], count[1], lat, *count[2:], *(None if math.isnan(q) else q for q in qs)]
            for key, count, lat, qs in zip(
                rollup.keys.tolist(),
                counts.tolist(),
                latency.tolist(),
                quantiles.tolist(),
                strict=True,
            )
        ]
        rows.sort(key=lambda row: (row[0], row[2], row[1]))
        head = f"INSERT INTO {table} ({names}) VALUES "
        for i in range(0, len(rows), 2000):
            values = ",".join(
                "(" + ",".join("NULL" if v is None else _sql_number(v) for v in row) + ")"
                for row in rows[i : i + 2000]
            )
            cursor.execute(head + values + tail)


_RAW_COLUMNS = [
    "deployment_id",
    "model_version",
    "instance",
    "start",
    "ts",
    "reset",
    *TRAFFIC_FIELDS,
]


def _samples_insert(samples: Sequence[TrafficIn]) -> None:
    """The raw rows: binary COPY on PostgreSQL, multi-row INSERTs elsewhere."""
    qn = connection.ops.quote_name
    table = qn(TrafficSample._meta.db_table)
    names = ", ".join(qn(c) for c in _RAW_COLUMNS)
    with connection.cursor() as cursor:
        if _bulk(samples):
            ints = np.array(
                [
                    (
                        s.deployment_id,
                        s.model_version,
                        int(s.start),
                        int(s.ts),
                        s.requests,
                        s.errors,
                    )
                    for s in samples
                ],
                dtype=np.int64,
            )
            buckets = np.array([s.buckets for s in samples], dtype=np.int64)
            pgcopy.copy(
                cursor.cursor,
                table,
                names,
                pgcopy.column_types(TrafficSample, _RAW_COLUMNS, connection),
                [
                    ints[:, 0],
                    ints[:, 1],
                    [s.instance for s in samples],
                    ints[:, 2],
                    ints[:, 3],
                    np.array([bool(s.reset) for s in samples]),
                    ints[:, 4],
                    ints[:, 5],
                    np.array([s.latency_sum for s in samples], dtype=np.float64),
                    *buckets.T,
                ],
            )
            return
        rows = [
            (
                s.deployment_id,
                s.model_version,
                s.instance,
                int(s.start),
                int(s.ts),
                bool(s.reset),
                s.requests,
                s.errors,
                float(s.latency_sum),
                *s.buckets,
            )
            for s in samples
        ]
        one = "(" + ", ".join(["%s"] * len(_RAW_COLUMNS)) + ")"
        batch = max(1, 30_000 // len(_RAW_COLUMNS))
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            cursor.execute(
                f"INSERT INTO {table} ({names}) VALUES {', '.join([one] * len(chunk))}",
                [value for row in chunk for value in row],
            )


def _rollup(samples: Sequence[TrafficIn]) -> tuple[_Rollup, _Rollup]:
    """Minute and hour rows from samples. A sample's increases are spread over the minutes
    its interval covers, in proportion to the overlap (a missed scrape leaves a longer
    interval, not a spike); integer counts are split by rounding cumulative shares, so the
    parts are integers that add up to the whole."""
    n = len(samples)
    start = np.array([s.start for s in samples], dtype=np.float64)
    end = np.array([s.ts for s in samples], dtype=np.float64)
    start = np.minimum(start, end)
    deployment = np.array([s.deployment_id for s in samples], dtype=np.int64)
    version = np.array([s.model_version for s in samples], dtype=np.int64)
    counts = np.array([[s.requests, s.errors, *s.buckets] for s in samples], dtype=np.float64)
    latency = np.array([s.latency_sum for s in samples], dtype=np.float64)

    first = np.floor(start / 60).astype(np.int64)
    last = np.maximum(np.floor(np.nextafter(end, -np.inf) / 60).astype(np.int64), first)
    span = last - first + 1
    idx = np.repeat(np.arange(n), span)
    offset = np.arange(idx.size) - np.repeat(np.cumsum(span) - span, span)
    minute = first[idx] + offset
    duration = end[idx] - start[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(
            duration > 0, (np.minimum(end[idx], (minute + 1) * 60.0) - start[idx]) / duration, 1.0
        )
    is_last = offset == span[idx] - 1
    share = np.where(is_last, 1.0, np.clip(share, 0.0, 1.0))
    previous = np.where(offset == 0, 0.0, np.concatenate(([0.0], share[:-1])))
    parts = np.floor(counts[idx] * share[:, None] + 0.5) - np.floor(
        counts[idx] * previous[:, None] + 0.5
    )
    latency_parts = latency[idx] * (share - previous)

    # Every part twice: under its model version and under version 0, the deployment's total,
    # so a query over all versions reads one row per bucket instead of adding them up.
    parts = np.concatenate([parts, parts])
    latency_parts = np.concatenate([latency_parts, latency_parts])
    dep = np.concatenate([deployment[idx], deployment[idx]])
    ver = np.concatenate([version[idx], np.zeros(idx.size, dtype=np.int64)])
    minute = np.concatenate([minute, minute])

    def group(keys: np.ndarray, bucket_seconds: int) -> _Rollup:
        order = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0]))
        keys, values, lat = keys[order], parts[order], latency_parts[order]
        boundaries = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
        starts = np.concatenate(([0], boundaries))
        return _Rollup(
            keys=keys[starts] * np.array([1, bucket_seconds, 1], dtype=np.int64),
            counts=np.add.reduceat(values, starts, axis=0).astype(np.int64),
            latency=np.add.reduceat(lat, starts),
        )

    minutes = group(np.stack([dep, minute, ver], axis=1), 60)
    # Hours from the minute parts (an hour is the sum of its minutes).
    hours = group(np.stack([dep, minute // 60, ver], axis=1), 3600)
    return minutes, hours


@transaction.atomic
def traffic_ingest(*, samples: Sequence[TrafficIn]) -> int:
    """Record raw samples and add them to the minute and hour rollups, in one transaction."""
    if not samples:
        return 0
    _relaxed_commit()
    _lock_deployments([s.deployment_id for s in samples])
    _samples_insert(samples)
    minutes, hours = _rollup(samples)
    _rollup_write(TrafficMinute, minutes)
    _rollup_write(TrafficHour, hours)
    return len(samples)


def _instance_label(inst: Instance) -> str:
    return f"r{inst.revision.number}#{inst.ordinal}"


def _version_of(inst: Instance, reported: str | None) -> int:
    if reported and reported.isdigit():
        return int(reported)
    return inst.revision.model_version.version


@transaction.atomic
def scrape_record(
    *, instance_id: int, counters: promtext.ServingCounters, at: float
) -> TrafficIn | None:
    """Turn one scrape of an instance into increases since its previous scrape.

    A restart (another process start time) or any counter going down means the counters
    began again from zero: the increase is then the whole current value, counted from the
    later of the previous scrape and the process start. The first scrape of a process that
    started recently counts from zero too; of an older one, it is only a baseline.
    """
    inst = Instance.objects.select_related("revision__model_version").filter(pk=instance_id).first()
    if inst is None:
        return None
    _relaxed_commit()
    state = ScrapeState.objects.select_for_update().filter(instance_id=instance_id).first()
    current = counters.as_dict()
    process_start = counters.process_start or 0.0
    reset = False
    if state is None:
        fresh = process_start and at - process_start <= max(
            5 * settings.CONTROLPLANE_METRICS_INTERVAL, 120
        )
        ScrapeState.objects.create(
            instance_id=instance_id,
            process_start=process_start,
            scraped_at=at,
            counters=current,
            scrapes=1,
        )
        if not fresh:
            return None
        start, delta, reset = process_start, current, True
    else:
        if at <= state.scraped_at:
            return None  # an older scrape delivered late: already accounted for
        previous = state.counters
        went_down = (
            current["requests"] < previous["requests"]
            or current["errors"] < previous["errors"]
            or any(c < p for c, p in zip(current["buckets"], previous["buckets"], strict=False))
        )
        reset = went_down or abs(process_start - state.process_start) > 1e-3
        if reset:
            start = max(state.scraped_at, process_start) if process_start else state.scraped_at
            delta = current
        else:
            start = state.scraped_at
            delta = {
                "requests": current["requests"] - previous["requests"],
                "errors": current["errors"] - previous["errors"],
                "latency_sum": max(0.0, current["latency_sum"] - previous["latency_sum"]),
                "buckets": [
                    c - p for c, p in zip(current["buckets"], previous["buckets"], strict=False)
                ],
            }
        ScrapeState.objects.filter(pk=state.pk).update(
            process_start=process_start,
            scraped_at=at,
            counters=current,
            scrapes=state.scrapes + 1,
            resets=state.resets + int(reset),
            last_error="",
        )
    cumulative = delta["buckets"]
    buckets = [cumulative[0]] + [
        cumulative[i] - cumulative[i - 1] for i in range(1, len(cumulative))
    ]
    sample = TrafficIn(
        deployment_id=inst.deployment_id,
        model_version=_version_of(inst, counters.version),
        instance=_instance_label(inst),
        start=min(start, at),
        ts=at,
        requests=delta["requests"],
        errors=delta["errors"],
        latency_sum=delta["latency_sum"],
        buckets=buckets,
        reset=reset,
    )
    traffic_ingest(samples=[sample])
    return sample


def _scrape_failed(instance_id: int, error: str) -> None:
    ScrapeState.objects.filter(instance_id=instance_id).update(last_error=error[:2000])


def _live_instances(deployment_id: int) -> list[Instance]:
    return list(
        Instance.objects.filter(deployment_id=deployment_id, deployment__deleted=False)
        .exclude(runtime_id="")
        .select_related("revision__model_version")
    )


def deployment_scrape(*, deployment_id: int, now: float | None = None) -> int:
    """Scrape /metrics of every instance of a deployment. Returns the samples recorded."""
    recorded = 0
    for inst in _live_instances(deployment_id):
        try:
            text = ModelServer(inst.address, timeout=SCRAPE_TIMEOUT).metrics()
            counters = promtext.serving_counters(text)
        except (AdapterError, promtext.ParseError) as exc:
            logger.info("scrape of %s failed: %s", inst.address, exc)
            _scrape_failed(inst.pk, str(exc))
            continue
        if scrape_record(
            instance_id=inst.pk, counters=counters, at=now if now is not None else time.time()
        ):
            recorded += 1
    return recorded


# --- prediction log ------------------------------------------------------------------------


def _as_int(value: Any, default: int) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


@transaction.atomic
def predictions_ingest(*, instance_id: int, boot_id: str, after: int, page: dict) -> int:
    """Record one page of an instance's prediction log, if the cursor is still where it was
    when the page was fetched (else another worker did it: nothing happens)."""
    inst = Instance.objects.select_related("revision__model_version").filter(pk=instance_id).first()
    if inst is None:
        return 0
    _relaxed_commit()
    state, _ = PullState.objects.get_or_create(instance_id=instance_id)
    state = PullState.objects.select_for_update().get(pk=state.pk)
    expected_after = state.cursor if state.boot_id == boot_id else 0
    if after != expected_after:
        return 0
    records = [r for r in page.get("records", []) if isinstance(r, dict) and r.get("v") == 1]
    lost = 0
    if records and _as_int(records[0].get("seq"), after + 1) > after + 1:
        lost = _as_int(records[0].get("seq"), after + 1) - after - 1
    fallback_version = inst.revision.model_version.version
    rows: list[Prediction] = []
    inputs_by_version: dict[int, list[tuple[float, dict]]] = defaultdict(list)
    for record in records:
        request_id = record.get("request_id")
        if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
            continue  # not from a server of ours (which only logs ids it accepted)
        if request_id.startswith(PROBE_REQUEST_PREFIX):
            continue  # our own probes are neither traffic to score nor inputs to compare
        try:
            ts = float(record["ts"])
            seq = int(record["seq"])
        except (KeyError, TypeError, ValueError):
            continue
        outputs = record.get("outputs")
        if _has_nul(outputs):
            continue  # the database cannot store it; a real server never logs it
        version = _as_int(record.get("version"), fallback_version)
        rows.append(
            Prediction(
                deployment_id=inst.deployment_id,
                model_version=version,
                request_id=request_id,
                ts=datetime.fromtimestamp(ts, tz=UTC),
                latency_ms=float(record.get("latency_ms") or 0.0),
                n_rows=_as_int(
                    record.get("n_rows"), len(outputs) if isinstance(outputs, list) else 1
                ),
                outputs=outputs if isinstance(outputs, list) else [outputs],
                boot_id=boot_id,
                seq=seq,
            )
        )
        if isinstance(record.get("inputs"), dict):
            inputs_by_version[version].append((ts, record["inputs"]))
    Prediction.objects.bulk_create(rows, batch_size=1000, ignore_conflicts=True)
    if inputs_by_version:
        _drift_count(inst.deployment_id, inputs_by_version)
    if rows:
        _apply_pending_labels(inst.deployment_id, {p.request_id for p in rows})
    next_cursor = _as_int(page.get("next"), after)
    PullState.objects.filter(pk=state.pk).update(
        boot_id=boot_id,
        cursor=max(next_cursor, after),
        pulled_at=timezone.now(),
        records=state.records + len(rows),
        lost=state.lost + lost,
        last_error="",
    )
    return len(rows)


def deployment_pull(*, deployment_id: int) -> int:
    """Pull new prediction log records from every instance of a deployment."""
    name = Deployment.objects.filter(pk=deployment_id).values_list("name", flat=True).first()
    if name is None:
        return 0
    admin_tokens = serving_admin_tokens(name)
    total = 0
    for inst in _live_instances(deployment_id):
        server = ModelServer(inst.address, timeout=SCRAPE_TIMEOUT, admin_tokens=admin_tokens)
        state = PullState.objects.filter(instance_id=inst.pk).first()
        boot_id, after = (state.boot_id, state.cursor) if state else ("", 0)
        try:
            for _ in range(PULL_MAX_PAGES):
                page = server.predictions(after=after, limit=PULL_PAGE)
                if page.get("boot_id") != boot_id:
                    if after:  # the process restarted: its log starts again at 1
                        after = 0
                        page = server.predictions(after=0, limit=PULL_PAGE)
                    boot_id = str(page.get("boot_id", ""))
                ingested_after = after
                predictions_ingest(
                    instance_id=inst.pk, boot_id=boot_id, after=ingested_after, page=page
                )
                records = page.get("records", [])
                after = max(_as_int(page.get("next"), after), after)
                if len(records) < PULL_PAGE:
                    break
        except AdapterError as exc:
            logger.info("pulling predictions from %s failed: %s", inst.address, exc)
            PullState.objects.filter(instance_id=inst.pk).update(last_error=str(exc)[:2000])
            continue
        total += 1
    return total


# --- probes ---------------------------------------------------------------------------------


def probe_payload(example: Any) -> Any | None:
    """The input example as an /invocations body."""
    if example is None:
        return None
    if isinstance(example, dict):
        if any(
            k in example for k in ("dataframe_split", "dataframe_records", "instances", "inputs")
        ):
            return example
        if "columns" in example and "data" in example:
            return {"dataframe_split": example}
        return {"inputs": example}
    if isinstance(example, list) and example and all(isinstance(r, dict) for r in example):
        return {"dataframe_records": example}
    return {"inputs": example}


@transaction.atomic
def probe_record(
    *,
    deployment_id: int,
    ok: bool,
    latency_ms: float | None,
    status_code: int | None,
    model_version: str | None,
    kind: str,
    error: str,
    at: datetime,
) -> ProbeResult:
    return ProbeResult.objects.create(
        deployment_id=deployment_id,
        ok=ok,
        latency_ms=latency_ms,
        status_code=status_code,
        model_version=_as_int(model_version, 0) or None,
        kind=kind,
        error=error[:2000],
        ts=at,
    )


def deployment_probe(*, deployment_id: int) -> ProbeResult | None:
    """Send the serving version's input example to the deployment's stable endpoint."""
    d = (
        Deployment.objects.select_related(
            "serving_revision__model_version", "desired_revision__model_version"
        )
        .filter(pk=deployment_id, deleted=False, stopped=False)
        .first()
    )
    if d is None or not (d.serving_revision_id or d.desired_revision_id):
        return None
    revision = d.serving_revision or d.desired_revision
    payload = probe_payload(revision.model_version.input_example)
    at = timezone.now()
    outcome = ModelServer(d.endpoint, timeout=float(settings.CONTROLPLANE_PROBE_TIMEOUT)).probe(
        payload
    )
    return probe_record(
        deployment_id=d.pk,
        ok=outcome.ok,
        latency_ms=outcome.latency_ms,
        status_code=outcome.status_code,
        model_version=outcome.model_version,
        kind="example" if payload is not None else "ping",
        error=outcome.error,
        at=at,
    )


# --- retention -------------------------------------------------------------------------------


def _delete_in_batches(queryset, batch: int = 10_000) -> int:
    total = 0
    while True:
        ids = list(queryset.values_list("pk", flat=True)[:batch])
        if not ids:
            return total
        with transaction.atomic():
            total += queryset.model.objects.filter(pk__in=ids).delete()[0]


def retention_apply(*, now: datetime | None = None) -> dict[str, int]:
    """Delete what is older than the retention settings (idempotent)."""
    now = now or timezone.now()
    epoch = int(now.timestamp())
    raw = epoch - settings.CONTROLPLANE_METRICS_RAW_RETENTION_HOURS * 3600
    minute = epoch - settings.CONTROLPLANE_METRICS_MINUTE_RETENTION_DAYS * 86400
    hour = epoch - settings.CONTROLPLANE_METRICS_HOUR_RETENTION_DAYS * 86400
    predictions = now - timedelta(days=settings.CONTROLPLANE_PREDICTION_RETENTION_DAYS)
    return {
        "raw": _delete_in_batches(TrafficSample.objects.filter(ts__lt=raw)),
        "minute": _delete_in_batches(TrafficMinute.objects.filter(bucket__lt=minute)),
        "hour": _delete_in_batches(TrafficHour.objects.filter(bucket__lt=hour)),
        "probes": _delete_in_batches(
            ProbeResult.objects.filter(
                ts__lt=now - timedelta(days=settings.CONTROLPLANE_METRICS_MINUTE_RETENTION_DAYS)
            )
        ),
        # Pairs go with their predictions; the minute windows of scores stay as long as hours.
        "predictions": _delete_in_batches(Prediction.objects.filter(ts__lt=predictions)),
        "pending_labels": _delete_in_batches(
            PendingLabel.objects.filter(received_at__lt=predictions)
        ),
        "feedback_windows": _delete_in_batches(FeedbackMinute.objects.filter(bucket__lt=hour)),
        "drift": _delete_in_batches(DriftHour.objects.filter(bucket__lt=hour)),
    }


def deployments_to_collect() -> list[int]:
    return list(
        Deployment.objects.filter(deleted=False, instances__isnull=False)
        .distinct()
        .values_list("pk", flat=True)
    )


def deployments_to_probe() -> list[int]:
    return list(
        Deployment.objects.filter(
            deleted=False, stopped=False, serving_revision__isnull=False
        ).values_list("pk", flat=True)
    )
