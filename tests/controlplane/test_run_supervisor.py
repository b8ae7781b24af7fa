"""`make run` as a supervisor you can trust: stopped twice, SIGKILLed, started on a taken port.

Each test runs the real `python -m controlplane.run` (gunicorn, Celery worker and beat, the
MLflow server with basic-auth) on its own data directory and ports.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

NOT_PASSED = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "DJANGO_SETTINGS_MODULE",
    "CONTROLPLANE_TASK_QUEUE",
    "CONTROLPLANE_DATA_DIR",
    "CONTROLPLANE_INSTALL_ID",
)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A free port in MLFLOW_PORT/PORT test range (35500-35999 unless told otherwise)."""
    low, high = (int(x) for x in os.environ.get("RUN_TEST_PORTS", "35500-35999").split("-"))
    for _ in range(200):
        port = random.randint(low, high)
        if _port_free(port):
            return port
    raise AssertionError("no free port")


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their workers, ...)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines()[1:]:
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _full_tree(pid: int, *, at_least: int = 10, timeout: float = 60) -> set[int]:
    """The supervisor's process tree once every child has forked its workers: mlflow CLI +
    uvicorn, gunicorn + 2 workers, Celery worker + 2 pool processes, beat, the watchdog."""
    deadline = time.monotonic() + timeout
    tree = _descendants(pid)
    while len(tree) < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
        tree = _descendants(pid)
    assert len(tree) >= at_least, subprocess.run(["ps", "-ef"], capture_output=True, text=True)
    return tree


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "\nState:\tZ" not in status:
            alive.add(pid)
    return alive


class Run:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port, self.mlflow_port = free_port(), free_port()
        while self.mlflow_port == self.port:
            self.mlflow_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k not in NOT_PASSED}
        self.env.update(
            CONTROLPLANE_DATA_DIR=str(directory / "var"),
            PORT=str(self.port),
            MLFLOW_PORT=str(self.mlflow_port),
            CONTROLPLANE_ADMIN_PASSWORD="",
            WEB_CONCURRENCY="2",
        )
        self.log_path = directory / "run.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.run"],
            cwd=ROOT,
            env=self.env,
            stdout=open(self.log_path, "w"),
            stderr=subprocess.STDOUT,
        )
        return self.proc

    def start_and_wait(self, timeout: float = 180) -> subprocess.Popen:
        """Start and wait for the banner. The test ports lie in the kernel's ephemeral range,
        so a client socket of another process can take one after the check: then (only
        then) start again on other ports."""
        for _attempt in range(3):
            self.start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if "Ctrl-C stops everything" in self.log():
                    return self.proc
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
            else:
                raise AssertionError(f"make run did not start: {self.log()[-3000:]}")
            assert "Address already in use" in self.log(), self.log()[-3000:]
            self.port, self.mlflow_port = free_port(), free_port()
            self.env.update(PORT=str(self.port), MLFLOW_PORT=str(self.mlflow_port))
        raise AssertionError(f"make run did not start: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cleanup(self, extra: set[int] = frozenset()) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in _alive(set(extra)):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except OSError:
                pass


def _post_alias_anonymously(port: int) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/alias",
        data=b'{"name": "any", "alias": "production", "version": "1"}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_stopped_twice_every_child_is_gone_and_the_ports_are_free(tmp_path):
    run = Run(tmp_path)
    tree: set[int] = set()
    try:
        proc = run.start_and_wait()
        tree = _full_tree(proc.pid)
        assert not _port_free(run.port) and not _port_free(run.mlflow_port)
        # The embedded MLflow server refuses anonymous writes.
        assert _post_alias_anonymously(run.mlflow_port) == 401

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # what make forwards
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # and the user presses Ctrl-C again
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        took = time.monotonic() - started
        print(f"\nstopped twice: exit {code} after {took:.1f} s")
        assert code == 0, run.log()[-2000:]
        assert "already stopping" in run.log()
        time.sleep(0.5)
        assert _alive(tree) == set(), subprocess.run(["ps", "-ef"], capture_output=True, text=True)
        assert _port_free(run.port) and _port_free(run.mlflow_port)
    finally:
        run.cleanup(tree)


def test_sigkilled_its_children_and_their_workers_die_within_seconds(tmp_path):
    run = Run(tmp_path)
    tree: set[int] = set()
    try:
        proc = run.start_and_wait()
        tree = _full_tree(proc.pid)
        started = time.monotonic()
        proc.kill()
        proc.wait()
        deadline = started + 25  # the watchdog's 15 s stop deadline, and some
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        took = time.monotonic() - started
        print(f"\nSIGKILLed: every child gone {took:.1f} s later")
        assert _alive(tree) == set(), subprocess.run(["ps", "-ef"], capture_output=True, text=True)
        assert _port_free(run.port) and _port_free(run.mlflow_port)
    finally:
        run.cleanup(tree)


@pytest.mark.parametrize("variable", ["PORT", "MLFLOW_PORT"])
def test_started_on_a_taken_port_it_exits_naming_the_variable(tmp_path, variable):
    run = Run(tmp_path)
    taken = run.port if variable == "PORT" else run.mlflow_port
    with socket.socket() as other:  # another program listens there
        other.bind(("127.0.0.1", taken))
        other.listen()
        proc = run.start()
        try:
            code = proc.wait(timeout=30)
        finally:
            run.cleanup()
    log = run.log()
    assert code == 2, log
    assert f"{variable}={taken}" in log and "already in use" in log
    # Nothing was started: no database, no MLflow store.
    assert not (tmp_path / "var" / "controlplane.sqlite3").exists()
    assert not (tmp_path / "var" / "mlflow").exists()


def test_a_bad_port_value_is_refused_before_anything_starts(tmp_path):
    run = Run(tmp_path)
    run.env["MLFLOW_PORT"] = "50x0"
    code = run.start().wait(timeout=30)
    assert code == 2
    assert "MLFLOW_PORT='50x0' is not a port number" in run.log()


def test_a_server_that_does_not_know_our_credential_is_not_taken_for_ours():
    """What stops `make run` from using another instance's MLflow server on its port."""
    import http.server
    import threading

    from controlplane.run import mlflow_answers_as_ours

    class Stub(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self):  # noqa: N802
            body = b'{"user": {"username": "someone-else"}}' if self.status == 200 else b"no"
            self.send_response(self.status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    for status in (200, 401, 404):
        Stub.status = status
        server = http.server.HTTPServer(("127.0.0.1", free_port()), Stub)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            uri = f"http://127.0.0.1:{server.server_port}"
            assert mlflow_answers_as_ours(uri, "our-password", timeout=5) is False
        finally:
            server.shutdown()
            server.server_close()
