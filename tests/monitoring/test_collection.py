"""Scrapes turned into rates: counter resets, missed scrapes, rollups, retention; and the
metrics API's contract. The /metrics text is rendered by the model server's own code."""

from __future__ import annotations

import time

import pytest
from django.test import override_settings

from monitoring import services
from monitoring.models import ScrapeState, TrafficHour, TrafficMinute, TrafficSample
from monitoring.promtext import serving_counters
from monitoring.scoring import latency_quantiles
from tests.monitoring.conftest import iso, now_minute

pytestmark = pytest.mark.django_db


def scrape(instance, server, at):
    return services.scrape_record(
        instance_id=instance.pk, counters=serving_counters(server.text()), at=at
    )


def series(api, metric, start, end, step, name="churn", **extra):
    resp = api.get(
        f"/api/v1/deployments/{name}/metrics",
        {"name": metric, "from": iso(start), "to": iso(end), "step": str(step), **extra},
    )
    assert resp.status_code == 200, resp.content
    return resp.json()["points"]


def total(api, metric, start, end, **extra):
    points = series(api, metric, start, end, end - start, **extra)
    return points[0]["value"] if points else None


def test_counters_become_increases_across_restarts(api, fleet, server):
    base = now_minute() - 1800
    inst = fleet.instance(2)
    process = server("2", start=base - 5)
    process.serve(10)
    process.serve(3, endpoint="/ping")  # not prediction traffic
    process.serve(2, endpoint="/metrics")
    assert scrape(inst, process, base + 10).requests == 10  # a fresh process counts from its start
    process.serve(20)
    assert scrape(inst, process, base + 25).requests == 20
    # The process restarts: its counters begin again at zero (and are lower than before).
    process = server("2", start=base + 30)
    process.serve(7)
    sample = scrape(inst, process, base + 40)
    assert (sample.requests, sample.reset, sample.start) == (7, True, base + 30)
    # A restart between two scrapes that ends with *more* requests is still a restart.
    process = server("2", start=base + 45)
    process.serve(50)
    assert scrape(inst, process, base + 55).requests == 50
    assert ScrapeState.objects.get(instance=inst).resets == 2
    # (3 of the first 10 fell in the minute before ``base``: the interval began at base - 5.)
    assert total(api, "requests", base - 60, base + 60) == 87
    assert total(api, "requests", base - 60, base + 60, version="2") == 87
    assert total(api, "requests", base - 60, base + 60, version="1") is None


def test_a_long_running_process_seen_for_the_first_time_is_only_a_baseline(api, fleet, server):
    base = now_minute() - 1800
    process = server("1", start=base - 86400)
    process.serve(1000)
    assert scrape(fleet.instance(1), process, base) is None
    process.serve(5)
    assert scrape(fleet.instance(1), process, base + 15).requests == 5
    assert total(api, "requests", base - 60, base + 60) == 5


def test_an_old_or_repeated_scrape_changes_nothing(fleet, server):
    base = now_minute() - 1800
    process = server("1", start=base - 1)
    process.serve(4)
    scrape(fleet.instance(1), process, base + 10)
    assert scrape(fleet.instance(1), process, base + 10) is None
    assert scrape(fleet.instance(1), process, base + 5) is None
    assert TrafficSample.objects.count() == 1


def test_missed_scrapes_spread_the_increase_over_the_gap(api, fleet, server):
    base = now_minute() - 3600
    inst = fleet.instance(1)
    process = server("1", start=base - 1000)
    scrape(inst, process, base)  # baseline
    process.serve(300)
    # Scrapes at base+15 ... base+285 were missed (control plane down): one 5-minute interval.
    sample = scrape(inst, process, base + 300)
    assert sample.requests == 300 and sample.start == base
    per_minute = series(api, "requests", base, base + 300, 60)
    assert [p["value"] for p in per_minute] == [60.0] * 5
    assert [p["t"] for p in per_minute] == [iso(base + 60 * i) for i in range(5)]
    throughput = series(api, "throughput", base, base + 300, 60)
    assert [p["value"] for p in throughput] == [1.0] * 5
    assert total(api, "requests", base, base + 300) == 300


