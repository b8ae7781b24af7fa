"""What a user sees: no drift verdict against a tiny reference (and why), a reference uploaded
from the UI, feedback answers that tell pending labels from expired ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from audit.models import AuditEvent
from monitoring.models import DriftReference, PendingLabel
from tests.monitoring.conftest import ingest, iso, now_minute, record

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(make_deployment):
    # One version, so the version served is the one whose inputs are counted.
    return make_deployment("churn", (1,))


def _inputs(rows, *, t, seq=1):
    return [
        record(seq + i, f"q{seq + i}", t + i, [0], inputs={"f0": [a], "f1": [b]})
        for i, (a, b) in enumerate(rows)
    ]


def _drift_points(api, start, end):
    resp = api.get(
        "/api/v1/deployments/churn/metrics",
        {"name": "drift_psi", "from": iso(start), "to": iso(end), "step": "3600"},
    )
    assert resp.status_code == 200, resp.content
    return resp.json()["points"]


def test_the_input_example_reference_gives_no_drift_verdict_and_the_pages_say_why(
    api, fleet, client_logged_in
):
    t = now_minute() // 3600 * 3600
    # Far from the 4-row example: with a verdict this would be a large (red) PSI.
    ingest(fleet.instance(1), _inputs([(5.0, 40.0)] * 30, t=t))
    assert DriftReference.objects.get().n_rows == 4
    assert _drift_points(api, t, t + 3600) == []

    overview = client_logged_in.get("/monitoring/").content.decode()
    assert "no verdict: the reference has 4 rows, at least 100 are needed" in overview
    assert 'class="bad"' not in overview.split("Drift (PSI)")[1]
    page = client_logged_in.get("/monitoring/deployments/churn/").content.decode()
    assert "no verdict: the reference has 4 rows, at least 100 are needed" in page
    assert 'action="/monitoring/deployments/churn/drift-reference"' in page


def test_the_minimum_reference_size_is_a_setting(api, fleet, settings):
    settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS = 4
    t = now_minute() // 3600 * 3600
    ingest(fleet.instance(1), _inputs([(5.0, 40.0)] * 30, t=t))
    points = _drift_points(api, t, t + 3600)
    assert len(points) == 1 and points[0]["value"] > 0.25


def test_a_csv_reference_uploaded_in_the_ui_gives_a_verdict(api, fleet, client_logged_in):
    rows = "\n".join(f"{(i % 10) / 10 + 0.05},{i % 4 + 1}" for i in range(200))
    upload = SimpleUploadedFile("ref.csv", f"f0,f1\n{rows}\n".encode(), content_type="text/csv")
    resp = client_logged_in.post(
        "/monitoring/deployments/churn/drift-reference", {"file": upload}, follow=True
    )
    assert resp.status_code == 200
    assert "Drift reference of v1 uploaded: 200 rows, 2 features." in resp.content.decode()
    reference = DriftReference.objects.get(active=True)
    assert (reference.source, reference.n_rows) == ("dataset", 200)
    assert AuditEvent.objects.filter(action="monitoring.drift_reference").count() == 1
    # The API route reads the same reference.
    got = api.get("/api/v1/models/churn-model/versions/1/drift-reference").json()
    assert got["n_rows"] == 200 and got["features"] == ["f0", "f1"]

    t = now_minute() // 3600 * 3600
    like = [((i % 10) / 10 + 0.05, i % 4 + 1) for i in range(40)]
    ingest(fleet.instance(1), _inputs(like, t=t))
    points = _drift_points(api, t, t + 3600)
    assert len(points) == 1 and points[0]["value"] < 0.1
    page = client_logged_in.get("/monitoring/deployments/churn/").content.decode()
    assert "Drift is judged against it." in page


def test_a_json_reference_uploads_too_and_a_bad_file_changes_nothing(fleet, client_logged_in):
    bad = SimpleUploadedFile("ref.csv", b"f0,f1\n1,2,3\n", content_type="text/csv")
    resp = client_logged_in.post(
        "/monitoring/deployments/churn/drift-reference", {"file": bad}, follow=True
    )
    assert "Reference not uploaded: CSV line 2 has 3 fields, the header 2" in resp.content.decode()
    assert not DriftReference.objects.exists()
    assert not AuditEvent.objects.filter(action="monitoring.drift_reference").exists()
    good = SimpleUploadedFile(
        "ref.json", b'{"columns": ["f0"], "data": [[0.1], [0.2], [0.3]]}', "application/json"
    )
    client_logged_in.post("/monitoring/deployments/churn/drift-reference", {"file": good})
    assert DriftReference.objects.get(active=True).n_rows == 3


def test_feedback_for_predictions_not_collected_is_pending_and_expired_ones_unknown(api, fleet):
    resp = api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": "later", "label": 1}, {"request_id": "old", "label": 0}],
    )
    body = resp.json()
    assert (body["pending"], body["unknown"]) == (2, 0)
    assert sorted(body["pending_request_ids"]) == ["later", "old"]
    # "old" waited past the retention period: posted again, it is dropped as unknown.
    PendingLabel.objects.filter(request_id="old").update(
        received_at=timezone.now() - timedelta(days=31)
    )
    body = api.post(
        "/api/v1/deployments/churn/feedback",
        [{"request_id": "later", "label": 1}, {"request_id": "old", "label": 0}],
    ).json()
    assert (body["pending"], body["pending_request_ids"]) == (1, ["later"])
    assert (body["unknown"], body["unknown_request_ids"]) == (1, ["old"])
    assert list(PendingLabel.objects.values_list("request_id", flat=True)) == ["later"]
    # The pending label is applied when its prediction is collected.
    t = now_minute()
    ingest(fleet.instance(1), [record(1, "later", t, [1])])
    assert not PendingLabel.objects.exists()


# --- charts ----------------------------------------------------------------------------------


def _page(client, query=""):
    from tests.monitoring.test_ui import figures

    resp = client.get(f"/monitoring/deployments/churn/{query}")
    assert resp.status_code == 200
    html = resp.content.decode()
    return html, figures(html)


def test_the_default_range_is_what_the_deployment_has_data_for(fleet, client_logged_in):
    html, _ = _page(client_logged_in)
    assert 'href="?range=1h" aria-current="true"' in html  # created moments ago: not 24 h
    fleet.deployment.__class__.objects.filter(pk=fleet.deployment.pk).update(
        created_at=timezone.now() - timedelta(days=3)
    )
    html, _ = _page(client_logged_in)
    assert 'href="?range=7d" aria-current="true"' in html
    html, _ = _page(client_logged_in, "?range=24h")  # an explicit range is kept
    assert 'href="?range=24h" aria-current="true"' in html


def _event(deployment, revision, kind, at):
    from deployments.models import DeploymentEvent

    event = DeploymentEvent.objects.create(
        deployment=deployment, revision=revision, kind=kind, message=kind
    )
    DeploymentEvent.objects.filter(pk=event.pk).update(created_at=at)


def test_close_deploy_markers_merge_into_one_labelled_line(fleet, client_logged_in):
    now = timezone.now()
    rev = fleet.revisions[1]
    for seconds in (300, 240, 200, 170):  # four events within ~2 minutes: a smear at 1 h
        _event(fleet.deployment, rev, "traffic", now - timedelta(seconds=seconds))
    _event(fleet.deployment, rev, "rollback", now - timedelta(seconds=2400))
    _, figs = _page(client_logged_in, "?range=1h")
    layout = figs["chart-throughput"]["layout"]
    texts = [a["text"] for a in layout["annotations"]]
    assert texts == ["rollback r1 (v1)", "4 events, last: deploy r1 (v1)"]
    marker_lines = [s for s in layout["shapes"] if s.get("yref") == "paper"]
    assert len(marker_lines) == 2
    # At 7 days the same events are still one line each at most, never more than at 1 h.
    _, figs = _page(client_logged_in, "?range=7d")
    # ... and a rollback among them stays named.
    assert [a["text"] for a in figs["chart-throughput"]["layout"]["annotations"]] == [
        "5 events, last: deploy r1 (v1) after rollback r1 (v1)"
    ]


def test_an_hourly_drift_point_covers_its_hour_from_the_deploy_not_before_it(
    fleet, client_logged_in, settings
):
    from monitoring.models import DriftHour

    settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS = 1
    hour = now_minute() // 3600 * 3600 - 3600  # the last full hour
    deploy = hour + 40 * 60
    ingest(fleet.instance(1), _inputs([(5.0, 40.0)] * 10, t=deploy + 60))
    assert DriftHour.objects.filter(bucket=hour).exists()
    _event(
        fleet.deployment,
        fleet.revisions[1],
        "traffic",
        datetime.fromtimestamp(deploy, tz=UTC),
    )
    _, figs = _page(client_logged_in, "?range=24h")
    trace = figs["chart-drift"]["data"][0]
    assert trace["x"][:2] == [iso(deploy), iso(hour + 3600)]
    assert trace["y"][0] == trace["y"][1] > 0.25


def test_charts_are_chosen_by_the_models_task(fleet, client_logged_in):
    mv = fleet.revisions[1].model_version
    mv.signature = {"inputs": [], "outputs": [{"type": "long"}]}
    mv.save()
    _, figs = _page(client_logged_in)
    assert "chart-accuracy" in figs and "chart-regression" not in figs
    mv.signature = {"inputs": [], "outputs": [{"type": "double"}]}
    mv.save()
    _, figs = _page(client_logged_in)
    assert "chart-regression" in figs and "chart-accuracy" not in figs
    mv.signature = {"outputs": [{"type": "tensor", "tensor-spec": {"dtype": "int64"}}]}
    mv.save()
    _, figs = _page(client_logged_in)
    assert "chart-accuracy" in figs and "chart-regression" not in figs


# --- Prometheus service discovery ------------------------------------------------------------

SD_TOKEN = "sd-token-0123456789abcdef"


def _targets(client, token=SD_TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get("/api/v1/prometheus/targets", headers=headers)


def test_service_discovery_lists_tcp_servers_directly_and_socket_ones_through_the_control_plane(
    make_deployment, client, settings, monkeypatch
):
    import deployments.runtimes as runtimes
    from deployments.models import Deployment, Instance

    settings.CONTROLPLANE_PROMETHEUS_TOKEN = SD_TOKEN
    tcp = make_deployment("tcp", (1,))
    sock = make_deployment("sock", (1,))
    off = make_deployment("off", (1,))
    Deployment.objects.filter(pk=off.deployment.pk).update(stopped=True)
    Deployment.objects.filter(pk=tcp.deployment.pk).update(router_pid="123:1:router")
    crashed = Instance.objects.get(pk=tcp.instance(1).pk)
    crashed.pk, crashed.ordinal, crashed.port = None, 1, crashed.port + 500
    crashed.state = Instance.State.CRASHED
    crashed.save()
    socket_port = sock.instance(1).port
    monkeypatch.setattr(
        runtimes,
        "instance_address",
        lambda runtime, port, runtime_id="": (
            f"unix:/run/s/{port}.sock" if port == socket_port else f"127.0.0.1:{port}"
        ),
    )

    assert _targets(client, token=None).status_code == 403
    assert _targets(client, token="wrong-token-0123456789").status_code == 403
    resp = _targets(client)
    assert resp.status_code == 200 and resp["Content-Type"] == "application/json"
    groups = resp.json()
    assert [(g["labels"]["deployment"], g["labels"]["kind"]) for g in groups] == [
        ("sock", "model_server"),
        ("tcp", "model_server"),
        ("tcp", "router"),
    ]
    sock_group, tcp_group, router = groups
    assert tcp_group == {
        "targets": [f"127.0.0.1:{tcp.instance(1).port}"],
        "labels": {
            "kind": "model_server",
            "deployment": "tcp",
            "model": "tcp-model",
            "version": "1",
            "revision": "1",
            "runtime": "local",
            "replica": "0",
        },
    }
    assert sock_group["targets"] == ["testserver"]
    assert sock_group["labels"]["__metrics_path__"] == (
        "/api/v1/prometheus/instances/sock/1/0/metrics"
    )
    assert sock_group["labels"]["via"] == "control_plane"
    assert router["targets"] == [f"127.0.0.1:{tcp.deployment.port}"]
    # The relay path answers only the Prometheus token, and only for a running instance.
    path = sock_group["labels"]["__metrics_path__"]
    assert client.get(path).status_code == 403
    missing = client.get(
        "/api/v1/prometheus/instances/sock/1/7/metrics",
        headers={"Authorization": f"Bearer {SD_TOKEN}"},
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    unreachable = client.get(path, headers={"Authorization": f"Bearer {SD_TOKEN}"})
    assert unreachable.status_code == 502  # no server at /run/s/...: a JSON error, not a 500
    assert unreachable.json()["error"]["code"] == "unreachable"


def test_the_control_plane_metrics_include_replicas(fleet, client, settings):
    settings.CONTROLPLANE_PROMETHEUS_TOKEN = SD_TOKEN
    text = client.get("/metrics", headers={"Authorization": f"Bearer {SD_TOKEN}"}).content
    assert (
        b'controlplane_deployment_replicas_ready{deployment="churn",model="churn-model"} 1.0'
        in text
    )
    assert (
        b'controlplane_deployment_replicas_desired{deployment="churn",model="churn-model"} 1.0'
        in text
    )
