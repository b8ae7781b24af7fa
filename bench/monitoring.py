"""Benchmark: monitoring storage on PostgreSQL.

    MLFLOW_DISABLE_TELEMETRY=true .venv/bin/python bench/monitoring.py \\
        [--database-url postgres://postgres@127.0.0.1:5432/controlplane_bench] [--keep]

Creates (and afterwards drops, unless --keep) a database of its own, migrates it, and measures:

1. Ingestion of traffic samples through ``monitoring.services.traffic_ingest``: the raw table
   (binary COPY) plus the one-minute and one-hour rollups (stored rows read, merged with the
   batch and written back with their percentiles; new rows COPYed), in batches of 5,000
   samples per transaction. A *sample* is one row of the raw table: what one instance
   served between two scrapes (requests, 5xx, latency sum and the 15 histogram buckets).
   The data: 30 days of 15-second scrapes for one deployment serving two model versions
   (345,600 samples), then 30 days of one-minute scrapes for 10 other deployments
   (432,000 samples), so the tables hold a realistic amount of other data.
2. The same through the per-scrape path the Celery task uses (``scrape_record``: parse the
   /metrics text, compute increases, one transaction per scrape).
3. Prediction log ingestion (``predictions_ingest``, pages of 5,000 records with inputs, so
   drift counts are updated too), records per second.
4. A 30-day query at a one-minute step (43,200 points) for the one deployment, through the
   selector and through the HTTP API (``GET /api/v1/deployments/{name}/metrics``): median of 7.
5. Rendering its chart page (``/monitoring/deployments/{name}/?range=30d`` and ``24h``), median of 5.

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DAY = 86400


def ensure_database(url: str) -> None:
    import psycopg2

    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    conn = psycopg2.connect(
        host=parsed.hostname,
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password or None,
        dbname="postgres",
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def drop_database(url: str) -> None:
    import psycopg2

    parsed = urlparse(url)
    conn = psycopg2.connect(
        host=parsed.hostname,
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password or None,
        dbname="postgres",
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{parsed.path.lstrip("/")}" WITH (FORCE)')
    conn.close()


def median_ms(fn, runs: int) -> float:
    return timings(fn, runs)[0]


def timings(fn, runs: int) -> tuple[float, float]:
    """Median and best of ``runs`` (ms): the best shows the cost without other load."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), min(times)


