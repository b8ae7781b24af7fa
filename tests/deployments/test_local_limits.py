"""The local runtime enforces a deployment's resources without cgroups: ``memory_mb`` as the
server's RLIMIT_DATA, ``cpu`` as a CPU affinity of whole cores. Real model servers, deployed
through the API; the reconciler runs as the Celery task would."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from deployments import router
from deployments.models import DeploymentEvent, Instance, Revision
from deployments.runtimes import InstanceSpec, get_runtime
from deployments.services import allocate_port
from tests.deployments.conftest import converge

pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.timeout(300)]

ROW = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}


def predict(endpoint: str) -> dict:
    req = urllib.request.Request(
        f"{endpoint}/invocations",
        data=json.dumps(ROW).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def max_data_size(pid: int) -> tuple[str, str]:
    """(soft, hard) RLIMIT_DATA of a process, as /proc/<pid>/limits shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no 'Max data size' in /proc/{pid}/limits")


def server_pid(deployment_name: str) -> int:
    inst = Instance.objects.get(deployment__name=deployment_name)
    return int(inst.runtime_id.split(":")[0])


def test_a_deployment_with_limits_serves_under_them(api, registered):
    name = registered(1)
    resp = api.post(
        "/api/v1/deployments",
        {
            "name": "capped",
            "model": name,
            "version": "1",
            "runtime": "local",
            "resources": {"cpu": 1, "memory_mb": 512},
        },
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("capped")
    assert len(predict(d.endpoint)["predictions"]) == 1
    pid = server_pid("capped")
    assert max_data_size(pid) == (str(512 * 1024 * 1024), str(512 * 1024 * 1024))
    cores = os.sched_getaffinity(pid)
    assert len(cores) == 1 and cores <= os.sched_getaffinity(0)
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"CONTROLPLANE_MEMORY_MB=512" in environ
    assert f"CONTROLPLANE_CPUS={cores.pop()}".encode() in environ
    logs = api.get("/api/v1/deployments/capped/logs?tail=50").json()["instances"]
    assert "starting under limits: memory 512 MB (RLIMIT_DATA), CPU cores" in logs[0]["logs"]


def test_a_memory_limit_too_small_fails_the_revision_with_a_reason(api, registered):
    name = registered(1)
    resp = api.post(
        "/api/v1/deployments",
        {
            "name": "starved",
            "model": name,
            "version": "1",
            "runtime": "local",
            "resources": {"memory_mb": 64},  # the API's minimum: the server needs 4 times that
        },
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("starved", until=lambda x: x.status == "failed", timeout=90)
    revision = Revision.objects.get(deployment=d, number=1)
    assert revision.state == "failed" and "crash-looped" in revision.failure
    got = api.get("/api/v1/deployments/starved")
    assert got.status_code == 200
    assert got.json()["status"] == "failed" and "crash-looped" in got.json()["status_message"]
    crashes = DeploymentEvent.objects.filter(deployment=d, kind="crash")
    assert crashes.exists()
    assert all(re.search(r"exited with -?\d+(: .+)?; restarting", e.message) for e in crashes)
    # The reason names what the server said last, so the user need not find its log.
    assert "; last: exited with" in revision.failure
    assert any(
        sign in revision.failure
        for sign in ("MemoryError", "Cannot allocate memory", "OpenBLAS", "memory")
    ), revision.failure
    # The instances are gone with the failed revision; their log stays with the runtime, and
    # says which limit the server ran under and that it failed to allocate.
    text = get_runtime("local").logs("0:0:starved-r1-0", tail=200)
    assert "starting under limits: memory 64 MB (RLIMIT_DATA)" in text
    assert "needs a larger resources.memory_mb" in text
    assert any(
        sign in text for sign in ("MemoryError", "Cannot allocate memory", "OpenBLAS error")
    ), text


def test_without_limits_nothing_is_set(api, registered):
    name = registered(1)
    resp = api.post(
        "/api/v1/deployments",
        {"name": "free", "model": name, "version": "1", "runtime": "local"},
    )
    assert resp.status_code in (201, 202), resp.content
    converge("free")
    pid = server_pid("free")
    assert max_data_size(pid) == ("unlimited", "unlimited")
    assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"CONTROLPLANE_MEMORY_MB=" not in environ and b"CONTROLPLANE_CPUS=" not in environ


def test_cpu_is_rounded_up_to_whole_cores_at_most_the_hosts(sklearn_model_dir):
    runtime = get_runtime("local")
    host = os.sched_getaffinity(0)
    for cpu, want in ((0.05, 1), (1.5, min(2, len(host))), (64, len(host))):
        spec = InstanceSpec(
            deployment="cores",
            revision=1,
            ordinal=0,
            model_name="m",
            model_version="1",
            model_dir=str(sklearn_model_dir),
            model_sha256="",
            port=allocate_port(),
            cpu=cpu,
        )
        status = runtime.start(spec)
        try:
            # Set before exec: it holds from the server's first instruction.
            cores = os.sched_getaffinity(int(status.runtime_id.split(":")[0]))
        finally:
            runtime.stop(status.runtime_id, timeout=1)
        assert len(cores) == want and cores <= host, (cpu, cores)


def test_an_idle_priority_instance_runs_under_sched_idle_in_every_thread(sklearn_model_dir):
    runtime = get_runtime("local")
    policies = {}
    for priority in ("idle", "normal"):
        spec = InstanceSpec(
            deployment="prio",
            revision=1,
            ordinal=0,
            model_name="m",
            model_version="1",
            model_dir=str(sklearn_model_dir),
            model_sha256="",
            port=allocate_port(),
            priority=priority,
        )
        status = runtime.start(spec)
        try:
            pid = int(status.runtime_id.split(":")[0])
            deadline = time.monotonic() + 60
            while runtime.inspect(status.runtime_id).running and time.monotonic() < deadline:
                if router.ping(status.address, timeout=1):
                    break  # serving: its threads (OpenBLAS, batching) exist now
                time.sleep(0.2)
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            policies[priority] = {os.sched_getscheduler(t) for t in threads}
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert (b"CONTROLPLANE_PRIORITY=idle" in environ) == (priority == "idle")
        finally:
            runtime.stop(status.runtime_id, timeout=1)
        assert len(threads) > 1
    # Set before exec, so inherited by every thread the server makes.
    assert policies == {"idle": {os.SCHED_IDLE}, "normal": {os.SCHED_OTHER}}
