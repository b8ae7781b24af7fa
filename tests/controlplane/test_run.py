"""`make run` as a user meets it: everything starts, serves, and stops on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.controlplane.test_run_supervisor import Run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,pgid"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if int(line.split()[1]) == pid]


def test_run_starts_web_worker_beat_and_mlflow_then_stops_them_all(tmp_path):
    run = Run(tmp_path)  # on the embedded defaults, ports in the range for these tests
    children: list[int] = []
    try:
        proc = run.start_and_wait()
        port, mlflow_port = run.port, run.mlflow_port
        deadline = time.monotonic() + 30
        while "Ctrl-C stops everything" not in run.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = run.log()
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
        # mlflow, gunicorn, worker, the autoscaler's worker, beat, and the watchdog
        assert len(children) == 6
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
