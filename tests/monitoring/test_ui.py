"""The monitoring pages: Plotly charts holding the data (one line per model version, deploy
and rollback markers, a range picker), plotly.js served locally, the fleet page, alert
rules managed in the UI and the admin."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.staticfiles import finders
from django.core.management import call_command

from audit.models import AuditEvent
from deployments.models import DeploymentEvent
from monitoring import services
from monitoring.models import AlertRule
from monitoring.promtext import serving_counters
from tests.monitoring.conftest import ingest, iso, now_minute, record

pytestmark = pytest.mark.django_db


def figures(html: str) -> dict[str, dict]:
    """{div id: {"data": traces, "layout": layout}} of every Plotly.newPlot call in the page."""
    decoder = json.JSONDecoder()
    out = {}
    for match in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*', html):
        data, end = decoder.raw_decode(html, match.end())
        end = html.index("{", end)
        layout, _ = decoder.raw_decode(html, end)
        out[match.group(1)] = {"data": data, "layout": layout}
    return out


@pytest.fixture
def monitored(fleet, server, api):
    """Traffic on two versions, labels, a probe and a deploy then a rollback, all recent."""
    base = now_minute() - 600
    for version, (ok, errors) in {1: (120, 0), 2: (240, 12)}.items():
        process = server(str(version), start=base)
        process.serve(ok, seconds=0.003 * version)
        process.serve(errors, status=500)
        services.scrape_record(
            instance_id=fleet.instance(version).pk,
            counters=serving_counters(process.text()),
            at=base + 60,
        )
    ingest(
        fleet.instance(2),
        [record(i, f"r{i}", base + i, [i % 2], version="2") for i in range(1, 11)],
    )
    api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": f"r{i}", "label": 1} for i in range(1, 11)],
    )
    services.probe_record(
        deployment_id=fleet.deployment.pk,
        ok=True,
        latency_ms=12.5,
        status_code=200,
        model_version="2",
        kind="example",
        error="",
        at=fleet.deployment.created_at,
    )
    d = fleet.deployment
    deployed = DeploymentEvent.objects.create(
        deployment=d, revision=fleet.revisions[2], kind="traffic", message="traffic moved to r2"
    )
    # Apart enough to be two markers (close ones merge into one: test_ux.py).
    DeploymentEvent.objects.filter(pk=deployed.pk).update(
        created_at=deployed.created_at - timedelta(minutes=20)
    )
    DeploymentEvent.objects.create(
        deployment=d, revision=fleet.revisions[1], kind="rollback", message="rollback from r2 to r1"
    )
    return base


def test_the_chart_page_holds_the_figures_with_the_data(client_logged_in, api, monitored):
    resp = client_logged_in.get("/monitoring/deployments/churn/?range=1h")
    assert resp.status_code == 200
    html = resp.content.decode()
    figs = figures(html)
    assert {
        "chart-latency",
        "chart-throughput",
        "chart-errors",
        "chart-accuracy",
        "chart-drift",
        "chart-probes",
    } <= set(figs)
    # One line per model version, with the numbers the API gives for the same windows.
    throughput = {t["name"]: t for t in figs["chart-throughput"]["data"]}
    assert set(throughput) == {"v1", "v2"}
    for version in ("1", "2"):
        api_points = api.get(
            "/api/v1/deployments/churn/metrics",
            {
                "name": "throughput",
                "version": version,
                "from": iso(monitored - 60),
                "to": iso(monitored + 120),
                "step": "60",
            },
        ).json()["points"]
        trace = throughput[f"v{version}"]
        got = {x: y for x, y in zip(trace["x"], trace["y"], strict=False) if y is not None}
        assert got == {p["t"]: p["value"] for p in api_points}
    assert sum(y for y in throughput["v2"]["y"] if y) * 60 == pytest.approx(252)
    errors = {t["name"]: t for t in figs["chart-errors"]["data"]}
    assert max(y for y in errors["v2"]["y"] if y is not None) == pytest.approx(100 * 12 / 252)
    latency_names = {t["name"] for t in figs["chart-latency"]["data"]}
    assert {"v1 p50", "v1 p95", "v1 p99", "v2 p50", "v2 p95", "v2 p99"} == latency_names
    accuracy = figs["chart-accuracy"]["data"]
    assert [t["name"] for t in accuracy] == ["v2"] and [
        y for y in accuracy[0]["y"] if y is not None
    ] == [0.5]
    assert [y for y in figs["chart-probes"]["data"][0]["y"] if y is not None] == [12.5]
    # Deploy and rollback markers on the time axis of every chart (the version comparison's
    # bar charts have no time axis).
    for fig in (f for name, f in figs.items() if not name.startswith("chart-ab-")):
        labels = [a["text"] for a in fig["layout"]["annotations"]]
        assert labels == ["deploy r2 (v2)", "rollback r1 (v1)"]
        assert len([s for s in fig["layout"]["shapes"] if s["yref"] == "paper"]) == 2


def test_plotly_js_is_served_locally_never_from_a_cdn(
    client_logged_in, monitored, tmp_path, settings
):
    html = client_logged_in.get("/monitoring/deployments/churn/").content.decode()
    assert re.search(r'<script src="/static/monitoring/plotly\.min\.js\?v=[\d.]+"></script>', html)
    assert "cdn" not in html.lower() and "https://" not in html
    path = finders.find("monitoring/plotly.min.js")
    assert path and Path(path).stat().st_size > 1_000_000
    assert Path(path).read_text(errors="replace")[:400].lower().count("plotly") > 0
    settings.STATIC_ROOT = tmp_path
    call_command("collectstatic", "--noinput", "-v", "0")
    assert (tmp_path / "monitoring" / "plotly.min.js").stat().st_size == Path(path).stat().st_size


def test_the_range_picker_changes_the_window(client_logged_in, monitored):
    for name, step in (("1h", 60), ("24h", 300), ("7d", 1800), ("30d", 7200)):
        resp = client_logged_in.get(f"/monitoring/deployments/churn/?range={name}")
        assert resp.status_code == 200
        assert resp.context["step"] == step
        x_range = figures(resp.content.decode())["chart-latency"]["layout"]["xaxis"]["range"]
        assert x_range[0] < x_range[1]
    # An unknown range falls back to the default: what the deployment has data for (minutes).
    assert (
        client_logged_in.get("/monitoring/deployments/churn/?range=forever").context["range"]
        == "1h"
    )
    html = client_logged_in.get("/monitoring/deployments/churn/").content.decode()
    assert all(f'href="?range={r}"' in html for r in ("1h", "24h", "7d", "30d"))


def test_an_unknown_deployment_page_is_404(client_logged_in, db):
    assert client_logged_in.get("/monitoring/deployments/nope/").status_code == 404


def test_the_fleet_page_shows_every_deployment_at_a_glance(
    client_logged_in, monitored, make_deployment, django_assert_max_num_queries
):
    make_deployment("idle", (1,))
    resp = client_logged_in.get("/monitoring/")
    html = resp.content.decode()
    assert resp.status_code == 200
    assert (
        'href="/monitoring/deployments/churn/"' in html
        and 'href="/monitoring/deployments/idle/"' in html
    )
    churn = next(r for r in resp.context["rows"] if r.deployment.name == "churn")
    assert churn.requests == 372 and churn.accuracy == 0.5 and churn.probe_ok is True
    assert churn.error_rate == pytest.approx(12 / 372) and churn.latency_p95 > 0
    # A fixed number of queries, whatever the number of deployments.
    with django_assert_max_num_queries(14) as few:
        client_logged_in.get("/monitoring/")
    for i in range(5):
        make_deployment(f"more-{i}", (1,))
    with django_assert_max_num_queries(len(few.captured_queries)):
        client_logged_in.get("/monitoring/")


def test_alert_rules_are_managed_in_the_ui(client_logged_in, fleet):
    resp = client_logged_in.post(
        "/monitoring/alerts/new",
        {
            "name": "slow",
            "deployment": "churn",
            "metric": "latency_p95",
            "comparison": "gt",
            "threshold": "250",
            "window_s": "300",
            "min_samples": "20",
            "enabled": "on",
        },
    )
    rule = AlertRule.objects.get(name="slow")
    assert resp.status_code == 302 and resp["Location"] == f"/monitoring/alerts/{rule.pk}/"
    page = client_logged_in.get(f"/monitoring/alerts/{rule.pk}/")
    assert page.status_code == 200 and "slow" in page.content.decode()
    resp = client_logged_in.post(
        f"/monitoring/alerts/{rule.pk}/",
        {
            "name": "slow",
            "deployment": "churn",
            "metric": "latency_p99",
            "comparison": "gte",
            "threshold": "500",
            "window_s": "600",
            "min_samples": "20",
            "enabled": "on",
        },
    )
    assert resp.status_code == 302
    rule.refresh_from_db()
    assert (rule.metric, rule.comparison, rule.threshold, rule.window_s) == (
        "latency_p99",
        "gte",
        500,
        600,
    )
    bad = client_logged_in.post(
        f"/monitoring/alerts/{rule.pk}/",
        {
            "name": "slow",
            "deployment": "churn",
            "metric": "latency_p99",
            "comparison": "gte",
            "threshold": "5",
            "window_s": "600",
            "min_samples": "1",
            "webhook_url": "http://10.0.0.1/x",
            "enabled": "on",
        },
    )
    assert bad.status_code == 200 and "private" in bad.content.decode()
    assert "slow" in client_logged_in.get("/monitoring/alerts/").content.decode()
    assert client_logged_in.post(f"/monitoring/alerts/{rule.pk}/delete").status_code == 302
    assert not AlertRule.objects.exists()
    assert list(
        AuditEvent.objects.filter(object_type="alert_rule").values_list("action", flat=True)
    ) == ["alert_rule.delete", "alert_rule.update", "alert_rule.create"]


def test_alert_rules_are_managed_in_the_admin(client, django_user_model, fleet):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    resp = client.post(
        "/admin/monitoring/alertrule/add/",
        {
            "name": "drifty",
            "deployment": fleet.deployment.pk,
            "metric": "drift_psi",
            "comparison": "gt",
            "threshold": "0.25",
            "window_s": "3600",
            "min_samples": "100",
            "enabled": "on",
        },
    )
    assert resp.status_code == 302, resp.content.decode()[:2000]
    rule = AlertRule.objects.get(name="drifty")
    assert len(rule.webhook_secret) == 64
    resp = client.post(
        f"/admin/monitoring/alertrule/{rule.pk}/change/",
        {
            "name": "drifty",
            "metric": "drift_psi",
            "comparison": "gt",
            "threshold": "0.3",
            "window_s": "3600",
            "min_samples": "100",
            "enabled": "on",
            "webhook_url": "http://192.168.1.1/x",
        },
    )
    assert (
        resp.status_code == 200 and "private" in resp.content.decode()
    )  # refused by the same rules
    assert (
        client.post(f"/admin/monitoring/alertrule/{rule.pk}/delete/", {"post": "yes"}).status_code
        == 302
    )
    assert list(
        AuditEvent.objects.filter(object_type="alert_rule").values_list("action", flat=True)
    ) == ["alert_rule.delete", "alert_rule.create"]
    assert client.get("/admin/django_celery_beat/periodictask/").status_code == 200


def test_monitoring_pages_need_a_login(client, fleet):
    for url in (
        "/monitoring/",
        "/monitoring/deployments/churn/",
        "/monitoring/alerts/",
        "/monitoring/alerts/new",
    ):
        resp = client.get(url)
        assert resp.status_code == 302 and "/login/" in resp["Location"], url


def test_the_deployment_page_links_to_its_monitoring_page(client_logged_in, fleet):
    from django.urls import NoReverseMatch, reverse

    assert reverse("monitoring:deployment", args=["churn"]) == "/monitoring/deployments/churn/"
    assert reverse("monitoring:overview") == "/monitoring/"
    page = client_logged_in.get("/monitoring/")
    assert 'href="/monitoring/"' in page.content.decode()  # the Monitoring entry of the main menu
    try:
        detail = client_logged_in.get(reverse("deployments:deployment-detail", args=["churn"]))
    except NoReverseMatch:
        return
    assert "/monitoring/deployments/churn/" in detail.content.decode()
