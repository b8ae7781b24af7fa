"""`make run` as a user meets it: everything starts, serves, and stops on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.controlplane.test_run_supervisor import free_port  # in the range for make run tests
from tests.support import wait_http

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if int(line.split()[1]) == pid]


def test_run_starts_web_worker_beat_and_mlflow_then_stops_them_all(tmp_path):
    port, mlflow_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "DATABASE_URL",
            "CELERY_BROKER_URL",
            "MLFLOW_TRACKING_URI",
            "DJANGO_SETTINGS_MODULE",
            "CONTROLPLANE_TASK_QUEUE",
        )
    }
    env.update(
        CONTROLPLANE_DATA_DIR=str(tmp_path / "var"),
        PORT=str(port),
        MLFLOW_PORT=str(mlflow_port),
        CONTROLPLANE_ADMIN_PASSWORD="",
    )
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlplane.run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    children: list[int] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=150, proc=proc)
        deadline = time.monotonic() + 30
        while (
            "Ctrl-C stops everything" not in (tmp_path / "run.log").read_text()
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        text = (tmp_path / "run.log").read_text()
        assert re.search(r"created user 'admin' with password: \S+", text)
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}" in text
        # The MLflow server users log to is up, on loopback.
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5) as resp:
            assert resp.status == 200
        # Static files are served by the production server.
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/static/admin/css/base.css", timeout=5
        ) as resp:
            assert resp.status == 200
        # Anonymous API access is refused.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/models", timeout=5)
            raise AssertionError("anonymous API call was allowed")
        except urllib.error.HTTPError as exc:
            assert exc.code in (401, 403)
            assert json.loads(exc.read())["error"]["code"] == "not_authenticated"
        children = _children_of(proc.pid)
        assert len(children) == 5  # mlflow, gunicorn, worker, beat, and the watchdog
        state = tmp_path / "var"
        assert (state / "controlplane.sqlite3").exists() and (
            state / "mlflow" / "mlflow.db"
        ).exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    time.sleep(1)
    survivors = [
        pid
        for pid in children
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    ]
    assert survivors == []
    pgroups = subprocess.run(["ps", "-eo", "pgid,args"], capture_output=True, text=True).stdout
    assert not [line for line in pgroups.splitlines() if str(tmp_path) in line]
