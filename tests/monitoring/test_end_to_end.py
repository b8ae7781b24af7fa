"""End to end on the local runtime: real model servers behind a real router, scraped,
pulled and probed by the Celery tasks (run in-process, as a worker would run them)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from deployments.models import Instance
from monitoring import tasks
from monitoring.models import DriftReference, Prediction, ProbeResult, PullState, TrafficSample
from tests.deployments.conftest import _kill_owned_processes, converge, registered  # noqa: F401
from tests.monitoring.test_ui import figures

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _own_ports(settings):
    """Ports away from the default range, which other test runs on this machine use too."""
    base = random.Random().randrange(36000, 44000, 200)
    settings.CONTROLPLANE_PORT_RANGE = f"{base}-{base + 199}"


FEATURES = [f"f{i}" for i in range(20)]


def post(endpoint: str, rows, request_id: str) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": FEATURES, "data": rows}}).encode()
    req = urllib.request.Request(
        f"{endpoint}/invocations",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-Request-Id": request_id},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def deploy(api, model: str, name: str):
    resp = api.post(
        "/api/v1/deployments", {"name": name, "model": model, "version": "1", "runtime": "local"}
    )
    assert resp.status_code in (201, 202), resp.content
    return converge(name)


def test_a_real_deployment_is_scraped_pulled_probed_and_scored(
    api,
    registered,  # noqa: F811
    client_logged_in,
    settings,
):
    d = deploy(api, registered(1), "live")
    assert (
        tasks.scrape_deployment(d.pk) == 1
    )  # a process started moments ago: counted from its start
    assert TrafficSample.objects.get().requests == 0

    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 20)).round(6)
    y_true = ((X[:, 0] + X[:, 1] > 0) ^ (rng.random(30) < 0.2)).astype(int).tolist()
    y_pred = []
    for i, row in enumerate(X.tolist()):
        status, body = post(d.endpoint, [row], f"req-{i}")
        assert status == 200
        y_pred.append(body["predictions"][0])
    assert post(d.endpoint, [[1.0]], "bad-0")[0] == 400  # refused input: a request, not an error

    assert tasks.scrape_deployment(d.pk) == 1
    latest = TrafficSample.objects.order_by("-id").first()
    assert (latest.requests, latest.errors, latest.model_version) == (31, 0, 1)
    assert sum(getattr(latest, f"b{i:02d}") for i in range(15)) == 31

    assert tasks.pull_predictions(d.pk) == 1
    assert Prediction.objects.filter(deployment=d).count() == 30
    assert tasks.pull_predictions(d.pk) == 1  # nothing new: nothing twice
    assert Prediction.objects.filter(deployment=d).count() == 30

    resp = api.post(
        "/api/v1/deployments/live/feedback",
        [{"request_id": f"req-{i}", "label": y} for i, y in enumerate(y_true)]
        + [{"request_id": "req-unknown", "label": 1}],
    )
    assert resp.json()["matched"] == 30 and resp.json()["pending"] == 1
    points = {
        m: api.get("/api/v1/deployments/live/metrics", {"name": m, "step": "3600"}).json()["points"]
        for m in ("accuracy", "f1", "requests", "latency_p95")
    }
    assert points["accuracy"][0]["value"] == accuracy_score(y_true, y_pred)
    assert points["f1"][0]["value"] == f1_score(y_true, y_pred)
    assert points["requests"][0]["value"] == 31 and points["latency_p95"][0]["value"] > 0

    # The scheduled probe sends the input example logged with the model to the stable endpoint.
    assert tasks.probe_deployment(d.pk) is True
    probe = ProbeResult.objects.get(deployment=d)
    assert (
        probe.ok and probe.latency_ms > 0 and probe.model_version == 1 and probe.kind == "example"
    )
    tasks.pull_predictions(d.pk)
    assert Prediction.objects.filter(deployment=d).count() == 30  # the probe is not scored traffic

    # Inputs were logged: counted against the input example, too small for a verdict
    # (CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS), which a smaller minimum gives.
    assert DriftReference.objects.get().source == "input_example"

    def drift():
        return api.get(
            "/api/v1/deployments/live/metrics", {"name": "drift_psi", "step": "7200"}
        ).json()["points"]

    assert drift() == []
    settings.CONTROLPLANE_DRIFT_MIN_REFERENCE_ROWS = 1
    assert len(drift()) == 1 and drift()[0]["value"] >= 0

    page = client_logged_in.get("/monitoring/deployments/live/?range=1h")
    figs = figures(page.content.decode())
    assert [y for y in figs["chart-accuracy"]["data"][0]["y"] if y is not None] == [
        accuracy_score(y_true, y_pred)
    ]
    throughput = [y for y in figs["chart-throughput"]["data"][0]["y"] if y]
    assert throughput and all(y > 0 for y in throughput)
    assert (
        tasks.collect_all() == 1 and tasks.probe_all() == 1
    )  # the beat entries fan out per deployment


def test_a_restarted_instance_counts_from_zero_and_its_log_from_the_start(api, registered):  # noqa: F811
    d = deploy(api, registered(1), "restarting")
    tasks.scrape_deployment(d.pk)
    for i in range(5):
        assert post(d.endpoint, [[0.1] * 20], f"a-{i}")[0] == 200
    tasks.scrape_deployment(d.pk)
    tasks.pull_predictions(d.pk)
    boot = PullState.objects.get().boot_id

    inst = Instance.objects.get(deployment=d)
    os.kill(int(inst.runtime_id.split(":")[0]), signal.SIGKILL)
    time.sleep(0.2)
    d = converge(
        "restarting",
        until=lambda x: x.status == "ready" and Instance.objects.get(deployment=x).restarts == 1,
    )
    for i in range(3):
        assert post(d.endpoint, [[0.2] * 20], f"b-{i}")[0] == 200
    tasks.scrape_deployment(d.pk)
    sample = TrafficSample.objects.order_by("-id").first()
    assert sample.reset and sample.requests == 3  # not 3 - 5
    assert sum(TrafficSample.objects.values_list("requests", flat=True)) == 8
    tasks.pull_predictions(d.pk)
    state = PullState.objects.get()
    assert state.boot_id != boot and state.cursor == 3
    assert sorted(Prediction.objects.values_list("request_id", flat=True)) == [
        "a-0",
        "a-1",
        "a-2",
        "a-3",
        "a-4",
        "b-0",
        "b-1",
        "b-2",
    ]
