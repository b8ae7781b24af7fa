"""Scheduled probes: the input example sent to the deployment's stable endpoint. (The probe
against a real model server is in test_end_to_end.py.)"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deployments.models import Deployment
from monitoring import services
from monitoring.models import ProbeResult
from monitoring.tasks import probe_deployment
from tests.monitoring.conftest import iso

pytestmark = pytest.mark.django_db


class FakeEndpoint:
    """A stand-in stable endpoint on loopback that records what probes send."""

    def __init__(self, status: int = 200):
        self.bodies: list[dict] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.bodies.append(
                    {
                        "path": self.path,
                        "json": json.loads(body),
                        "request_id": self.headers["X-Request-Id"],
                    }
                )
                self.send_response(status)
                self.send_header("X-Model-Version", "2")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_probe_sends_the_input_example_and_records_latency(api, fleet):
    endpoint = FakeEndpoint()
    Deployment.objects.filter(pk=fleet.deployment.pk).update(port=endpoint.port)
    try:
        assert probe_deployment(fleet.deployment.pk) is True
    finally:
        endpoint.close()
    sent = endpoint.bodies[0]
    assert sent["path"] == "/invocations" and sent["request_id"].startswith("cp-probe-")
    assert sent["json"] == {"dataframe_split": fleet.revisions[2].model_version.input_example}
    probe = ProbeResult.objects.get()
    assert (
        probe.ok and probe.latency_ms > 0 and probe.status_code == 200 and probe.model_version == 2
    )
    t = int(probe.ts.timestamp())
    got = api.get(
        "/api/v1/deployments/churn/metrics",
        {"name": "probe_success_rate", "from": iso(t - 10), "to": iso(t + 10), "step": "20"},
    ).json()["points"]
    assert got == [{"t": iso(t - 10), "value": 1.0}]
    assert api.get("/api/v1/deployments/churn/probes").json()[0]["ok"] is True


def test_a_deployment_that_does_not_answer_is_a_failed_probe(fleet):
    endpoint = FakeEndpoint()
    port = endpoint.port
    endpoint.close()  # nothing listens there any more
    Deployment.objects.filter(pk=fleet.deployment.pk).update(port=port)
    assert probe_deployment(fleet.deployment.pk) is False
    probe = ProbeResult.objects.get()
    assert not probe.ok and probe.latency_ms is None and probe.error


def test_an_error_answer_is_a_failed_probe_and_no_example_means_a_ping(fleet):
    endpoint = FakeEndpoint(status=500)
    Deployment.objects.filter(pk=fleet.deployment.pk).update(port=endpoint.port)
    try:
        assert probe_deployment(fleet.deployment.pk) is False
    finally:
        endpoint.close()
    assert ProbeResult.objects.get().status_code == 500
    assert services.probe_payload(None) is None
    assert services.probe_payload([{"a": 1}]) == {"dataframe_records": [{"a": 1}]}


def test_stopped_deployments_are_not_probed(fleet):
    Deployment.objects.filter(pk=fleet.deployment.pk).update(stopped=True)
    assert probe_deployment(fleet.deployment.pk) is False
    assert services.deployments_to_probe() == []
    assert not ProbeResult.objects.exists()