def test_errors_and_latency_percentiles_come_from_the_histogram(api, fleet, server):
    base = now_minute() - 600
    process = server("1", start=base)
    process.serve(90, seconds=0.004)
    process.serve(10, status=500, seconds=0.2)
    scrape(fleet.instance(1), process, base + 30)
    assert total(api, "requests", base, base + 60) == 100
    assert total(api, "errors", base, base + 60) == 10
    assert total(api, "error_rate", base, base + 60) == pytest.approx(0.1)
    # Prometheus' histogram_quantile: linear within the bucket holding the rank.
    assert total(api, "latency_p50", base, base + 60) == pytest.approx(2.5 + 2.5 * 50 / 90)
    assert total(api, "latency_p95", base, base + 60) == pytest.approx(100 + 150 * 5 / 10)
    assert total(api, "latency_p99", base, base + 60) == pytest.approx(100 + 150 * 9 / 10)


def test_raw_minute_and_hour_tables_agree(api, fleet, server):
    base = now_minute() // 3600 * 3600 - 7200
    inst = fleet.instance(1)
    process = server("1", start=base)
    sent = 0
    for i in range(1, 241):  # two hours of scrapes every 30 s with varying traffic
        n = (i * 7) % 13
        process.serve(n, seconds=0.001 * (1 + i % 5))
        sent += n
        scrape(inst, process, base + 30 * i)
    raw = sum(TrafficSample.objects.values_list("requests", flat=True))
    minute = sum(TrafficMinute.objects.filter(model_version=1).values_list("requests", flat=True))
    hour = sum(TrafficHour.objects.filter(model_version=1).values_list("requests", flat=True))
    assert raw == minute == hour == sent
    # Version 0 rows hold every version's total (one version here: the same numbers).
    assert (
        sum(TrafficHour.objects.filter(model_version=0).values_list("requests", flat=True)) == sent
    )
    assert TrafficHour.objects.filter(model_version=1).count() == 2
    assert TrafficMinute.objects.filter(model_version=1).count() == 120
    # The same totals whichever table answers: hours (3600 s steps), minutes (60 s), raw (15 s).
    hourly = series(api, "requests", base, base + 7200, 3600)
    by_minute = series(api, "requests", base, base + 7200, 60)
    raw_steps = series(api, "requests", base, base + 7200, 15)
    assert (
        sum(p["value"] for p in hourly)
        == sum(p["value"] for p in by_minute)
        == sum(p["value"] for p in raw_steps)
        == sent
    )
    assert len(hourly) == 2 and len(by_minute) == 120
    # Rollup rows carry their own percentiles (read when the step is their resolution).
    for row in TrafficMinute.objects.all():
        buckets = [[getattr(row, f"b{i:02d}") for i in range(15)]]
        assert row.p95 == pytest.approx(float(latency_quantiles(buckets, 0.95)[0]))
    stored = series(api, "latency_p95", base, base + 600, 60)
    merged = series(api, "latency_p95", base + 1, base + 601, 60)  # not aligned: from the counts
    assert [p["value"] for p in stored] == pytest.approx([p["value"] for p in merged])
    p95_hourly = series(api, "latency_p95", base, base + 7200, 7200)
    p95_minutely = series(api, "latency_p95", base, base + 7200, 7200, version="1")
    assert p95_hourly == p95_minutely


@override_settings(
    CONTROLPLANE_METRICS_RAW_RETENTION_HOURS=1,
    CONTROLPLANE_METRICS_MINUTE_RETENTION_DAYS=1,
    CONTROLPLANE_METRICS_HOUR_RETENTION_DAYS=2,
)
def test_retention_keeps_each_table_for_its_own_time(api, fleet, server):
    now = int(time.time()) // 3600 * 3600
    inst = fleet.instance(1)
    ages = {"3h": now - 3 * 3600, "30h": now - 30 * 3600, "3d": now - 3 * 86400}
    for i, (_label, t) in enumerate(sorted(ages.items(), key=lambda kv: kv[1])):
        process = server("1", start=t)
        process.serve(10 * (i + 1))
        scrape(inst, process, t + 30)
    assert TrafficSample.objects.count() == 3
    deleted = services.retention_apply()
    # (each rollup bucket has a row for version 1 and one for all versions)
    assert deleted["raw"] == 3 and deleted["minute"] == 2 * 2 and deleted["hour"] == 1 * 2
    assert TrafficMinute.objects.count() == 1 * 2 and TrafficHour.objects.count() == 2 * 2
    # Still answered from the rollups that remain.
    assert total(api, "requests", ages["3h"], ages["3h"] + 60) == 30
    assert total(api, "requests", ages["30h"], ages["30h"] + 3600) == 20
    assert total(api, "requests", ages["3d"], ages["3d"] + 3600) is None
    assert services.retention_apply() == dict.fromkeys(deleted, 0)  # idempotent


