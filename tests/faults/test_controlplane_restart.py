"""The whole control plane (`make run`: web, worker, beat, MLflow) stops and starts again
while a deployment serves: the endpoint keeps answering while the control plane is down
(model servers and routers are not its children), and after the restart the deployment
is adopted, not restarted or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from deployments.runtimes import process
from tests.faults.conftest import ROOT, ROW_BODY, kill_owned, predict, report, wait_for
from tests.support import Load, free_port, wait_http

pytestmark = pytest.mark.slow

# `make run` on its embedded defaults, whatever this test session runs on.
NOT_PASSED = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "MLFLOW_TRACKING_URI",
    "DJANGO_SETTINGS_MODULE",
    "CONTROLPLANE_TASK_QUEUE",
    "CONTROLPLANE_DATA_DIR",
    "CONTROLPLANE_INSTALL_ID",
)


class Run:
    """`python -m controlplane.run` on its own data directory and ports."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port, self.mlflow_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in NOT_PASSED}
        self.env.update(
            CONTROLPLANE_DATA_DIR=str(directory / "var"),
            PORT=str(self.port),
            MLFLOW_PORT=str(self.mlflow_port),
            CONTROLPLANE_ADMIN_PASSWORD="",
            CONTROLPLANE_RECONCILE_INTERVAL="1",
            WEB_CONCURRENCY="1",
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.dir / f"run{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.run"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_http(f"{self.base}/healthz", timeout=180, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    def manage(self, *args: str) -> str:
        env = dict(
            self.env,
            DJANGO_SETTINGS_MODULE="controlplane.settings.base",
            MLFLOW_TRACKING_URI=f"http://127.0.0.1:{self.mlflow_port}",
        )
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout

    def install_id(self) -> str:
        return (self.dir / "var" / "install_id").read_text().strip()


@pytest.fixture
def run(tmp_path):
    cp = Run(tmp_path)
    try:
        yield cp
    finally:
        cp.stop()
        if (tmp_path / "var" / "install_id").exists():
            kill_owned(cp.install_id())


def test_deployments_keep_serving_while_the_control_plane_restarts_and_are_adopted(run, model_zip):
    started = time.monotonic()
    run.start()
    first_start = time.monotonic() - started
    token = run.manage("create_api_token", "admin").strip().splitlines()[-1]
    api = requests.Session()
    # No keep-alive: gunicorn's graceful stop waits for idle client connections (up to
    # `make run`'s 15 s deadline), which would only slow this test down.
    api.headers.update({"Authorization": f"Bearer {token}", "Connection": "close"})
    assert (
        api.post(f"{run.base}/api/v1/models", json={"name": "kept"}, timeout=60).status_code == 201
    )
    resp = api.post(
        f"{run.base}/api/v1/models/kept/versions",
        files={"artifact": ("model.zip", model_zip)},
        timeout=120,
    )
    assert resp.status_code == 201, resp.text
    resp = api.post(
        f"{run.base}/api/v1/deployments",
        json={"name": "kept", "model": "kept", "version": "1", "runtime": "local", "replicas": 2},
        timeout=60,
    )
    assert resp.status_code in (201, 202), resp.text

    def get() -> dict:
        return api.get(f"{run.base}/api/v1/deployments/kept", timeout=30).json()

    wait_for(
        lambda: get()["status"] == "ready",
        timeout=180,
        what="the deployment to be ready",
        interval=0.5,
        detail=lambda: json.dumps(get(), indent=1),
    )
    before = get()
    owner = run.install_id()
    labelled = sorted((p.pid, p.starttime) for p in process.find_labelled(owner))
    assert len(labelled) == 3  # two model servers and the router
    endpoint = before["endpoint"]

    with Load(
        "127.0.0.1", int(endpoint.rsplit(":", 1)[1]), "/invocations", ROW_BODY, clients=2
    ) as load:
        time.sleep(0.5)
        stopping = time.monotonic()
        run.stop()
        stopped = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{run.base}/healthz", timeout=5)
        served_before = load.ok
        time.sleep(3)  # the control plane is down
        served_while_down = load.ok - served_before
        restarting, restarted_at = time.monotonic(), datetime.now(UTC)
        run.start()
        restarted = time.monotonic()

        def adopted() -> bool:
            d = get()
            return d["status"] == "ready" and all(
                i["last_probe_at"] and datetime.fromisoformat(i["last_probe_at"]) > restarted_at
                for i in d["instances"]
            )

        wait_for(
            adopted,
            timeout=120,
            what="the restarted control plane to probe the instances",
            interval=0.5,
            detail=lambda: json.dumps(get(), indent=1),
        )
        adopted_s = time.monotonic() - restarting
        time.sleep(0.5)

    after = get()
    assert load.failures == []
    assert served_while_down > 0
    # The same processes: nothing restarted, nothing started twice.
    assert [i["runtime_id"] for i in after["instances"]] == [
        i["runtime_id"] for i in before["instances"]
    ]
    assert sorted((p.pid, p.starttime) for p in process.find_labelled(owner)) == labelled
    assert after["endpoint"] == endpoint and after["status"] == "ready"
    # Since the restart: no router started, no instance restarted.
    events = api.get(f"{run.base}/api/v1/deployments/kept/events", timeout=30).json()
    since = [e["kind"] for e in events if datetime.fromisoformat(e["created_at"]) > restarted_at]
    assert not {"router", "crash", "error"} & set(since), since
    assert predict(endpoint) == "1"
    report(
        "whole control plane SIGTERM + start (2 replicas)",
        first_start_s=first_start,
        stop_s=stopped - stopping,
        down_s=restarting - stopped,
        restart_s=restarted - restarting,
        adopted_after_restart_s=adopted_s,
        requests_ok=load.ok,
        served_while_down=served_while_down,
        requests_failed=len(load.failures),
    )
