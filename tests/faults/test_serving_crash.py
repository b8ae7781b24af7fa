"""A model server (a process, or a container's process) that dies is restarted by the
control plane as it runs in production: a Celery worker and beat as processes, the
reconciler driven by beat's periodic pass; the test only kills and watches."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from django.utils import timezone

from deployments.models import DeploymentEvent, Instance
from tests.faults.conftest import (
    ROW_BODY,
    assert_converged,
    deployment,
    describe,
    is_ready_on,
    predict,
    report,
    wait_for,
)
from tests.support import Load

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _deploy(
    api, cluster, model: str, name: str, *, runtime: str, replicas: int, timeout: float = 120
):
    cluster.worker()
    cluster.beat()
    resp = api.post(
        "/api/v1/deployments",
        {"name": name, "model": model, "version": "1", "runtime": runtime, "replicas": replicas},
    )
    assert resp.status_code in (201, 202), resp.content
    wait_for(
        lambda: is_ready_on(name, 1),
        timeout=timeout,
        what=f"{name} to be ready",
        detail=lambda: describe(name) + "\n" + cluster.logs(),
    )
    return assert_converged(name, revision=1, version="1", replicas=replicas, runtime=runtime)


def _restarted(name: str, ordinal: int, old_runtime_id: str, *, restarts: int = 1):
    d = deployment(name)
    inst = Instance.objects.filter(deployment=d, ordinal=ordinal).first()
    return (
        is_ready_on(name, 1)
        and inst is not None
        and inst.state == "ready"
        and inst.restarts >= restarts
        and inst.runtime_id != old_runtime_id
    )


def test_a_killed_model_server_process_is_restarted_by_the_running_control_plane(
    api, registered, cluster
):
    d = _deploy(api, cluster, registered(1), "crashy", runtime="local", replicas=2)
    victim = Instance.objects.get(deployment=d, ordinal=0)
    bystander = Instance.objects.get(deployment=d, ordinal=1)
    with Load("127.0.0.1", d.port, "/invocations", ROW_BODY, clients=4) as load:
        time.sleep(0.5)
        started = time.monotonic()
        os.kill(int(victim.runtime_id.split(":")[0]), signal.SIGKILL)
        wait_for(
            lambda: _restarted("crashy", 0, victim.runtime_id),
            timeout=90,
            what="the killed server to be restarted",
            detail=lambda: describe("crashy") + "\n" + cluster.logs(),
        )
        recovered = time.monotonic() - started
        time.sleep(0.5)
    d = assert_converged("crashy", revision=1, version="1", replicas=2)
    again = Instance.objects.get(deployment=d, ordinal=0)
    assert again.restarts == 1 and again.port == victim.port  # same instance, new process
    assert Instance.objects.get(deployment=d, ordinal=1).runtime_id == bystander.runtime_id
    assert DeploymentEvent.objects.filter(deployment=d, kind="crash").count() == 1
    # The router retries a request the dead server refused or dropped unanswered on the
    # other replica: no client sees the crash.
    assert load.failures == []
    report(
        "serving process SIGKILL (local, 2 replicas)",
        recovered_s=recovered,
        requests_ok=load.ok,
        requests_failed=len(load.failures),
    )


@pytest.mark.docker
def test_a_killed_container_process_is_restored(api, registered, cluster):
    from tests.deployments.docker_support import require_base_image, require_docker

    require_docker()
    require_base_image()
    import docker

    d = _deploy(api, cluster, registered(1), "boxed", runtime="docker", replicas=1, timeout=600)
    client = docker.from_env()
    try:
        # 1. The model server inside the container dies (an OOM kill, a segfault): the
        #    engine's restart policy or the reconciler brings it back.
        first = Instance.objects.get(deployment=d)
        container = client.containers.get(first.runtime_id)
        pid = container.attrs["State"]["Pid"]  # tini; the server is its child
        server = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
        ).stdout.split()
        assert server, "no server process in the container"
        started, killed_at = time.monotonic(), timezone.now()
        for p in server:
            os.kill(int(p), signal.SIGKILL)
        wait_for(
            lambda: _restarted_in_place_or_anew(client, "boxed", first.runtime_id, killed_at),
            timeout=180,
            what="the container to serve again",
            detail=lambda: describe("boxed") + "\n" + cluster.logs(),
        )
        in_container = time.monotonic() - started
        d = assert_converged("boxed", revision=1, version="1", replicas=1, runtime="docker")
        same = Instance.objects.get(deployment=d).runtime_id == first.runtime_id
        brought_back_by = (
            "the engine (same container)" if same else "the reconciler (new container)"
        )

        # 2. The container is killed (`docker kill`: the engine will not restart it):
        #    only the reconciler can.
        second = Instance.objects.get(deployment=d)
        started = time.monotonic()
        client.containers.get(second.runtime_id).kill()
        wait_for(
            lambda: _restarted("boxed", 0, second.runtime_id),
            timeout=180,
            what="the reconciler to replace the killed container",
            detail=lambda: describe("boxed") + "\n" + cluster.logs(),
        )
        replaced = time.monotonic() - started
    finally:
        client.close()
    d = assert_converged("boxed", revision=1, version="1", replicas=1, runtime="docker")
    assert DeploymentEvent.objects.filter(deployment=d, kind="crash").exists()
    report(
        "container faults (docker, 1 replica)",
        server_killed_recovered_s=in_container,
        server_killed_brought_back_by=brought_back_by,
        container_killed_replaced_s=replaced,
    )


def _restarted_in_place_or_anew(client, name: str, runtime_id: str, killed_at) -> bool:
    """Ready again (probed since the kill, and answering), and either the engine restarted
    the same container or the reconciler replaced it with a new one."""
    inst = Instance.objects.get(deployment=deployment(name))
    if not (is_ready_on(name, 1) and inst.state == "ready" and inst.last_probe_at > killed_at):
        return False
    if (
        inst.runtime_id == runtime_id
        and client.containers.get(runtime_id).attrs["RestartCount"] < 1
    ):
        return False
    try:
        return predict(deployment(name).endpoint) == "1"
    except OSError:
        return False
