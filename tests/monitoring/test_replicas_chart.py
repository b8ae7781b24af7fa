"""Replicas over time on the monitoring page, from the autoscaler's samples."""

from __future__ import annotations

import json
import time

import pytest
from django.urls import reverse

from deployments.models import Deployment, DeploymentEvent, ScaleSample
from monitoring.replicas import replica_series

pytestmark = pytest.mark.django_db


def test_replicas_and_cold_starts_are_charted_beside_traffic(make_deployment, client_logged_in):
    make_deployment("auto")
    d = Deployment.objects.get(name="auto")
    d.autoscaling = {"min_replicas": 0, "max_replicas": 4, "target_in_flight": 8}
    d.autoscaled_replicas = 0
    d.save()
    now = int(time.time()) // 60 * 60
    # two minutes: 1 replica, up to 3 under load for 10 s, then 0
    replicas = [1] * 40 + [3] * 10 + [0] * 70
    ScaleSample.objects.bulk_create(
        ScaleSample(
            deployment=d,
            ts=now - 120 + i,
            replicas=r,
            ready=min(r, 2),
            in_flight=20 if r == 3 else 0,
            requests_total=i,
        )
        for i, r in enumerate(replicas)
    )
    DeploymentEvent.objects.create(deployment=d, kind="cold_start", message="replicas 0 → 1")
    d.cold_starts = 1
    d.save(update_fields=["cold_starts"])

    series = replica_series(deployment_id=d.pk, start=now - 120, end=now, step=30)
    assert [p.value for p in series["replicas"][None]] == [1, 3, 0, 0]
    assert [p.value for p in series["ready"][None]] == [1, 2, 0, 0]
    assert [round(p.value, 2) for p in series["in_flight"][None]] == [0, 6.67, 0, 0]

    page = client_logged_in.get(
        reverse("monitoring:deployment", kwargs={"name": "auto"}) + "?range=1h"
    ).content.decode()
    assert 'id="chart-replicas"' in page and "cold starts: 1 in range, 1 in all" in page
    # drawn right after the throughput chart
    assert (
        page.index("chart-throughput") < page.index("chart-replicas") < page.index("chart-errors")
    )
    figure = page[page.index('id="chart-replicas"') :]
    assert json.dumps("replicas wanted") in figure and json.dumps("cold start") in figure


def test_fixed_replica_deployments_have_no_replica_chart(make_deployment, client_logged_in):
    make_deployment("fixed")
    page = client_logged_in.get(
        reverse("monitoring:deployment", kwargs={"name": "fixed"})
    ).content.decode()
    assert "chart-replicas" not in page and "chart-throughput" in page
