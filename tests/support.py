"""Helpers for tests that start real processes on loopback."""

from __future__ import annotations

import socket
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, *, timeout: float, proc=None, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == status:
                    return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} within {timeout}s (last: {last})")


class Load:
    """Concurrent keep-alive clients hitting one URL until stopped; counts
    every failure (non-200 status or connection error) and the versions seen."""

    def __init__(self, host: str, port: int, path: str, body: bytes, *, clients: int = 4) -> None:
        import threading

        self.host, self.port, self.path, self.body = host, port, path, body
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.versions: list[str] = []  # changes of X-Model-Version, all clients interleaved
        self.sequences: dict[int, list[str]] = {}  # the same, per client (each is sequential)
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def _run(self) -> None:
        import http.client
        import threading

        conn = None
        mine = self.sequences.setdefault(threading.get_ident(), [])
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request(
                    "POST", self.path, body=self.body, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                resp.read()
                version = resp.getheader("X-Model-Version", "")
                with self.lock:
                    if resp.status == 200:
                        self.ok += 1
                        if not self.versions or self.versions[-1] != version:
                            self.versions.append(version)
                        if not mine or mine[-1] != version:
                            mine.append(version)
                    else:
                        self.failures.append(f"HTTP {resp.status}")
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as exc:  # a failed request is what we count
                with self.lock:
                    self.failures.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)


def run_job_in_thread(job_id: int):
    """Run a job as a Celery worker would, on its own thread and database connection; returns
    (the thread, a list that gets job_run's answer)."""
    import threading

    from django.db import connection

    from jobs import services

    ended: list = []

    def run() -> None:
        try:
            ended.append(services.job_run(job_id=job_id))
        finally:
            connection.close()  # the thread's own connection

    thread = threading.Thread(target=run)
    thread.start()
    return thread, ended
