"""The broker goes away while desired state changes: the API still answers (the change is
committed; the enqueue that fails after commit is swallowed), and once the broker is back
the periodic pass carries out every change, though the messages were lost.

With Redis as the broker (CI), Redis is stopped and started again without persistence, so
whatever it held is gone. With the embedded filesystem broker (the local default) the
worker and beat are paused instead and the messages the changes enqueued are deleted.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from deployments.models import Instance
from tests.faults.conftest import (
    assert_converged,
    deployment,
    describe,
    is_ready_on,
    redis_broker,
    redis_stopped,
    report,
    wait_for,
)

# serial: it stops a service every test worker shares (make test runs these after the others).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.serial]


def _deploy_v1(api, cluster, model: str):
    worker, beat = cluster.worker(), cluster.beat()
    resp = api.post(
        "/api/v1/deployments", {"name": "kept", "model": model, "version": "1", "runtime": "local"}
    )
    assert resp.status_code in (201, 202), resp.content
    wait_for(
        lambda: is_ready_on("kept", 1),
        timeout=120,
        what="kept to be ready",
        detail=lambda: describe("kept") + "\n" + cluster.logs(),
    )
    return worker, beat


def _change_desired_state(api) -> None:
    resp = api.patch("/api/v1/deployments/kept", {"version": "2"})
    assert resp.status_code == 202 and resp.json()["revision"] == 2, resp.content
    resp = api.post(
        "/api/v1/deployments",
        {
            "name": "born",
            "model": deployment("kept").model.name,
            "version": "1",
            "runtime": "local",
        },
    )
    assert resp.status_code == 202 and resp.json()["status"] == "pending", resp.content


def _wait_converged(cluster) -> None:
    wait_for(
        lambda: is_ready_on("kept", 2) and is_ready_on("born", 1),
        timeout=180,
        what="both changes to be carried out",
        detail=lambda: describe("kept") + "\n" + describe("born") + "\n" + cluster.logs(),
    )
    assert_converged("kept", revision=2, version="2", replicas=1)
    assert_converged("born", revision=1, version="1", replicas=1)


def test_changes_made_while_redis_is_down_are_carried_out_when_it_is_back(api, registered, cluster):
    where = redis_broker()
    if where is None:
        pytest.skip(
            "the broker is not Redis: set CELERY_BROKER_URL=redis://... to run this "
            "(the embedded broker's variant runs instead)"
        )
    worker, beat = _deploy_v1(api, cluster, registered(2))
    with redis_stopped(*where):
        down = time.monotonic()
        started = time.monotonic()
        _change_desired_state(api)
        api_s = time.monotonic() - started
        # Each write enqueues after its commit; with the broker refusing connections that
        # fails at once instead of retrying (kombu's default made each take about 6 s).
        assert api_s < 4, f"two API writes took {api_s:.1f} s while Redis was down"
        time.sleep(3)  # worker and beat are cut off from the broker
        assert not Instance.objects.filter(deployment=deployment("born")).exists(), describe("born")
        assert worker.alive() and beat.alive(), cluster.logs()
    outage = time.monotonic() - down
    back = time.monotonic()
    _wait_converged(cluster)
    reconverged = time.monotonic() - back
    # Not restarted: the same worker and beat reconnected by themselves.
    assert worker.alive() and beat.alive(), cluster.logs()
    report(
        "Redis stopped and started (no persistence)",
        outage_s=outage,
        two_api_writes_while_down_s=api_s,
        reconverged_after_redis_back_s=reconverged,
    )


def test_changes_whose_messages_are_lost_are_carried_out_by_the_periodic_pass(
    api, registered, cluster
):
    if redis_broker() is not None:
        pytest.skip("the broker is Redis: the Redis variant runs instead of the embedded broker's")
    worker, beat = _deploy_v1(api, cluster, registered(2))
    queue = Path(settings.DATA_DIR) / "broker" / "queue"
    worker.signal(signal.SIGSTOP)
    beat.signal(signal.SIGSTOP)
    try:
        _change_desired_state(api)
        # The messages those changes sent are lost with the broker.
        lost = [m for m in queue.iterdir() if m.name.endswith(".msg")]
        for message in lost:
            message.unlink()
        assert len(lost) >= 2  # at least one per change
    finally:
        worker.signal(signal.SIGCONT)
        beat.signal(signal.SIGCONT)
    back = time.monotonic()
    _wait_converged(cluster)
    reconverged = time.monotonic() - back
    report(
        "embedded broker: worker and beat paused, messages deleted",
        messages_lost=len(lost),
        reconverged_after_resume_s=reconverged,
    )


def test_a_torn_message_in_the_embedded_broker_does_not_stop_the_worker(cluster):
    if redis_broker() is not None:
        pytest.skip("the broker is Redis: torn message files are the embedded filesystem broker's")
    from controlplane.celery import app

    worker = cluster.worker()
    queue = Path(settings.DATA_DIR) / "broker" / "queue"
    # What a producer killed between creating a message file and writing it leaves behind
    # (kombu's own filesystem transport writes in place), ahead of a real message.
    torn = (
        queue
        / f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{settings.CELERY_TASK_DEFAULT_QUEUE}.msg"
    )
    torn.write_bytes(b"")
    time.sleep(0.01)
    sent = app.send_task("deployments.tasks.reconcile_all")
    wait_for(
        lambda: f"reconcile_all[{sent.id}] succeeded" in worker.text() or not worker.alive(),
        timeout=60,
        what="the worker to run the message after the torn one",
        detail=worker.tail,
    )
    assert worker.alive(), worker.tail()
    assert not torn.exists()
    assert "dropped an undecodable message" in worker.text()
