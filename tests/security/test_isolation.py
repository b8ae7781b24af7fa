"""Model code is untrusted: a model server reaches nothing of the control plane's.

A hostile custom pyfunc (tests/security/isolation_probe.py, cloudpickled by value: the issue's
attack) is registered and deployed through the API on each runtime; its predictions are the
report of what it could reach. Every attempt must be denied. The same probe run in the test
process (the control plane's side) first shows that each attempt *can* succeed where nothing
isolates it, so a denial inside the server is the sandbox's doing, not a broken probe.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from deployments.models import Instance
from deployments.runtimes import sandbox
from tests.conftest import zip_dir
from tests.deployments.conftest import _kill_owned_processes, converge  # noqa: F401 (autouse)
from tests.deployments.docker_support import require_base_image, require_docker
from tests.security import isolation_probe

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def probe_zip(tmp_path_factory) -> bytes:
    import cloudpickle
    import mlflow
    import mlflow.pyfunc

    cloudpickle.register_pickle_by_value(isolation_probe)
    try:
        path = tmp_path_factory.mktemp("probe") / "model"
        mlflow.pyfunc.save_model(
            str(path),
            python_model=isolation_probe.Probe(),
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"cloudpickle=={cloudpickle.__version__}",
            ],
        )
    finally:
        cloudpickle.unregister_pickle_by_value(isolation_probe)
    return zip_dir(path)


class StandIn:
    """A listener on 127.0.0.1 standing in for a control-plane port (the web app, MLflow)
    that does not run in this test: accepts and closes connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def targets():
    """The probe's targets (its environment), and the ones the test process reaches."""
    web, mlflow_server = StandIn(), StandIn()
    database = Path(settings.DATABASES["default"]["NAME"])
    if not database.is_file():  # PostgreSQL (CI): the embedded file is what make run uses
        database = Path(settings.DATA_DIR) / "controlplane.sqlite3"
        database.touch(mode=0o600)
    secret = Path(settings.DATA_DIR) / "secret_key"
    if not secret.exists():
        secret.write_text("x" * 50)
    os.chmod(secret, 0o600)
    tcp = [f"127.0.0.1:{web.port}", f"127.0.0.1:{mlflow_server.port}"]
    tcp += ["127.0.0.1:5432", "127.0.0.1:6379"]
    unix = [
        p for p in ("/run/postgresql/.s.PGSQL.5432", "/var/run/docker.sock") if Path(p).exists()
    ]
    env = {
        "PROBE_FILES": "|".join([str(secret), str(database)]),
        "PROBE_WRITE": str(database),
        "PROBE_LIST": "|".join([str(settings.DATA_DIR), str(settings.DATA_DIR / "models")]),
        "PROBE_TCP": "|".join(tcp),
        "PROBE_UNIX": "|".join(unix),
        "PROBE_PID": str(os.getpid()),  # this process runs the reconciler (as the worker would)
    }
    yield env
    web.close()
    mlflow_server.close()


