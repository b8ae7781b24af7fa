"""The reconciler's lease on a deployment: short, kept alive by a heartbeat while its
reconcile call runs, taken over soon after its owner dies, never renewed once released.

The pass itself stands in for a long step (an image build, a drain): what is tested is
who may reconcile the deployment meanwhile. Each worker is a thread with its own database
connection, as two Celery worker processes would be. The lease is shortened so that a pass
"longer than the lease" takes a second, not fifteen.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from deployments import reconciler
from deployments.models import Deployment
from deployments.reconciler import reconcile
from registry.models import RegisteredModel

pytestmark = pytest.mark.django_db(transaction=True)

LEASE = 1.0
BEAT = 0.2


@pytest.fixture(autouse=True)
def short_lease(monkeypatch):
    monkeypatch.setattr(reconciler, "LEASE_SECONDS", LEASE)
    monkeypatch.setattr(reconciler, "HEARTBEAT_SECONDS", BEAT)


@pytest.fixture
def deployment() -> Deployment:
    model = RegisteredModel.objects.create(name="leased")
    return Deployment.objects.create(name="leased", model=model, runtime="local", port=39999)


class Worker(threading.Thread):
    """reconcile() on its own thread and database connection: another worker process."""

    def __init__(self, deployment_id: int) -> None:
        super().__init__(daemon=True)
        self.deployment_id = deployment_id
        self.result: bool | None | str = "not finished"

    def run(self) -> None:
        try:
            self.result = reconcile(self.deployment_id, budget=0)
        finally:
            connection.close()


def lease_of(deployment_id: int) -> tuple[str, object]:
    row = Deployment.objects.get(pk=deployment_id)
    return row.lease_owner, row.lease_until


def heartbeats(deployment_id: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"lease-{deployment_id}"]


def test_the_lease_is_renewed_while_a_pass_longer_than_it_runs(deployment, monkeypatch):
    in_pass, finish = threading.Event(), threading.Event()

    def long_pass(deployment_id: int) -> bool:
        in_pass.set()
        finish.wait(timeout=30)
        return True

    monkeypatch.setattr(reconciler, "_pass", long_pass)
    first = Worker(deployment.pk)
    first.start()
    assert in_pass.wait(timeout=10)
    owner, taken_until = lease_of(deployment.pk)
    time.sleep(LEASE * 2.5)  # the lease as taken ran out long ago

    # A second worker is kept off: the first is still on it.
    assert reconcile(deployment.pk) is None
    still_owner, until = lease_of(deployment.pk)
    assert still_owner == owner
    assert until > taken_until and until > timezone.now()

    finish.set()
    first.join(timeout=10)
    assert first.result is True
    assert lease_of(deployment.pk) == ("", None)
    assert heartbeats(deployment.pk) == []  # stopped and joined, not left renewing


def test_another_worker_takes_over_soon_after_the_owner_is_gone(deployment, monkeypatch):
    started: list[reconciler._Heartbeat] = []

    class RecordedHeartbeat(reconciler._Heartbeat):
        def start(self) -> None:
            started.append(self)
            super().start()

    in_pass, finish = threading.Event(), threading.Event()

    def pass_(deployment_id: int) -> bool:
        if threading.current_thread() is first:  # the first worker's pass never ends
            in_pass.set()
            finish.wait(timeout=30)
        return True

    monkeypatch.setattr(reconciler, "_Heartbeat", RecordedHeartbeat)
    monkeypatch.setattr(reconciler, "_pass", pass_)
    first = Worker(deployment.pk)
    first.start()
    assert in_pass.wait(timeout=10)
    time.sleep(LEASE * 1.5)  # renewed meanwhile: not free yet

    # The owner's process dies mid-pass: its heartbeat goes with it, nothing is released.
    started[0].stop()
    gone = time.monotonic()
    owner, until = lease_of(deployment.pk)
    assert owner and until <= timezone.now() + timedelta(seconds=LEASE)

    refused = 0
    while (result := reconcile(deployment.pk)) is None:
        refused += 1
        assert time.monotonic() - gone < LEASE + 1.0, "the dead owner's lease did not run out"
        time.sleep(0.05)
    assert result is True
    assert refused > 0  # held until it ran out, not handed over at once

    finish.set()
    first.join(timeout=10)


def test_a_stuck_worker_is_not_renewed_forever(deployment, monkeypatch):
    in_pass, finish = threading.Event(), threading.Event()

    def pass_(deployment_id: int) -> bool:
        if threading.current_thread() is first:  # hung in one step, far past its budget
            in_pass.set()
            finish.wait(timeout=30)
        return True

    monkeypatch.setattr(reconciler, "LONGEST_STEP_SECONDS", LEASE)
    monkeypatch.setattr(reconciler, "_pass", pass_)
    first = Worker(deployment.pk)  # budget 0: renewed for LONGEST_STEP_SECONDS at most
    first.start()
    assert in_pass.wait(timeout=10)
    began = time.monotonic()

    while (result := reconcile(deployment.pk)) is None:
        assert time.monotonic() - began < 2 * LEASE + BEAT + 1.0, "still held"
        time.sleep(0.05)
    assert result is True
    assert time.monotonic() - began > LEASE  # kept through the longest step allowed

    finish.set()
    first.join(timeout=10)


def test_a_released_lease_is_not_renewed_by_the_heartbeat(deployment, monkeypatch):
    seen: list[tuple[str, object]] = []

    def pass_releasing_midway(deployment_id: int) -> bool:
        owner, _ = lease_of(deployment_id)
        reconciler._release(deployment_id, owner)
        time.sleep(BEAT * 4)  # several heartbeats come and go
        seen.append(lease_of(deployment_id))
        return True

    monkeypatch.setattr(reconciler, "_pass", pass_releasing_midway)
    assert reconcile(deployment.pk) is True
    assert seen == [("", None)]
    time.sleep(BEAT * 3)
    assert lease_of(deployment.pk) == ("", None)
    assert heartbeats(deployment.pk) == []


def test_a_lease_another_worker_took_over_is_left_to_it(deployment, monkeypatch):
    # The owner stalled (a database outage) past its lease and another worker took over.
    theirs = timezone.now() + timedelta(seconds=60)

    def pass_overtaken(deployment_id: int) -> bool:
        Deployment.objects.filter(pk=deployment_id).update(
            lease_owner="another-worker", lease_until=theirs
        )
        time.sleep(BEAT * 4)
        return False  # not converged: without the lease it must not go on

    monkeypatch.setattr(reconciler, "_pass", pass_overtaken)
    assert reconcile(deployment.pk, budget=30) is None
    assert lease_of(deployment.pk) == ("another-worker", theirs)