def test_a_failed_scrape_is_recorded_and_skipped(fleet):
    inst = fleet.instance(1)
    ScrapeState.objects.create(instance=inst, process_start=1, scraped_at=1, counters={})
    assert (
        services.deployment_scrape(deployment_id=fleet.deployment.pk) == 0
    )  # nothing listens there
    assert ScrapeState.objects.get(instance=inst).last_error


# --- the metrics API's contract ------------------------------------------------------------------------


@pytest.fixture
def traffic(fleet, server):
    base = now_minute() - 600
    process = server("1", start=base - 1)
    process.serve(12)
    scrape(fleet.instance(1), process, base + 30)
    return base


def test_the_answer_has_exactly_name_and_points_of_t_and_value(api, traffic):
    resp = api.get(
        "/api/v1/deployments/churn/metrics",
        {"name": "requests", "from": iso(traffic), "to": iso(traffic + 120), "step": "60"},
    )
    body = resp.json()
    assert set(body) == {"name", "points"} and body["name"] == "requests"
    assert body["points"] == [{"t": iso(traffic), "value": 12.0}]


def test_a_step_as_long_as_the_range_gives_one_point_over_the_range(api, traffic):
    for step in ("600", "10m", "1d"):
        resp = api.get(
            "/api/v1/deployments/churn/metrics",
            {
                "name": "requests",
                "from": iso(traffic - 300),
                "to": iso(traffic + 300),
                "step": step,
            },
        )
        assert resp.json()["points"] == [{"t": iso(traffic - 300), "value": 12.0}]


def test_times_with_offsets_are_understood(api, traffic):
    from datetime import UTC, datetime, timedelta, timezone

    start = datetime.fromtimestamp(traffic, tz=UTC).astimezone(timezone(timedelta(hours=2)))
    end = start + timedelta(minutes=10)
    url = (
        f"/api/v1/deployments/churn/metrics?name=requests&step=600"
        f"&from={start.isoformat()}&to={end.isoformat().replace('+', '%2B')}"
    )  # one '+' unencoded
    resp = api.get(url)
    assert resp.status_code == 200, resp.content
    assert resp.json()["points"] == [{"t": iso(traffic), "value": 12.0}]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"name": "bogus"}, "unknown_metric"),
        ({}, "missing_name"),
        ({"name": "requests", "from": "yesterday"}, "invalid_time"),
        ({"name": "requests", "to": "2025-13-45T00:00:00Z"}, "invalid_time"),
        (
            {"name": "requests", "from": "2025-01-02T00:00:00Z", "to": "2025-01-01T00:00:00Z"},
            "invalid_range",
        ),
        ({"name": "requests", "step": "0"}, "invalid_step"),
        ({"name": "requests", "step": "-60"}, "invalid_step"),
        ({"name": "requests", "step": "fast"}, "invalid_step"),
        (
            {
                "name": "requests",
                "from": "2020-01-01T00:00:00Z",
                "to": "2025-01-01T00:00:00Z",
                "step": "1",
            },
            "too_many_points",
        ),
        ({"name": "requests", "version": "latest"}, "invalid_version"),
    ],
)
def test_bad_metric_queries_are_400(api, traffic, params, code):
    resp = api.get("/api/v1/deployments/churn/metrics", params)
    assert resp.status_code == 400, resp.content
    assert resp.json()["error"]["code"] == code


def test_every_documented_metric_name_is_answered(api, traffic):
    from monitoring.catalog import METRICS

    for name in [
        "requests",
        "errors",
        "error_rate",
        "latency_p50",
        "latency_p95",
        "latency_p99",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "mae",
        "rmse",
        "drift_psi",
        *METRICS,
    ]:
        resp = api.get("/api/v1/deployments/churn/metrics", {"name": name})
        assert resp.status_code == 200, (name, resp.content)
        assert isinstance(resp.json()["points"], list)


def test_metrics_of_an_unknown_deployment_are_404(api, db):
    assert api.get("/api/v1/deployments/nope/metrics", {"name": "requests"}).status_code == 404