def predict(endpoint: str) -> list[dict]:
    req = urllib.request.Request(
        f"{endpoint}/invocations",
        data=json.dumps({"inputs": [[0]]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    return json.loads(answer["predictions"][0])


def deploy(api, name: str, payload: bytes, *, runtime: str, env: dict) -> str:
    assert api.post("/api/v1/models", {"name": name}).status_code == 201
    resp = api.upload(f"/api/v1/models/{name}/versions", payload)
    assert resp.status_code == 201, resp.content
    resp = api.post(
        "/api/v1/deployments",
        {"name": name, "model": name, "version": "1", "runtime": runtime, "env": env},
    )
    assert resp.status_code in (201, 202), resp.content
    return converge(name, timeout=600 if runtime == "docker" else 90).endpoint


def assert_all_denied(reports: list[dict], env: dict, *, own_model: str) -> None:
    for r in reports:  # the measured report (pytest -s), for the README's threat model
        print(f"  {'REACHED' if r['ok'] else 'denied '} {r['what']}: {r['detail'][:120]}")
    expected = {"uid"}
    expected |= {f"read {p}" for p in env["PROBE_FILES"].split("|")}
    expected |= {f"connect {t}" for t in env["PROBE_TCP"].split("|")}
    expected |= {f"signal 0 to pid {env['PROBE_PID']}", f"ptrace pid {env['PROBE_PID']}"}
    assert expected <= {r["what"] for r in reports}, reports
    # Listing the data directory may work, but must show nothing of the control plane's:
    # inside the sandbox it is an empty tmpfs holding only the server's own mount points.
    own = {"models", "sockets", own_model}
    allowed = [
        r
        for r in reports
        if r["ok"] and not (r["what"].startswith("list ") and set(json.loads(r["detail"])) <= own)
    ]
    assert not allowed, "the model server reached: " + json.dumps(allowed, indent=1)


def test_the_probe_reaches_everything_from_the_control_planes_side(targets):
    """The control: unconfined, the same attempts succeed (so the denials below are real)."""
    reports = {r["what"]: r for r in isolation_probe.probe(targets)}
    for path in targets["PROBE_FILES"].split("|"):
        assert reports[f"read {path}"]["ok"], reports
    for target in targets["PROBE_TCP"].split("|")[:2]:
        assert reports[f"connect {target}"]["ok"], reports
    assert reports[f"signal 0 to pid {targets['PROBE_PID']}"]["ok"], reports
    assert "secret_key" in json.loads(reports[f"list {settings.DATA_DIR}"]["detail"])


@pytest.mark.skipif(not sandbox.available(), reason="the local sandbox needs a root control plane")
def test_a_hostile_model_on_the_local_runtime_reaches_nothing(api, probe_zip, targets):
    endpoint = deploy(api, "hostile-local", probe_zip, runtime="local", env=targets)
    reports = predict(endpoint)
    assert_all_denied(reports, targets, own_model="hostile-local")
    inst = Instance.objects.get(deployment__name="hostile-local")
    assert inst.address.startswith("unix:"), inst.address
    pid = int(inst.runtime_id.split(":")[0])
    status = Path(f"/proc/{pid}/status").read_text()
    uid = sandbox.uid_for(inst.port)
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
    assert "NoNewPrivs:\t1" in status
    assert re.search(r"^Groups:\s*$", status, re.M)
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert f"Max processes             {sandbox.NPROC}                  {sandbox.NPROC}" in limits
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    # and the monitoring side still reaches it, over its socket
    from monitoring.adapters import ModelServer

    assert "serving_requests_total" in ModelServer(inst.address).metrics()


def test_a_hostile_model_on_the_docker_runtime_reaches_nothing(api, probe_zip, targets):
    require_docker()
    require_base_image()
    endpoint = deploy(api, "hostile-docker", probe_zip, runtime="docker", env=targets)
    reports = predict(endpoint)
    assert_all_denied(reports, targets, own_model="hostile-docker")
    inst = Instance.objects.get(deployment__name="hostile-docker")
    assert inst.address.startswith("unix:"), inst.address
    import docker

    client = docker.from_env()
    try:
        container = client.containers.get(inst.runtime_id)
        assert container.attrs["HostConfig"]["NetworkMode"] == "none"
        # the engine's healthcheck reaches the server over its socket too
        deadline = time.monotonic() + 60
        while container.attrs["State"].get("Health", {}).get("Status") != "healthy":
            assert time.monotonic() < deadline, container.attrs["State"].get("Health")
            time.sleep(1)
            container.reload()
    finally:
        client.close()


@pytest.fixture
def unprivileged(monkeypatch, settings):
    """The control plane as a non-root user would run it: no sandbox for local servers."""
    from deployments import runtimes

    monkeypatch.setattr(sandbox, "available", lambda: False)
    runtimes._build.cache_clear()
    yield settings
    runtimes._build.cache_clear()


def test_without_root_the_deployment_page_says_model_code_is_not_isolated(
    api, client_logged_in, model_zip, unprivileged
):
    assert api.post("/api/v1/models", {"name": "plain"}).status_code == 201
    assert api.upload("/api/v1/models/plain/versions", model_zip).status_code == 201
    resp = api.post(
        "/api/v1/deployments",
        {"name": "plain", "model": "plain", "version": "1", "runtime": "local"},
    )
    assert resp.status_code in (201, 202), resp.content
    page = client_logged_in.get("/deployments/plain/").content.decode()
    assert 'id="dep-isolation"' in page and "not root" in page


def test_refuse_pickle_fails_a_pickled_model_on_an_unsandboxed_local_runtime(
    api, probe_zip, model_zip, unprivileged
):
    unprivileged.CONTROLPLANE_LOCAL_REFUSE_PICKLE = True
    for name, payload in (("pickled", probe_zip), ("skops", model_zip)):
        assert api.post("/api/v1/models", {"name": name}).status_code == 201
        assert api.upload(f"/api/v1/models/{name}/versions", payload).status_code == 201
        resp = api.post(
            "/api/v1/deployments", {"name": name, "model": name, "version": "1", "runtime": "local"}
        )
        assert resp.status_code in (201, 202), resp.content
    d = converge("pickled", until=lambda d: d.status == "failed")
    assert "CONTROLPLANE_LOCAL_REFUSE_PICKLE" in d.status_message
    assert "cloudpickled custom pyfunc" in d.status_message
    assert not Instance.objects.filter(deployment=d).exists()
    # a model that loads without unpickling (skops) still deploys, unsandboxed
    d = converge("skops")
    inst = Instance.objects.get(deployment=d)
    assert inst.address == f"127.0.0.1:{inst.port}"