def timed(fn, runs: int) -> str:
    median, best = timings(fn, runs)
    return f"{median:,.0f} ms median, {best:,.0f} ms best of {runs}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url", default="postgres://postgres@127.0.0.1:5432/controlplane_bench"
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args()
    if not args.database_url.startswith(("postgres://", "postgresql://")):
        sys.exit("this benchmark measures PostgreSQL: give a postgres:// URL")

    ensure_database(args.database_url)
    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("CONTROLPLANE_DATA_DIR", tempfile.mkdtemp(prefix="bench-monitoring-"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlplane.settings.base"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    try:
        run()
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep:
            drop_database(args.database_url)


def run() -> None:
    import numpy as np
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    from deployments.models import Deployment, Instance, Revision
    from monitoring import selectors, services
    from monitoring.models import TrafficHour, TrafficMinute, TrafficSample
    from monitoring.promtext import serving_counters
    from registry.models import ModelVersion, RegisteredModel
    from serving.metrics import Metrics

    rng = np.random.default_rng(0)
    results: list[tuple[str, str]] = [
        (
            "load average of the machine (1, 5, 15 min) at the start",
            ", ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs",
        )
    ]
    now = int(time.time()) // 60 * 60
    start = now - 30 * DAY

    # --- fixtures ---------------------------------------------------------------------------
    model = RegisteredModel.objects.create(name="bench-model")
    example = {
        "columns": [f"f{i}" for i in range(5)],
        "data": rng.normal(size=(50, 5)).round(4).tolist(),
    }
    versions = [
        ModelVersion.objects.create(model=model, version=v, source="bench", input_example=example)
        for v in (1, 2, 3)
    ]
    spec = {"runtime": "local", "replicas": 1, "cpu": None, "memory_mb": None, "env": {}}
    deployments, instances = [], []
    for i in range(11):
        d = Deployment.objects.create(
            name=f"bench-{i}",
            model=model,
            runtime="local",
            port=30000 + i,
            status=Deployment.Status.READY,
            target_version=2,
        )
        rev = Revision.objects.create(
            deployment=d, number=1, model_version=versions[1], spec=spec, reason="bench"
        )
        Deployment.objects.filter(pk=d.pk).update(desired_revision=rev, serving_revision=rev)
        instances.append(
            Instance.objects.create(
                deployment=d,
                revision=rev,
                ordinal=0,
                runtime="local",
                runtime_id=f"{i}:0:bench",
                port=33000 + i,
                state="ready",
            )
        )
        deployments.append(d)
    target = deployments[0]

    shares = [0.05, 0.2, 0.3, 0.2, 0.1, 0.08, 0.04, 0.02, 0.005, 0.003, 0.001, 0.001, 0.0, 0.0, 0.0]

    def samples_for(deployment_id: int, version: int, interval: int, t0: int, t1: int) -> list:
        times = np.arange(t0 + interval, t1 + 1, interval)
        requests = rng.poisson(interval * 5, times.size)
        histograms = rng.multinomial(requests, shares)
        return [
            services.TrafficIn(
                deployment_id=deployment_id,
                model_version=version,
                instance=f"r1#{version}",
                start=float(t - interval),
                ts=float(t),
                requests=int(r),
                errors=int(r) // 100,
                latency_sum=int(r) * 0.004,
                buckets=h.tolist(),
            )
            for t, r, h in zip(times.tolist(), requests.tolist(), histograms, strict=True)
        ]

    # --- 1. batched ingestion ------------------------------------------------------------------
    print("generating samples ...", flush=True)
    target_samples = samples_for(target.pk, 1, 15, start, now) + samples_for(
        target.pk, 2, 15, start, now
    )
    other_samples = [s for d in deployments[1:] for s in samples_for(d.pk, 2, 60, start, now)]
    batch = 5000

    batch_rates: list[float] = []

    def ingest(samples):
        started = time.perf_counter()
        for i in range(0, len(samples), batch):
            t0 = time.perf_counter()
            services.traffic_ingest(samples=samples[i : i + batch])
            batch_rates.append(len(samples[i : i + batch]) / (time.perf_counter() - t0))
        return time.perf_counter() - started

    print(f"ingesting {len(target_samples):,} + {len(other_samples):,} samples ...", flush=True)
    t_target = ingest(target_samples)
    t_other = ingest(other_samples)
    total = len(target_samples) + len(other_samples)
    results.append(
        (
            "traffic samples ingested (batches of 5,000; raw rows + minute/hour rollups)",
            f"{total / (t_target + t_other):,.0f} samples/s overall ({total:,} in {t_target + t_other:.1f} s); "
            f"median batch {statistics.median(batch_rates):,.0f}/s, best {max(batch_rates):,.0f}/s",
        )
    )
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    results.append(
        (
            "table sizes",
            f"raw {TrafficSample.objects.count():,}, minute {TrafficMinute.objects.count():,}, "
            f"hour {TrafficHour.objects.count():,} rows",
        )
    )

    # --- 2. the per-scrape path ---------------------------------------------------------------------
    scrape_inst = instances[-1]
    process = Metrics("bench", "2")
    process.start_time = now - 5
    at = float(now)
    services.scrape_record(
        instance_id=scrape_inst.pk, counters=serving_counters(process.render().decode()), at=at
    )
    n_scrapes = 2000
    texts = []
    for _ in range(n_scrapes):
        for _ in range(20):
            process.observe_request("/invocations", 200, 0.003)
        texts.append(process.render().decode())
    started = time.perf_counter()
    for i, text in enumerate(texts):
        services.scrape_record(
            instance_id=scrape_inst.pk, counters=serving_counters(text), at=at + 15 * (i + 1)
        )
    elapsed = time.perf_counter() - started
    results.append(
        (
            "per-scrape path (parse /metrics, one transaction per scrape)",
            f"{n_scrapes / elapsed:,.0f} scrapes/s ({elapsed / n_scrapes * 1000:.2f} ms each)",
        )
    )

    # --- 3. prediction log ingestion ----------------------------------------------------------------------
    pred_inst = instances[1]
    n_records, page_size = 50_000, 5000
    features = rng.normal(size=(n_records, 5)).round(4)
    records = [
        {
            "v": 1,
            "seq": i + 1,
            "request_id": f"req-{i}",
            "ts": float(now - 3600 + i * 0.05),
            "model": "bench",
            "version": "2",
            "endpoint": "/invocations",
            "latency_ms": 1.2,
            "n_rows": 1,
            "outputs": [int(i % 2)],
            "inputs": {f"f{j}": [float(features[i, j])] for j in range(5)},
        }
        for i in range(n_records)
    ]
    started = time.perf_counter()
    for i in range(0, n_records, page_size):
        chunk = records[i : i + page_size]
        services.predictions_ingest(
            instance_id=pred_inst.pk,
            boot_id="bench-boot",
            after=i,
            page={"boot_id": "bench-boot", "next": chunk[-1]["seq"], "records": chunk},
        )
    elapsed = time.perf_counter() - started
    results.append(
        (
            "prediction log records ingested (pages of 5,000, with inputs: drift counted)",
            f"{n_records / elapsed:,.0f} records/s",
        )
    )
    labels = [{"request_id": f"req-{i}", "label": int(rng.random() < 0.5)} for i in range(10_000)]
    elapsed = median_ms(
        lambda: services.feedback_record(deployment=deployments[1], items=labels, actor=None), 3
    )
    results.append(("feedback call of 10,000 labels (service)", f"{elapsed:,.0f} ms"))

    # --- 4. the 30-day, one-minute query -------------------------------------------------------------------
    for name in ("requests", "latency_p95", "error_rate"):
        points = selectors.metric_points(
            deployment_id=target.pk, name=name, start=start, end=now, step=60
        )
        assert len(points) >= 43_000, len(points)
        results.append(
            (
                f"30 days at 60 s, {name} (selector, {len(points):,} points)",
                timed(
                    lambda name=name: selectors.metric_points(
                        deployment_id=target.pk, name=name, start=start, end=now, step=60
                    ),
                    9,
                ),
            )
        )

    user = get_user_model().objects.create_user(
        "bench", password="bench-password-123", is_staff=True
    )
    from django.contrib.auth.models import Group

    user.groups.add(Group.objects.get(name="viewer"))  # reading metrics needs a role
    client = Client(HTTP_HOST="localhost")
    client.force_login(user)
    from datetime import UTC, datetime

    params = {
        "name": "latency_p95",
        "step": "60",
        "from": datetime.fromtimestamp(start, tz=UTC).isoformat(),
        "to": datetime.fromtimestamp(now, tz=UTC).isoformat(),
    }
    resp = client.get(f"/api/v1/deployments/{target.name}/metrics", params)
    assert resp.status_code == 200 and len(resp.json()["points"]) >= 43_000, resp.content[:300]
    for name in ("requests", "latency_p95"):
        results.append(
            (
                f"30 days at 60 s, {name} through the HTTP API (JSON, {len(resp.content) / 1024:,.0f} KiB)",
                timed(
                    lambda name=name: client.get(
                        f"/api/v1/deployments/{target.name}/metrics", {**params, "name": name}
                    ),
                    9,
                ),
            )
        )

    # --- 5. the chart page ------------------------------------------------------------------------------------
    for range_name in ("30d", "24h"):
        url = f"/monitoring/deployments/{target.name}/?range={range_name}"
        resp = client.get(url)
        assert resp.status_code == 200 and b"chart-latency" in resp.content
        results.append(
            (
                f"chart page, range {range_name} ({len(resp.content) / 1024:,.0f} KiB of HTML)",
                timed(lambda url=url: client.get(url), 7),
            )
        )

    results.append(
        (
            "load average of the machine (1, 5, 15 min) at the end",
            ", ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs",
        )
    )
    print()
    print("| measurement | result |")
    print("|---|---|")
    for label, value in results:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
