"""Fault injection: the control plane's processes run for real (Celery worker and
beat, the web app under gunicorn, or the whole `make run`) on the test database
and broker, and the tests kill, pause or restart them, PostgreSQL and Redis.

Every service a test stops is started again in a ``finally``, and every process a
test starts (control plane processes, model servers, routers, containers) is gone
after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
from django.conf import settings
from django.db import connection, connections

from deployments.models import Deployment, Instance
from deployments.runtimes import install_id, process
from tests.deployments.conftest import registered  # noqa: F401  (a fixture these tests use)
from tests.support import free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ROW = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}
ROW_BODY = json.dumps(ROW).encode()


def report(test: str, **numbers) -> None:
    """Print one measurement line (shown with -s; the README's reliability table comes from these)."""
    shown = " ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()
    )
    print(f"\n[faults] {test}: {shown}", flush=True)


def wait_for(
    predicate: Callable[[], object],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
):
    """Poll until ``predicate()`` is truthy and return its value; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}"
                + (f"\n{detail()}" if detail else "")
            )
        time.sleep(interval)


# --- the test database and broker, as the subprocesses must see them ---------------------


def database_url() -> str:
    """DATABASE_URL of the test database (pytest-django's, not the configured one)."""
    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        name = str(s["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise AssertionError(
                "the SQLite test database is in memory: subprocesses cannot see it "
                "(controlplane/settings/test.py makes it a file)"
            )
        return f"sqlite:///{Path(name).resolve()}"
    if s["ENGINE"].endswith("postgresql"):
        auth = quote(s["USER"] or "", safe="")
        if s["PASSWORD"]:
            auth += ":" + quote(s["PASSWORD"], safe="")
        host = s["HOST"] or "127.0.0.1"
        port = s["PORT"] or "5432"
        return f"postgres://{auth}{'@' if auth else ''}{host}:{port}/{quote(s['NAME'], safe='')}"
    raise AssertionError(f"no DATABASE_URL for engine {s['ENGINE']}")


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def redis_broker() -> tuple[str, int] | None:
    """(host, port) of the Redis broker, or None with another broker."""
    url = urlparse(settings.CELERY_BROKER_URL)
    if url.scheme not in ("redis", "rediss"):
        return None
    return url.hostname or "127.0.0.1", url.port or 6379


def process_env(**extra: str) -> dict[str, str]:
    """The environment of a control plane process sharing this test's database, broker,
    queue, data directory (MLflow store, model cache, routers) and install id."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings.base",  # production settings, as `make run`
        DATABASE_URL=database_url(),
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        CONTROLPLANE_TASK_QUEUE=settings.CELERY_TASK_DEFAULT_QUEUE,
        CONTROLPLANE_DATA_DIR=str(settings.DATA_DIR),
        CONTROLPLANE_INSTALL_ID=install_id(),
        CONTROLPLANE_DOCKER_BASE_IMAGE=settings.CONTROLPLANE_DOCKER_BASE_IMAGE,
        MLFLOW_TRACKING_URI=settings.MLFLOW_TRACKING_URI,
        MLFLOW_DISABLE_TELEMETRY="true",
        CONTROLPLANE_RECONCILE_INTERVAL="1",
        # The previous revision is drained at once (no warm standby), so a converged rollout
        # is exactly the new revision's instances.
        CONTROLPLANE_ROLLBACK_WINDOW="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# --- processes -----------------------------------------------------------------------------


class Proc:
    """A process started by a test, leading its own process group (so its children,
    Celery's pool and gunicorn's workers, are signalled with it)."""

    def __init__(
        self, name: str, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path = ROOT
    ) -> None:
        self.name, self.log = name, log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group: nothing of it gets to clean up."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._log.close()

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(self.text().splitlines()[-lines:])

    def children(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True
        ).stdout
        return sorted(int(x) for x in out.split())


class ControlPlane:
    """The control plane's processes, started one by one on the test database."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[Proc] = []

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        n = sum(p.name.startswith(name) for p in self.procs)
        proc = Proc(
            f"{name}{n or ''}",
            argv,
            env=env or process_env(),
            log=self.dir / f"{name}{n or ''}.log",
        )
        self.procs.append(proc)
        return proc

    def worker(self, *, concurrency: int = 2, timeout: float = 60) -> Proc:
        proc = self._start(
            "worker",
            [
                str(BIN / "celery"),
                "-A",
                "controlplane",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                str(concurrency),
                "-Q",
                settings.CELERY_TASK_DEFAULT_QUEUE,
                "-n",
                f"faults-{uuid.uuid4().hex[:8]}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
        )
        wait_for(
            lambda: " ready." in proc.text() or not proc.alive(),
            timeout=timeout,
            what="the Celery worker to be ready",
            detail=proc.tail,
        )
        assert proc.alive(), proc.tail()
        return proc

    def beat(self) -> Proc:
        proc = self._start(
            "beat",
            [
                str(BIN / "celery"),
                "-A",
                "controlplane",
                "beat",
                "--loglevel",
                "INFO",
                "--schedule",
                str(self.dir / "celerybeat-schedule"),
            ],
        )
        wait_for(
            lambda: "Sending due task" in proc.text() or not proc.alive(),
            timeout=60,
            what="Celery beat to send its first task",
            detail=proc.tail,
        )
        assert proc.alive(), proc.tail()
        return proc

    def web(self, *, workers: int = 2, threads: int = 4) -> tuple[Proc, str]:
        from registry.mlflow_store import get_store

        # Create the MLflow store's tables first (as `make run` starts MLflow before the web
        # app): workers initialising a new SQLite store at once break it for good.
        get_store()
        port = free_port()
        proc = self._start(
            "web",
            [
                str(BIN / "gunicorn"),
                "controlplane.wsgi:application",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "--timeout",
                "300",
                "--graceful-timeout",
                "5",
                "--access-logfile",
                "-",
            ],
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", timeout=60, proc=proc.popen)
        return proc, base

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs)

    def kill_all(self) -> None:
        # No need to be graceful after a test: leases and queued messages go with the
        # database flush, and the broker writes each message atomically.
        for proc in self.procs:
            proc.kill()


def kill_owned(owner: str) -> None:
    """Kill the model servers and routers labelled ``owner``; remove this session's containers."""
    for proc in process.find_labelled(owner):
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    from deployments.runtimes.docker import docker_available

    if docker_available()[0]:
        from deployments.runtimes import get_runtime

        runtime = get_runtime("docker")
        for status in runtime.list_owned():
            runtime.stop(status.runtime_id, timeout=1)


@pytest.fixture
def cluster(transactional_db, tmp_path) -> Iterator[ControlPlane]:
    """``cluster.worker()``, ``cluster.beat()``, ``cluster.web()``: real processes, all
    stopped after the test (before the database is flushed), with what they started."""
    cp = ControlPlane(tmp_path)
    try:
        yield cp
    finally:
        cp.kill_all()
        kill_owned(install_id())
        connections.close_all()  # a connection a restarted PostgreSQL dropped is not reused


# --- services: stopped, then always started again --------------------------------------------


def _pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql"))
    return versions[-1]


def _pg_ctl(action: str, *args: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", action, *args],
        check=True,
        capture_output=True,
        timeout=120,
    )


def postgres_accepting() -> bool:
    s = connection.settings_dict
    result = subprocess.run(
        ["pg_isready", "-q", "-h", s["HOST"] or "127.0.0.1", "-p", str(s["PORT"] or 5432)],
        capture_output=True,
        timeout=10,
    )
    return result.returncode == 0


def postgres_manageable() -> str | None:
    """Why PostgreSQL cannot be restarted by this test, or None if it can."""
    if not is_postgres():
        return "DATABASE_URL is not PostgreSQL (set DATABASE_URL=postgres://... to run it)"
    if not Path("/etc/postgresql").is_dir() or not os.listdir("/etc/postgresql"):
        return "no local PostgreSQL cluster to restart (pg_ctlcluster)"
    if (connection.settings_dict["HOST"] or "127.0.0.1") not in ("127.0.0.1", "localhost", "::1"):
        return "PostgreSQL is not on this machine"
    return None


@contextmanager
def postgres_stopped() -> Iterator[dict[str, float]]:
    """PostgreSQL is down inside the block (fast shutdown: sessions are cut), up after it.
    Yields a dict that gets the monotonic times "stopping", "stopped", "starting", "accepting"."""
    times = {"stopping": time.monotonic()}
    _pg_ctl("stop", "-m", "fast")
    times["stopped"] = time.monotonic()
    try:
        yield times
    finally:
        times["starting"] = time.monotonic()
        if not postgres_accepting():
            try:
                _pg_ctl("start")
            except subprocess.CalledProcessError:
                pass  # already starting: wait below
        wait_for(
            postgres_accepting, timeout=60, what="PostgreSQL to accept connections", interval=0.05
        )
        times["accepting"] = time.monotonic()
        connections.close_all()


def _redis_cli(host: str, port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["redis-cli", "-h", host, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
    )


def redis_up(host: str, port: int) -> bool:
    return _redis_cli(host, port, "ping").stdout.strip() == "PONG"


@contextmanager
def redis_stopped(host: str, port: int) -> Iterator[None]:
    """Redis is down inside the block (nothing saved: queued messages are lost), up after it."""
    _redis_cli(host, port, "shutdown", "nosave")
    wait_for(lambda: not redis_up(host, port), timeout=30, what="Redis to stop")
    try:
        yield
    finally:
        if not redis_up(host, port):
            subprocess.run(
                [
                    "redis-server",
                    "--daemonize",
                    "yes",
                    "--bind",
                    "127.0.0.1",
                    "-::1",
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    "/var/lib/redis",
                    "--logfile",
                    "/var/log/redis/ci.log",
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        wait_for(lambda: redis_up(host, port), timeout=30, what="Redis to answer")


# --- deployments: what runs, and what it answers -------------------------------------------


def predict(endpoint: str) -> str:
    """The model version that answered one prediction at ``endpoint``."""
    req = urllib.request.Request(
        f"{endpoint}/invocations", data=ROW_BODY, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return resp.headers["X-Model-Version"]


def servers_of(name: str, owner: str | None = None) -> list[process.ProcInfo]:
    """Model-server processes labelled with deployment ``name`` (the local runtime's)."""
    return [
        p
        for p in process.find_labelled(owner or install_id())
        if p.labels.get("CONTROLPLANE_DEPLOYMENT") == name and "CONTROLPLANE_INSTANCE" in p.labels
    ]


def routers_of(name: str, owner: str | None = None) -> list[process.ProcInfo]:
    return [
        p
        for p in process.find_labelled(owner or install_id())
        if p.labels.get("CONTROLPLANE_ROUTER") == name
    ]


def deployment(name: str) -> Deployment:
    return Deployment.objects.select_related("serving_revision", "desired_revision").get(name=name)


def is_ready_on(name: str, revision: int) -> bool:
    d = deployment(name)
    return (
        d.status == Deployment.Status.READY
        and d.serving_revision is not None
        and d.serving_revision.number == revision
        and d.desired_revision.number == revision
        and not Instance.objects.filter(deployment=d).exclude(revision=d.serving_revision).exists()
    )


def describe(name: str) -> str:
    d = deployment(name)
    rows = list(
        Instance.objects.filter(deployment=d).values_list(
            "revision__number", "ordinal", "state", "runtime_id", "restarts"
        )
    )
    return (
        f"{name}: status={d.status} phase={d.phase!r} msg={d.status_message!r} "
        f"desired={d.desired_revision and d.desired_revision.number} "
        f"serving={d.serving_revision and d.serving_revision.number} lease={d.lease_until} instances={rows}"
    )


def assert_converged(
    name: str, *, revision: int, version: str, replicas: int, runtime: str = "local"
) -> Deployment:
    """Exactly what is desired runs: the revision serves, its instances are ready, one per
    replica, each recorded by the id of a process (container) that runs, nothing else runs
    for the deployment, one router, and the endpoint answers with the version."""
    d = deployment(name)
    assert is_ready_on(name, revision), describe(name)
    instances = list(Instance.objects.filter(deployment=d).order_by("ordinal"))
    assert [(i.ordinal, i.state) for i in instances] == [(n, "ready") for n in range(replicas)], (
        describe(name)
    )
    recorded = {i.runtime_id for i in instances}
    if runtime == "local":
        running = servers_of(name)
        assert {p.labels["CONTROLPLANE_REVISION"] for p in running} == {str(revision)}, running
        assert {f"{p.pid}:{p.starttime}" for p in running} == {
            r.rsplit(":", 1)[0] for r in recorded
        }, f"running {running} != recorded {recorded}"
    else:
        from deployments.runtimes import get_runtime

        running = [s for s in get_runtime("docker").list_owned() if s.deployment == name]
        assert {s.runtime_id for s in running} == recorded, (running, recorded)
        assert all(s.running and s.revision == revision for s in running), running
    routers = routers_of(name)
    assert [f"{p.pid}:{p.starttime}" for p in routers] == [d.router_pid], (routers, d.router_pid)
    assert predict(d.endpoint) == version
    return d
