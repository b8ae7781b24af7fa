"""The control plane's own /metrics (token or allow-list), every new API route refusing
anonymous callers, and the periodic schedules."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import override_settings

from controlplane.celery import app
from monitoring import services
from monitoring.promtext import parse, serving_counters
from tests.monitoring.conftest import now_minute

pytestmark = pytest.mark.django_db

TOKEN = "prometheus-token-0123456789"


@pytest.fixture
def busy(fleet, server):
    base = now_minute() - 120
    process = server("2", start=base)
    process.serve(95)
    process.serve(5, status=500)
    services.scrape_record(
        instance_id=fleet.instance(2).pk, counters=serving_counters(process.text()), at=base + 60
    )
    return fleet


def test_metrics_answer_nobody_by_default(client, busy):
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403


@override_settings(CONTROLPLANE_PROMETHEUS_TOKEN=TOKEN)
def test_metrics_answer_the_bearer_token(client, busy):
    assert (
        client.get(
            "/metrics", headers={"Authorization": "Bearer wrong-token-000000000"}
        ).status_code
        == 403
    )
    resp = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200 and resp["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in parse(resp.content.decode())
    }
    assert samples[("controlplane_deployments", (("status", "ready"),))] == 1
    key = (("deployment", "churn"), ("model", "churn-model"))
    assert samples[("controlplane_deployment_requests_per_second", key)] > 0
    assert samples[("controlplane_deployment_error_ratio", key)] == pytest.approx(0.05)
    assert samples[("controlplane_deployment_up", key)] == 1
    assert ("controlplane_deployment_latency_p95_seconds", key) in samples


@override_settings(CONTROLPLANE_PROMETHEUS_ALLOW=["10.0.0.0/8", "127.0.0.1"])
def test_metrics_answer_an_allowed_address(client, busy):
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="10.20.30.40").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.168.0.9").status_code == 403
    assert client.post("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 405


ROUTES = [
    ("get", "/api/v1/deployments/churn/metrics?name=requests"),
    ("post", "/api/v1/deployments/churn/feedback"),
    ("get", "/api/v1/deployments/churn/probes"),
    ("get", "/api/v1/alert-rules"),
    ("post", "/api/v1/alert-rules"),
    ("get", "/api/v1/alert-rules/1"),
    ("patch", "/api/v1/alert-rules/1"),
    ("delete", "/api/v1/alert-rules/1"),
    ("get", "/api/v1/alert-rules/1/events"),
    ("get", "/api/v1/models/churn-model/versions/1/drift-reference"),
    ("put", "/api/v1/models/churn-model/versions/1/drift-reference"),
]


@pytest.mark.parametrize(("method", "url"), ROUTES)
def test_every_monitoring_api_route_refuses_anonymous_callers(client, fleet, method, url):
    resp = (
        getattr(client, method)(url, data="[]", content_type="application/json")
        if method != "get"
        else client.get(url)
    )
    assert resp.status_code in (401, 403), (method, url, resp.status_code)
    assert resp.json()["error"]["code"] == "not_authenticated"


@pytest.mark.parametrize(("method", "url"), [r for r in ROUTES if r[0] != "get"])
def test_monitoring_writes_need_the_monitoring_scope(api_as, user, fleet, method, url):
    reader = api_as(user, ["read", "deploy", "registry:write"])
    resp = getattr(reader.client, method)(
        url,
        data=[] if "feedback" in url else {},
        content_type="application/json",
        headers=reader.headers,
    )
    assert resp.status_code == 403, (method, url, resp.status_code)


def test_the_schedules_are_declared_once_in_settings_with_their_intervals():
    schedule = settings.CELERY_BEAT_SCHEDULE
    assert schedule["monitoring-collect"]["task"] == "monitoring.tasks.collect_all"
    assert (
        schedule["monitoring-collect"]["schedule"]
        == float(settings.CONTROLPLANE_METRICS_INTERVAL)
        == 15.0
    )
    assert schedule["monitoring-probe"]["task"] == "monitoring.tasks.probe_all"
    assert (
        schedule["monitoring-probe"]["schedule"]
        == float(settings.CONTROLPLANE_PROBE_INTERVAL)
        == 300.0
    )
    assert schedule["monitoring-alerts"]["task"] == "monitoring.tasks.evaluate_alerts"
    assert schedule["monitoring-retention"]["task"] == "monitoring.tasks.apply_retention"
    app.loader.import_default_modules()
    for entry in schedule.values():
        assert entry["task"] in app.tasks, entry["task"]
    assert settings.CELERY_BEAT_SCHEDULER == "django_celery_beat.schedulers:DatabaseScheduler"


def test_the_schedules_become_editable_periodic_tasks(db):
    """django-celery-beat's scheduler writes the declared entries to the database, where the
    admin edits them."""
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import ModelEntry

    # What DatabaseScheduler.setup_schedule does with the declared schedule when beat starts.
    for name, fields in settings.CELERY_BEAT_SCHEDULE.items():
        ModelEntry.from_entry(name, app=app, **fields)
    probe = PeriodicTask.objects.get(name="monitoring-probe")
    assert probe.task == "monitoring.tasks.probe_all" and probe.interval.every == 300
    assert PeriodicTask.objects.get(name="monitoring-collect").interval.every == 15


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/deployments/%00/metrics?name=requests",
        "/api/v1/alert-rules?deployment=%00",
        "/api/v1/models/%00/versions/1/drift-reference",
        "/api/v1/deployments/Not_A_Slug/probes",
    ],
)
def test_impossible_names_are_404_not_500(api, fleet, url):
    assert api.get(url).status_code == 404
