"""The plumbing the sandboxes rely on: a model server listening on a Unix socket
(``--unix-socket``), the router forwarding to it, and the outbound helper reaching it. Real
processes, no Django."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.lib import http
from serving.config import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]
ROW = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}


def wait_ready(address: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            if http.request("GET", http.address_url(address, "/ping"), timeout=1).status == 200:
                return
        except http.HttpError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{address} not ready")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(180)
def test_a_server_on_a_unix_socket_serves_through_the_router_and_removes_it_on_exit(
    sklearn_model_dir, tmp_path
):
    path = tmp_path / "serving.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model-dir", str(sklearn_model_dir), "--name", "m",
         "--version", "1", "--unix-socket", str(path)],
        env=env, cwd=REPO,
    )  # fmt: skip
    router = None
    try:
        wait_ready(f"unix:{path}", server)
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
        backends = tmp_path / "backends.json"
        backends.write_text(json.dumps({"backends": [f"unix:{path}"]}))
        port = free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "serving.router", "--port", str(port), "--backends-file",
             str(backends)],
            env=env, cwd=REPO,
        )  # fmt: skip
        wait_ready(f"127.0.0.1:{port}", router)  # /ping through the router
        for _ in range(3):  # the router's pooled connection is reused
            resp = http.request(
                "POST", f"http://127.0.0.1:{port}/invocations", json=ROW, timeout=10
            )
            assert len(resp.json()["predictions"]) == 1
        health = http.request("GET", f"http://127.0.0.1:{port}/__router/health", timeout=5)
        assert health.json()["backends"] == [f"unix:{path}"]
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        if router is not None:
            router.send_signal(signal.SIGTERM)
            router.wait(timeout=30)
    assert not path.exists()


def test_unix_socket_settings_are_checked(sklearn_model_dir, tmp_path):
    base = ["--model-dir", str(sklearn_model_dir), "--name", "m", "--version", "1"]
    assert load_settings([*base, "--unix-socket", str(tmp_path / "s.sock")], {}).unix_socket
    with pytest.raises(SettingsError, match="absolute path"):
        load_settings([*base, "--unix-socket", "relative.sock"], {})
    with pytest.raises(SettingsError, match="absolute path of at most 107 bytes"):
        load_settings([*base, "--unix-socket", "/" + "x" * 120], {})
    with pytest.raises(SettingsError, match="is not a directory"):
        load_settings([*base, "--unix-socket", str(tmp_path / "missing" / "s.sock")], {})
    with pytest.raises(SettingsError, match="one worker"):
        load_settings([*base, "--unix-socket", str(tmp_path / "s.sock"), "--workers", "2"], {})
