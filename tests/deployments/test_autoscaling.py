"""Autoscaling through the API (validation, audit, no new revision) and, end to end on the
local runtime with a real model server and router: scale to zero after an idle period, then
the first request is held by the router and answered once an instance has started, and the
cold start is counted."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from audit.models import AuditEvent
from deployments.models import Deployment, DeploymentEvent, Instance, Revision, ScaleSample
from deployments.reconciler import reconcile
from deployments.scaling import deployment_autoscale, router_stats
from tests.deployments.conftest import converge

pytestmark = pytest.mark.django_db

POLICY = {"min_replicas": 1, "max_replicas": 4, "target_in_flight": 8}


@pytest.fixture
def model(api, registered):
    return registered(1)


BAD = [
    ("yes", "must be an object"),
    ({"max_replicas": 4, "target_in_flight": 8, "speed": 2}, "does not take speed"),
    ({"min_replicas": 1, "target_in_flight": 8}, "max_replicas is required"),
    ({"min_replicas": -1, "max_replicas": 4, "target_in_flight": 8}, "min_replicas"),
    ({"min_replicas": 1, "max_replicas": 99, "target_in_flight": 8}, "max_replicas"),
    ({"min_replicas": 5, "max_replicas": 4, "target_in_flight": 8}, "must not exceed"),
    ({"min_replicas": 1, "max_replicas": 4}, "target_in_flight is required"),
    ({"min_replicas": 1, "max_replicas": 4, "target_in_flight": 0}, "target_in_flight"),
    ({"min_replicas": 1, "max_replicas": 4, "target_in_flight": True}, "target_in_flight"),
    ({**POLICY, "target_rps": -3}, "target_rps"),
    ({**POLICY, "scale_down_window_s": 0}, "scale_down_window_s"),
    ({**POLICY, "idle_before_zero_s": "soon"}, "idle_before_zero_s"),
]


def test_bad_autoscaling_is_400_and_changes_nothing(api, model):
    """Every case on create and on PATCH, against one model (uploads are slow)."""
    api.post("/api/v1/deployments", {"name": "fixed", "model": model, "version": "1"})
    audits = AuditEvent.objects.count()
    for autoscaling, fragment in BAD:
        resp = api.post(
            "/api/v1/deployments",
            {"name": "auto", "model": model, "version": "1", "autoscaling": autoscaling},
        )
        assert resp.status_code == 400, (autoscaling, resp.content)
        error = resp.json()["error"]
        assert error["code"] == "invalid_autoscaling" and fragment in error["message"], error
        assert not Deployment.objects.filter(name="auto").exists()

        resp = api.patch("/api/v1/deployments/fixed", {"autoscaling": autoscaling})
        assert resp.status_code == 400, (autoscaling, resp.content)
        assert resp.json()["error"]["code"] == "invalid_autoscaling"
        d = Deployment.objects.get(name="fixed")
        assert d.autoscaling is None and d.autoscaled_replicas is None
    assert AuditEvent.objects.count() == audits


def test_setting_a_policy_is_audited_and_makes_no_revision(api, model):
    api.post("/api/v1/deployments", {"name": "auto", "model": model, "version": "1"})
    resp = api.patch("/api/v1/deployments/auto", {"autoscaling": {**POLICY, "min_replicas": 2}})
    assert resp.status_code in (200, 202), resp.content
    shown = resp.json()["autoscaling"]
    assert shown["min_replicas"] == 2 and shown["max_replicas"] == 4
    assert shown["replicas"] == 2  # the fixed 1 replica, raised to the minimum
    assert shown["scale_down_window_s"] == 60 and shown["scale_up_window_s"] == 6
    assert Revision.objects.filter(deployment__name="auto").count() == 1
    audit = AuditEvent.objects.filter(action="deployment.update", object_id="auto").get()
    assert audit.before["autoscaling"] is None and audit.after["autoscaling"]["min_replicas"] == 2
    assert DeploymentEvent.objects.filter(deployment__name="auto", kind="autoscaling").exists()
    # the same policy again changes nothing
    api.patch("/api/v1/deployments/auto", {"autoscaling": {**POLICY, "min_replicas": 2}})
    assert AuditEvent.objects.filter(action="deployment.update", object_id="auto").count() == 1
    # null turns it off: fixed replicas again
    resp = api.patch("/api/v1/deployments/auto", {"autoscaling": None})
    assert resp.json()["autoscaling"] is None
    assert Deployment.objects.get(name="auto").autoscaled_replicas is None


def test_the_deployment_page_shows_the_policy(api, model, client_logged_in):
    api.post(
        "/api/v1/deployments",
        {
            "name": "auto",
            "model": model,
            "version": "1",
            "autoscaling": {**POLICY, "min_replicas": 0},
        },
    )
    page = client_logged_in.get("/deployments/auto/").content.decode()
    assert "Autoscaling" in page and "0–4 replicas" in page and "8 in flight" in page


def test_the_scale_page_turns_autoscaling_on_and_off(api, model, client_logged_in):
    api.post("/api/v1/deployments", {"name": "auto", "model": model, "version": "1"})
    form = {
        "replicas": "1",
        "autoscale": "on",
        "min_replicas": "0",
        "max_replicas": "3",
        "target_in_flight": "4",
    }
    review = client_logged_in.post("/deployments/auto/scale", form).content.decode()
    assert "off (fixed replicas)" in review and "0–3 replicas, target 4 in flight" in review
    assert not Deployment.objects.get(name="auto").autoscaling  # only the review so far
    resp = client_logged_in.post("/deployments/auto/scale", {**form, "confirm": "yes"}, follow=True)
    assert "Autoscaling updated: no new revision." in resp.content.decode()
    d = Deployment.objects.get(name="auto")
    assert d.autoscaling == {"min_replicas": 0, "max_replicas": 3, "target_in_flight": 4}
    assert d.revisions.count() == 1
    bad = client_logged_in.post(
        "/deployments/auto/scale", {**form, "min_replicas": "5", "confirm": "yes"}
    )
    assert bad.status_code == 400 and "must not exceed max_replicas" in bad.content.decode()
    assert Deployment.objects.get(name="auto").autoscaling["min_replicas"] == 0
    client_logged_in.post("/deployments/auto/scale", {"replicas": "1", "confirm": "yes"})
    assert Deployment.objects.get(name="auto").autoscaling is None


def _post(endpoint: str) -> tuple[int, float]:
    body = json.dumps(
        {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}
    )
    req = urllib.request.Request(
        f"{endpoint}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, time.monotonic() - started


def _poll(d: Deployment, *, until, timeout: float) -> Deployment:
    """Autoscaler polls and reconciler passes, as the beat task and the worker would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployment_autoscale(deployment_id=d.pk)
        reconcile(d.pk, budget=0.5)
        d = Deployment.objects.get(pk=d.pk)
        if until(d):
            return d
        time.sleep(0.2)
    raise AssertionError(f"not reached: replicas={d.autoscaled_replicas} status={d.status}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_to_zero_then_the_first_request_is_held_and_answered(api, model):
    resp = api.post(
        "/api/v1/deployments",
        {
            "name": "zero",
            "model": model,
            "version": "1",
            "runtime": "local",
            "autoscaling": {
                "min_replicas": 0,
                "max_replicas": 2,
                "target_in_flight": 8,
                "idle_before_zero_s": 2,
                "scale_down_window_s": 2,
            },
        },
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("zero")
    assert Instance.objects.filter(deployment=d).count() == 1  # a new revision starts on one
    assert router_stats(d.port)["hold"]["enabled"] is True

    # idle: scaled to zero, no instance runs
    d = _poll(
        d,
        until=lambda d: (
            d.autoscaled_replicas == 0 and not Instance.objects.filter(deployment=d).exists()
        ),
        timeout=30,
    )
    assert d.status == Deployment.Status.READY and "scaled to zero" in d.status_message
    event = DeploymentEvent.objects.filter(deployment=d, kind="autoscale").first()
    assert event is not None and "replicas 1 → 0: no request for 2 s" in event.message
    audit = AuditEvent.objects.filter(action="deployment.autoscale", object_id="zero").first()
    assert audit.actor_label == "system:autoscaler" and audit.after["replicas"] == 0

    # the first request is held while the first instance starts, then answered
    result: list[tuple[int, float]] = []
    client = threading.Thread(target=lambda: result.append(_post(d.endpoint)))
    client.start()
    d = _poll(d, until=lambda d: not client.is_alive(), timeout=60)
    client.join()
    status, seconds = result[0]
    assert status == 200, f"the held request got {status}"
    d.refresh_from_db()
    assert d.cold_starts == 1 and d.autoscaled_replicas == 1
    cold = DeploymentEvent.objects.get(deployment=d, kind="cold_start")
    assert "replicas 0 → 1: scale from zero: 1 request(s) waiting" in cold.message
    hold = router_stats(d.port)["hold"]
    assert hold["cold_starts"] == 1 and hold["held_total"] == 1 and hold["timeouts"] == 0
    assert hold["last_wait_ms"] > 0 and seconds >= hold["last_wait_ms"] / 1000
    # the replica count over time is recorded: 1, then 0, then 1 again
    counts = list(
        ScaleSample.objects.filter(deployment=d).order_by("ts").values_list("replicas", flat=True)
    )
    changes = [c for i, c in enumerate(counts) if i == 0 or c != counts[i - 1]]
    assert changes == [1, 0, 1]
