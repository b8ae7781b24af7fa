"""The Celery worker is SIGKILLed in the middle of a rollout (its pool too: a lost node),
and a new one is started: the rollout completes, with no duplicate or stray server and
no failed request at the endpoint."""

from __future__ import annotations

import time

import pytest
from django.utils import timezone

from deployments.models import Instance, Revision
from deployments.reconciler import LEASE_SECONDS
from deployments.runtimes import get_runtime
from tests.deployments.conftest import instance_spec
from tests.faults.conftest import (
    ROW_BODY,
    assert_converged,
    deployment,
    describe,
    is_ready_on,
    report,
    wait_for,
)
from tests.support import Load

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROLLING_OUT = ("starting instances", "waiting for readiness")


def test_a_rollout_completes_after_the_worker_is_killed_in_the_middle(api, registered, cluster):
    model = registered(2)
    worker = cluster.worker()
    cluster.beat()
    resp = api.post(
        "/api/v1/deployments",
        {"name": "rolling", "model": model, "version": "1", "runtime": "local", "replicas": 2},
    )
    assert resp.status_code in (201, 202), resp.content
    wait_for(
        lambda: is_ready_on("rolling", 1),
        timeout=120,
        what="rolling to be ready on r1",
        detail=lambda: describe("rolling") + "\n" + cluster.logs(),
    )
    d = assert_converged("rolling", revision=1, version="1", replicas=2)

    with Load("127.0.0.1", d.port, "/invocations", ROW_BODY, clients=4) as load:
        time.sleep(0.5)
        resp = api.patch("/api/v1/deployments/rolling", {"version": "2"})
        assert resp.status_code == 202 and resp.json()["revision"] == 2, resp.content
        wait_for(
            lambda: (
                deployment("rolling").phase in ROLLING_OUT
                and deployment("rolling").desired_revision.number == 2
            ),
            timeout=60,
            interval=0.02,
            what="the rollout of r2 to start",
            detail=lambda: describe("rolling"),
        )
        worker.kill()
        killed, killed_at = time.monotonic(), timezone.now()
        at_kill = deployment("rolling")
        assert at_kill.serving_revision.number == 1, describe("rolling")  # killed mid-rollout
        lease_left = (
            (at_kill.lease_until - killed_at).total_seconds() if at_kill.lease_until else 0.0
        )

        second = cluster.worker()
        restarted = time.monotonic() - killed
        wait_for(
            lambda: is_ready_on("rolling", 2),
            timeout=240,
            what="the rollout to complete",
            detail=lambda: describe("rolling") + "\n" + cluster.logs(),
        )
        reconverged = time.monotonic() - killed
        time.sleep(0.5)

    # The dead worker's heartbeat died with it: its short lease runs out and the new worker
    # takes over within about that lease plus a pass (with an 80 s lease this took 81-86 s).
    assert lease_left <= LEASE_SECONDS, describe("rolling")
    assert reconverged < LEASE_SECONDS + 30, f"converged {reconverged:.1f}s after the kill"
    d = assert_converged("rolling", revision=2, version="2", replicas=2)
    states = dict(Revision.objects.filter(deployment=d).values_list("number", "state"))
    assert states == {1: "superseded", 2: "live"}
    assert load.failures == []
    assert load.ok > 100
    # Each client saw v1, then v2, and never v1 again.
    assert list(load.sequences.values()) == [["1", "2"]] * 4
    reconciles = second.text().count("Task deployments.tasks.reconcile[")
    report(
        "worker SIGKILL mid-rollout (local, 2 replicas)",
        phase_at_kill=at_kill.phase,
        lease_left_at_kill_s=lease_left,
        new_worker_ready_s=restarted,
        reconverged_s=reconverged,
        reconcile_tasks_received=reconciles,
        requests_ok=load.ok,
        requests_failed=len(load.failures),
    )


def test_a_server_started_by_a_worker_that_died_before_recording_it_is_adopted(
    api, registered, cluster
):
    # The narrowest window of a worker crash, made deterministic: the worker had started a
    # model server (its row written first, as always) and died before saving the server's id.
    model = registered(1)
    worker, beat = cluster.worker(), cluster.beat()
    resp = api.post(
        "/api/v1/deployments",
        {"name": "orphan", "model": model, "version": "1", "runtime": "local"},
    )
    assert resp.status_code in (201, 202), resp.content
    wait_for(
        lambda: is_ready_on("orphan", 1),
        timeout=120,
        what="orphan to be ready",
        detail=lambda: describe("orphan") + "\n" + cluster.logs(),
    )
    # Beat first, then the worker once no pass holds the deployment's lease: this test is
    # about adoption, not about waiting out a dead worker's lease (the test above).
    beat.kill()
    wait_for(
        lambda: deployment("orphan").lease_until is None,
        timeout=60,
        what="the lease to be released",
    )
    worker.kill()
    inst = Instance.objects.select_related("revision__model_version__model").get(
        deployment__name="orphan"
    )
    # The server had crashed, the worker forgot its id before starting another (as it
    # does), and the start was the last thing it did.
    get_runtime("local").stop(inst.runtime_id, timeout=5)
    Instance.objects.filter(pk=inst.pk).update(runtime_id="")
    started = get_runtime("local").start(instance_spec(inst, port=inst.port))

    cluster.worker()
    cluster.beat()
    wait_for(
        lambda: Instance.objects.get(pk=inst.pk).runtime_id and is_ready_on("orphan", 1),
        timeout=180,
        what="the control plane to take the server over",
        detail=lambda: describe("orphan") + "\n" + cluster.logs(),
    )
    assert_converged("orphan", revision=1, version="1", replicas=1)
    # Adopted, not started again.
    assert Instance.objects.get(pk=inst.pk).runtime_id == started.runtime_id