def test_bulk_batches_and_single_samples_give_the_same_rows(make_deployment):
    """Large batches take the binary COPY path on PostgreSQL, and the second batch here adds
    to minutes the first one wrote (interleaved samples): the result is the same as one
    sample per transaction, raw rows included."""
    import random

    one, many = make_deployment("one-by-one"), make_deployment("in-bulk")
    rng = random.Random(4)
    base = now_minute() - 86400
    samples = []
    for i in range(400):
        buckets = [rng.randint(0, 9) for _ in range(15)] if i % 50 else [0] * 15
        samples.append(
            dict(
                model_version=1 + i % 2,
                instance=f"r{1 + i % 3}#{i % 2}" if i % 7 else "r12#10",
                start=base + 37 * i,
                ts=base + 37 * (i + 1),
                requests=sum(buckets),
                errors=rng.randint(0, 2),
                latency_sum=0.01 * i + 1e-9,
                buckets=buckets,
                reset=i % 11 == 0,
            )
        )
    for batch in (samples[0::2], samples[1::2]):
        services.traffic_ingest(
            samples=[services.TrafficIn(deployment_id=many.deployment.pk, **s) for s in batch]
        )
    for s in samples:
        services.traffic_ingest(samples=[services.TrafficIn(deployment_id=one.deployment.pk, **s)])

    def raw(fleet):
        fields = [f.column for f in TrafficSample._meta.concrete_fields]
        fields = [f for f in fields if f not in ("id", "deployment_id")]
        return sorted(
            TrafficSample.objects.filter(deployment=fleet.deployment).values_list(*fields)
        )

    assert raw(one) == raw(many)
    assert len(raw(many)) == 400
    assert TrafficSample.objects.filter(deployment=many.deployment, reset=True).count() == 37
    assert set(
        TrafficSample.objects.filter(deployment=many.deployment).values_list("instance", flat=True)
    ) == {"r1#0", "r2#1", "r3#0", "r1#1", "r2#0", "r3#1", "r12#10"}

    def rollups(model, fleet):
        return sorted(
            model.objects.filter(deployment=fleet.deployment).values_list(
                "model_version",
                "bucket",
                "requests",
                "errors",
                "b00",
                "b07",
                "b14",
                "p50",
                "p95",
                "p99",
            )
        )

    for model in (TrafficMinute, TrafficHour):
        a, b = rollups(model, one), rollups(model, many)
        assert [row[:7] for row in a] == [row[:7] for row in b]
        assert [row[7:] for row in a] == [pytest.approx(row[7:]) for row in b]
    # A minute with no requests has no percentiles (NULL, not 0 or NaN).
    empty = TrafficMinute.objects.filter(deployment=many.deployment, requests=0)
    assert empty.exists() and set(empty.values_list("p50", "p95", "p99")) == {(None, None, None)}
    assert sum(
        TrafficMinute.objects.filter(deployment=many.deployment, model_version=0).values_list(
            "requests", flat=True
        )
    ) == sum(s["requests"] for s in samples)


@pytest.mark.parametrize(
    "params",
    [
        {"name": "requests", "version": "99999999999999999999"},
        {"name": "requests", "step": "99999999999999999999d"},
        {"name": "requests", "from": "0001-01-01T00:00:00+05:00"},
        {"name": "requests", "to": "0001-01-01T00:30:00Z"},
        {"name": "drift_psi", "feature": "\x00"},
    ],
)
def test_extreme_metric_queries_are_answered_without_a_server_error(api, traffic, params):
    resp = api.get("/api/v1/deployments/churn/metrics", params)
    assert resp.status_code in (200, 400), resp.content


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_of_one_deployment_add_up(make_deployment):
    """Rollup rows are read, merged and written back whole; two workers writing the same
    minutes at once must wait for each other rather than overwrite or collide."""
    import threading

    from django.db import connection, connections

    if connection.vendor != "postgresql":
        pytest.skip("SQLite has a single writer; the rollup lock is PostgreSQL's")
    fleet = make_deployment("contended")
    base = now_minute() - 7200
    batches = [
        [
            services.TrafficIn(
                deployment_id=fleet.deployment.pk,
                model_version=1,
                instance=f"r1#{worker}",
                start=base + 15 * i,
                ts=base + 15 * (i + 1),
                requests=10,
                errors=worker,
                latency_sum=0.05,
                buckets=[0] * (3 + worker * 4) + [10] + [0] * (11 - worker * 4),
            )
            for i in range(400)
        ]
        for worker in (0, 1)
    ]
    start, failures = threading.Barrier(2), []

    def work(batch):
        try:
            start.wait()
            services.traffic_ingest(samples=batch)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    minutes = TrafficMinute.objects.filter(deployment=fleet.deployment, model_version=0)
    assert minutes.count() == 100
    rows = list(minutes.values_list("requests", "errors", "p95", *[f"b{i:02d}" for i in range(15)]))
    assert {r[:2] for r in rows} == {(80, 4)}  # 4 scrapes of each worker per minute
    for row in rows:
        assert row[2] == pytest.approx(latency_quantiles([row[3:]], 0.95)[0])
