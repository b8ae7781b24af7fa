"""Alert rules: ok → firing → resolved with history, notifications to a real HTTP receiver
on loopback (HMAC verified) and by e-mail, retries, the rollback action, and the API."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.test import override_settings

from audit.models import AuditEvent
from deployments.models import DeploymentEvent
from monitoring import services
from monitoring.models import AlertEvent, AlertNotification, AlertRule
from monitoring.promtext import serving_counters
from monitoring.tasks import deliver_notification, evaluate_alerts

pytestmark = pytest.mark.django_db

LOOPBACK = override_settings(
    CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS=["127.0.0.1/32"], CONTROLPLANE_WEBHOOK_RETRIES=3
)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records what it is sent."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def traffic(fleet, server, at: float, ok: int, errors: int, *, start: float | None = None):
    """Scrape an instance that served ``ok`` + ``errors`` requests since the last scrape."""
    process = traffic.processes.get(fleet.deployment.pk)
    if process is None:
        process = traffic.processes[fleet.deployment.pk] = server("2", start=start or at - 10)
    process.serve(ok)
    process.serve(errors, status=500)
    services.scrape_record(
        instance_id=fleet.instance(2).pk, counters=serving_counters(process.text()), at=at
    )


traffic.processes = {}


@pytest.fixture(autouse=True)
def _fresh_processes():
    traffic.processes.clear()


def make_rule(api, **overrides):
    body = {
        "name": "errors",
        "deployment": "churn",
        "metric": "error_rate",
        "comparison": "gt",
        "threshold": 0.05,
        "window_s": 300,
        "min_samples": 10,
        **overrides,
    }
    resp = api.post("/api/v1/alert-rules", body)
    assert resp.status_code == 201, resp.content
    return resp.json()


def deliver_all(callbacks) -> None:
    """Run the delivery tasks enqueued on commit, as a worker would."""
    for pk in AlertNotification.objects.filter(status="pending").values_list("pk", flat=True):
        deliver_notification(pk)


@LOOPBACK
def test_a_rule_fires_resolves_and_notifies_a_signed_webhook_and_email(
    api, fleet, server, django_capture_on_commit_callbacks
):
    now = time.time()
    with Receiver() as receiver:
        rule = make_rule(
            api, webhook_url=receiver.url, email_to="ops@example.com, oncall@example.com"
        )
        secret = rule["webhook_secret"]
        assert len(secret) == 64 and rule["state"] == "ok"

        traffic(fleet, server, now - 30, ok=90, errors=10)
        with django_capture_on_commit_callbacks() as callbacks:
            result = services.alert_rule_evaluate(
                rule_id=rule["id"], now=datetime.fromtimestamp(now, tz=UTC)
            )
        assert (
            result.state == "firing"
            and result.value == pytest.approx(0.1)
            and result.samples == 100
        )
        assert len(callbacks) == 3  # one webhook, two e-mails, sent after commit
        deliver_all(callbacks)

        assert len(receiver.requests) == 1
        sent = receiver.requests[0]
        expected = "sha256=" + hmac.new(secret.encode(), sent["body"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(sent["headers"]["X-Controlplane-Signature"], expected)
        payload = json.loads(sent["body"])
        assert (
            payload["state"],
            payload["previous_state"],
            payload["deployment"],
            payload["metric"],
        ) == ("firing", "ok", "churn", "error_rate")
        assert payload["value"] == pytest.approx(0.1) and payload["threshold"] == 0.05
        assert sorted(m.to[0] for m in mail.outbox) == ["oncall@example.com", "ops@example.com"]
        assert "[FIRING] churn: errors" in mail.outbox[0].subject

        # Still bad: no new event, nothing sent again.
        services.alert_rule_evaluate(
            rule_id=rule["id"], now=datetime.fromtimestamp(now + 1, tz=UTC)
        )
        assert AlertEvent.objects.count() == 1

        # Recovered: only good requests in the next window.
        traffic(fleet, server, now + 390, ok=200, errors=0)
        with django_capture_on_commit_callbacks():
            result = services.alert_rule_evaluate(
                rule_id=rule["id"], now=datetime.fromtimestamp(now + 400, tz=UTC)
            )
        assert result.state == "resolved" and result.value == 0.0
        deliver_all(None)
        assert len(receiver.requests) == 2
        assert json.loads(receiver.requests[1]["body"])["state"] == "resolved"
        second = receiver.requests[1]
        assert (
            second["headers"]["X-Controlplane-Signature"]
            == "sha256=" + hmac.new(secret.encode(), second["body"], hashlib.sha256).hexdigest()
        )

    history = api.get(f"/api/v1/alert-rules/{rule['id']}/events").json()
    assert [(e["from_state"], e["to_state"]) for e in history] == [
        ("firing", "resolved"),
        ("ok", "firing"),
    ]
    assert {n["status"] for e in history for n in e["notifications"]} == {"sent"}
    assert list(
        AuditEvent.objects.filter(object_type="alert_rule").values_list("action", flat=True)
    ) == ["alert_rule.resolve", "alert_rule.fire", "alert_rule.create"]


@LOOPBACK
def test_too_few_samples_change_nothing(api, fleet, server):
    now = time.time()
    rule = make_rule(api, min_samples=500)
    traffic(fleet, server, now - 30, ok=50, errors=50)
    result = services.alert_rule_evaluate(
        rule_id=rule["id"], now=datetime.fromtimestamp(now, tz=UTC)
    )
    assert (result.state, result.samples, result.changed) == ("ok", 100, False)
    assert AlertRule.objects.get(pk=rule["id"]).last_value == 0.5


@LOOPBACK
def test_a_failing_receiver_is_retried_and_a_duplicate_delivery_sends_once(
    api, fleet, server, django_capture_on_commit_callbacks
):
    now = time.time()
    with Receiver(statuses=[503]) as receiver:
        rule = make_rule(api, webhook_url=receiver.url)
        traffic(fleet, server, now - 30, ok=0, errors=20)
        with django_capture_on_commit_callbacks():
            services.alert_rule_evaluate(
                rule_id=rule["id"], now=datetime.fromtimestamp(now, tz=UTC)
            )
        pk = AlertNotification.objects.get().pk
        deliver_notification(pk)
        deliver_notification(pk)  # delivered twice by the broker: sends once
    notification = AlertNotification.objects.get(pk=pk)
    assert (notification.status, notification.attempts, notification.response_status) == (
        "sent",
        2,
        200,
    )
    assert len(receiver.requests) == 2  # the 503, then the success


@LOOPBACK
def test_redirects_are_not_followed(api, fleet, server, django_capture_on_commit_callbacks):
    now = time.time()
    with Receiver(statuses=[302]) as receiver:
        rule = make_rule(api, webhook_url=receiver.url)
        traffic(fleet, server, now - 30, ok=0, errors=20)
        with django_capture_on_commit_callbacks():
            services.alert_rule_evaluate(
                rule_id=rule["id"], now=datetime.fromtimestamp(now, tz=UTC)
            )
        deliver_all(None)
    notification = AlertNotification.objects.get()
    assert notification.status == "failed" and "redirect" in notification.last_error
    assert len(receiver.requests) == 1


def test_private_and_loopback_webhooks_are_refused_without_the_allow_list(api, fleet):
    for url in (
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "ftp://example.com/x",
        "http://user:pw@example.com/x",
    ):
        resp = api.post(
            "/api/v1/alert-rules",
            {
                "name": "x",
                "deployment": "churn",
                "metric": "error_rate",
                "comparison": "gt",
                "threshold": 0.1,
                "webhook_url": url,
            },
        )
        assert resp.status_code == 400, url
        assert resp.json()["error"]["code"] == "invalid_webhook"
    assert not AlertRule.objects.exists()


@LOOPBACK
def test_a_firing_rule_can_roll_the_deployment_back(
    api, fleet, server, django_capture_on_commit_callbacks
):
    now = time.time()
    rule = make_rule(api, rollback_on_fire=True)
    assert fleet.deployment.desired_revision.number == 2
    traffic(fleet, server, now - 30, ok=10, errors=90)
    with django_capture_on_commit_callbacks():
        result = services.alert_rule_evaluate(
            rule_id=rule["id"], now=datetime.fromtimestamp(now, tz=UTC)
        )
    assert result.state == "firing"
    fleet.deployment.refresh_from_db()
    assert fleet.deployment.desired_revision.number == 1
    assert DeploymentEvent.objects.filter(
        deployment=fleet.deployment, kind="auto_rollback"
    ).exists()
    assert "rolled back to revision 1" in AlertEvent.objects.get().message
    audited = AuditEvent.objects.get(action="deployment.auto_rollback")
    assert audited.actor_label == "system:monitoring" and audited.actor is None
    assert audited.after["reason"] == "alert rule 'errors' fired"
    # Firing again later (after resolving) with nothing earlier to go back to: refused, recorded.
    AlertRule.objects.filter(pk=rule["id"]).update(state="resolved")
    fleet.deployment.revisions.filter(number=2).update(live_at=None)
    with django_capture_on_commit_callbacks():
        services.alert_rule_evaluate(
            rule_id=rule["id"], now=datetime.fromtimestamp(now + 1, tz=UTC)
        )
    assert "rollback refused" in AlertEvent.objects.order_by("-id").first().message


def test_the_periodic_task_evaluates_every_enabled_rule(api, fleet):
    make_rule(api)
    make_rule(api, name="off", enabled=False)
    assert evaluate_alerts() == 1
    assert AlertRule.objects.get(name="errors").last_evaluated_at is not None
    assert AlertRule.objects.get(name="off").last_evaluated_at is None


def test_rules_are_managed_through_the_api(api, api_as, user, fleet):
    rule = make_rule(api)
    listed = api.get("/api/v1/alert-rules?deployment=churn").json()
    assert [r["name"] for r in listed["results"]] == ["errors"] and "webhook_secret" not in listed[
        "results"
    ][0]
    resp = api.patch(f"/api/v1/alert-rules/{rule['id']}", {"threshold": 0.2, "min_samples": 50})
    assert resp.status_code == 200 and (resp.json()["threshold"], resp.json()["min_samples"]) == (
        0.2,
        50,
    )
    resp = api.patch(f"/api/v1/alert-rules/{rule['id']}", {"rotate_secret": True})
    assert resp.json()["webhook_secret"] != rule["webhook_secret"]
    assert api.patch(f"/api/v1/alert-rules/{rule['id']}", {"metric": "bogus"}).status_code == 400
    assert api.patch(f"/api/v1/alert-rules/{rule['id']}", {"window_s": 5}).status_code == 400
    reader = api_as(user, ["read"])
    assert reader.get(f"/api/v1/alert-rules/{rule['id']}").status_code == 200
    assert reader.delete(f"/api/v1/alert-rules/{rule['id']}", "").status_code == 403
    assert api.delete(f"/api/v1/alert-rules/{rule['id']}", "").status_code == 204
    assert api.get(f"/api/v1/alert-rules/{rule['id']}").status_code == 404
    actions = list(
        AuditEvent.objects.filter(object_type="alert_rule").values_list("action", flat=True)
    )
    assert actions == [
        "alert_rule.delete",
        "alert_rule.update",
        "alert_rule.update",
        "alert_rule.create",
    ]


def test_rules_for_unknown_deployments_or_metrics_are_refused(api, fleet):
    base = {"name": "x", "metric": "error_rate", "comparison": "gt", "threshold": 1}
    assert api.post("/api/v1/alert-rules", {**base, "deployment": "nope"}).status_code == 404
    resp = api.post("/api/v1/alert-rules", {**base, "deployment": "churn", "metric": "vibes"})
    assert resp.status_code == 400
    resp = api.post(
        "/api/v1/alert-rules", {**base, "deployment": "churn", "email_to": "not an address"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_email"


def _stored_secret(rule_id: int) -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT webhook_secret FROM monitoring_alertrule WHERE id = %s", [rule_id])
        return cursor.fetchone()[0]


def test_the_webhook_secret_is_encrypted_at_rest_and_survives_a_key_rotation(
    api, fleet, server, settings, django_capture_on_commit_callbacks
):
    # Through the settings fixture, not @LOOPBACK: its teardown would restore the settings
    # it saw, with LOOPBACK's override still in them, and leak it into later tests.
    settings.CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.CONTROLPLANE_WEBHOOK_RETRIES = 3
    now = time.time()
    with Receiver() as receiver:
        rule = make_rule(api, webhook_url=receiver.url)
        secret = rule["webhook_secret"]
        stored = _stored_secret(rule["id"])
        assert secret not in stored and len(stored) > 100  # a Fernet token, not the key
        assert AlertRule.objects.get(pk=rule["id"]).webhook_secret == secret

        # A new SECRET_KEY with the old one among the fallbacks still opens it.
        settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
        settings.SECRET_KEY = "a-rotated-secret-key-that-is-long-enough-0123456789"
        traffic(fleet, server, now - 30, ok=10, errors=90)
        with django_capture_on_commit_callbacks() as callbacks:
            services.alert_rule_evaluate(
                rule_id=rule["id"], now=datetime.fromtimestamp(now, tz=UTC)
            )
        deliver_all(callbacks)
        sent = receiver.requests[0]
        expected = "sha256=" + hmac.new(secret.encode(), sent["body"], hashlib.sha256).hexdigest()
        assert sent["headers"]["X-Controlplane-Signature"] == expected


def test_a_secret_no_key_opens_fails_the_delivery_instead_of_sending_it_unsigned(
    api, fleet, server, settings, django_capture_on_commit_callbacks
):
    # Through the settings fixture, not @LOOPBACK: its teardown would restore the settings
    # it saw, with LOOPBACK's override still in them, and leak it into later tests.
    settings.CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    settings.CONTROLPLANE_WEBHOOK_RETRIES = 3
    now = time.time()
    with Receiver() as receiver:
        rule = make_rule(api, webhook_url=receiver.url)
        settings.SECRET_KEY = "an-unrelated-secret-key-that-is-long-enough-987654"
        traffic(fleet, server, now - 30, ok=10, errors=90)
        with django_capture_on_commit_callbacks() as callbacks:
            services.alert_rule_evaluate(
                rule_id=rule["id"], now=datetime.fromtimestamp(now, tz=UTC)
            )
        deliver_all(callbacks)
        assert receiver.requests == []
    notification = AlertNotification.objects.get()
    assert notification.status == "failed" and "rotate the secret" in notification.last_error
    # Rotating it through the API makes a new one that signs again.
    resp = api.patch(f"/api/v1/alert-rules/{rule['id']}", {"rotate_secret": True})
    assert resp.status_code == 200 and len(resp.json()["webhook_secret"]) == 64


def test_an_email_that_cannot_be_sent_says_what_failed_and_which_settings(settings):
    from monitoring.adapters import EmailChannel
    from tests.support import free_port

    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", free_port()  # nothing listens
    delivery = EmailChannel().send("ops@example.com", subject="s", payload={}, secret="")
    assert not delivery.ok
    assert f"cannot reach the mail server 127.0.0.1:{settings.EMAIL_PORT}" in delivery.error
    assert "EMAIL_HOST" in delivery.error and "EMAIL_PORT" in delivery.error
    assert "Connection refused" in delivery.error
