"""A real Prometheus (Debian's package) scraping a live control plane and the model servers
it discovers through GET /api/v1/prometheus/targets; every panel of the Grafana dashboards in
grafana/ is then queried through Prometheus' HTTP API and must return data.

Needs /usr/bin/prometheus (.ci/prometheus-setup.sh); skipped without it unless
REQUIRE_PROMETHEUS=1. Prometheus listens on 127.0.0.1 only, stores in a temporary directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pytest_django.live_server_helper import LiveServer

from monitoring import tasks
from monitoring.models import Prediction
from tests.deployments.conftest import _kill_owned_processes, converge, registered  # noqa: F401
from tests.monitoring.test_end_to_end import FEATURES, post

PROMETHEUS = "/usr/bin/prometheus"
GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
TOKEN = "prometheus-test-token-0123456789"

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(PROMETHEUS) and os.environ.get("REQUIRE_PROMETHEUS") != "1",
        reason=f"{PROMETHEUS} is missing: run .ci/prometheus-setup.sh (REQUIRE_PROMETHEUS=1 "
        "makes this a failure)",
    ),
]


def _free_port(low: int, high: int) -> int:
    import socket

    for port in random.sample(range(low, high), high - low):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {low}-{high}")


@pytest.fixture
def control_plane(settings):
    settings.CONTROLPLANE_PROMETHEUS_TOKEN = TOKEN
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "127.0.0.1"]
    server = LiveServer(f"127.0.0.1:{_free_port(38500, 38750)}")
    yield server
    server.stop()


@pytest.fixture
def prometheus(tmp_path, control_plane):
    assert os.path.exists(PROMETHEUS), f"{PROMETHEUS} is missing (REQUIRE_PROMETHEUS=1)"
    host = control_plane.url.removeprefix("http://")
    auth = {"type": "Bearer", "credentials": TOKEN}
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "controlplane",
                "authorization": auth,
                "static_configs": [{"targets": [host]}],
            },
            {
                "job_name": "controlplane-discovered",
                "authorization": auth,
                "http_sd_configs": [
                    {
                        "url": f"{control_plane.url}/api/v1/prometheus/targets",
                        "refresh_interval": "1s",
                        "authorization": auth,
                    }
                ],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = _free_port(38750, 39000)
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError((tmp_path / "prometheus.log").read_text()[-2000:])
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


def _query(prometheus: str, expr: str) -> list:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(GRAFANA.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], target["expr"]))
    return out


def _grafana_to_promql(expr: str, deployment: str) -> str:
    expr = expr.replace("$__rate_interval", "30s").replace("$deployment", deployment)
    assert not re.search(r"\$\w", expr), f"an unknown Grafana variable in {expr}"
    return expr


def test_the_discovered_targets_are_labelled_and_guarded(control_plane, api, registered):  # noqa: F811
    api.post(
        "/api/v1/deployments",
        {"name": "sd", "model": registered(1), "version": "1", "runtime": "local"},
    )
    d = converge("sd")
    url = f"{control_plane.url}/api/v1/prometheus/targets"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5)
    assert refused.value.code == 403
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        groups = json.loads(resp.read())
    by_kind = {g["labels"]["kind"]: g for g in groups}
    assert set(by_kind) == {"model_server", "router"}
    server = by_kind["model_server"]["labels"]
    assert {k: server[k] for k in ("deployment", "version", "revision", "runtime")} == {
        "deployment": "sd",
        "version": "1",
        "revision": "1",
        "runtime": "local",
    }
    assert by_kind["router"]["targets"] == [f"127.0.0.1:{d.port}"]
    instance = d.instances.get()
    if instance.address.startswith("unix:"):
        # Prometheus reaches a socket-only server through the control plane.
        assert by_kind["model_server"]["targets"] == [control_plane.url.removeprefix("http://")]
        path = server["__metrics_path__"]
        req = urllib.request.Request(
            f"{control_plane.url}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert b"serving_requests_total" in resp.read()
    else:
        assert by_kind["model_server"]["targets"] == [instance.address]


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
    prometheus,
    control_plane,
    api,
    registered,  # noqa: F811
):
    name = registered(1)
    api.post(
        "/api/v1/deployments", {"name": "live", "model": name, "version": "1", "runtime": "local"}
    )
    d = converge("live")
    # A reference large enough for a drift verdict, like the training data.
    rng = np.random.default_rng(11)
    reference = {"columns": FEATURES, "data": rng.normal(size=(300, 20)).round(6).tolist()}
    resp = api._call("put", f"/api/v1/models/{name}/versions/1/drift-reference", reference)
    assert resp.status_code == 201, resp.content

    deadline = time.monotonic() + 60
    sent = 0
    while time.monotonic() < deadline:
        for _ in range(10):
            row = rng.normal(size=20).round(6).tolist()
            assert post(d.endpoint, [row], f"req-{sent}")[0] == 200
            sent += 1
        if _query(prometheus, 'up{kind="model_server",deployment="live"} == 1') and sent >= 60:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("Prometheus never scraped the discovered model server")
    # What the collector's periodic tasks would do: scrape twice (rates are deltas), pull the
    # prediction log (inputs for drift), record ground truth (accuracy).
    tasks.scrape_deployment(d.pk)
    assert tasks.pull_predictions(d.pk) == 1
    ids = list(Prediction.objects.filter(deployment=d).values_list("request_id", flat=True))
    assert len(ids) == sent
    assert (
        api.post(
            "/api/v1/deployments/live/feedback", [{"request_id": i, "label": 1} for i in ids]
        ).json()["matched"]
        == sent
    )
    for _ in range(10):
        post(d.endpoint, [rng.normal(size=20).round(6).tolist()], f"req-{sent}")
        sent += 1
    time.sleep(1.1)
    tasks.scrape_deployment(d.pk)

    queries = _panel_queries()
    assert len(queries) >= 20
    missing: list[str] = []
    deadline = time.monotonic() + 20
    while True:
        missing = [
            f"{dash} / {title}: {expr}"
            for dash, title, expr in queries
            if not _query(prometheus, _grafana_to_promql(expr, "live"))
        ]
        if not missing or time.monotonic() > deadline:
            break
        post(d.endpoint, [rng.normal(size=20).round(6).tolist()], f"req-{sent}")
        sent += 1
        time.sleep(1)
    assert not missing, "panels without data:\n" + "\n".join(missing)
