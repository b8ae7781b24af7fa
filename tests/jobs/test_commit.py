"""The commit point: a handler's ``ctx.commit()`` right before a step it cannot undo. A cancel
asked before it wins (the step is not done, the job ends cancelled); once it has passed, a
cancel is refused with 409 ``job_committed`` and the job ends as its handler does, on the
attempt that resumes it after its worker died too. Driven with a tiny handler run by the real
``job_run`` in a thread of its own (its own database connection), as a worker runs it."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from audit.models import AuditEvent
from controlplane.lib.errors import Conflict
from jobs import kinds, services
from jobs.errors import JobCancelled
from jobs.models import Job
from tests.support import run_job_in_thread

pytestmark = pytest.mark.django_db(transaction=True)


class Probe:
    """What the test's handler does and waits for: ``reached`` once it is at its commit point
    (before calling it), ``committed`` once past it; it then waits for ``release``, and
    records the irreversible step in ``done`` (the attempt that did it)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.committed = threading.Event()
        self.release = threading.Event()
        self.done: list[int] = []
        self.hold_before_commit = False


PROBE = Probe()


def probe_handler(ctx) -> dict:
    PROBE.reached.set()
    if PROBE.hold_before_commit:
        assert PROBE.release.wait(30), "the test never released the handler"
    ctx.commit()
    PROBE.committed.set()
    if not PROBE.hold_before_commit:
        assert PROBE.release.wait(30), "the test never released the handler"
    PROBE.done.append(ctx.attempt)
    return {"registered": True}


@pytest.fixture
def probe(monkeypatch):
    global PROBE
    PROBE = Probe()
    monkeypatch.setitem(kinds.KINDS, "probe", f"{__name__}:probe_handler")
    yield PROBE
    PROBE.release.set()


def probe_job(user, **fields) -> Job:
    """A queued job of the test's kind (created directly: it has no submit service)."""
    return Job.objects.create(kind="probe", input={}, owner=user, **fields)


def actions(job_id: int) -> list[str]:
    return list(
        AuditEvent.objects.filter(object_type="job", object_id=str(job_id))
        .order_by("id")
        .values_list("action", flat=True)
    )


def test_a_cancel_after_the_commit_point_is_409_and_the_job_succeeds(api, user, probe):
    job = probe_job(user)
    thread, ended = run_job_in_thread(job.pk)
    try:
        assert probe.committed.wait(30), Job.objects.get(pk=job.pk).error
        resp = api.post(f"/api/v1/jobs/{job.pk}/cancel")
        assert resp.status_code == 409, resp.content
        error = resp.json()["error"]
        assert error["code"] == "job_committed"
        assert "registering its output and will finish" in error["message"]
        row = Job.objects.get(pk=job.pk)
        assert row.state == "running" and not row.cancel_requested  # nothing changed
        body = api.get(f"/api/v1/jobs/{job.pk}").json()
        assert body["state"] == "running" and body["committed_at"] is not None
    finally:
        probe.release.set()
        thread.join(30)
    assert ended == ["succeeded"]
    assert probe.done == [1]
    body = api.get(f"/api/v1/jobs/{job.pk}").json()
    assert body["state"] == "succeeded" and body["result"] == {"registered": True}
    assert actions(job.pk) == ["job.start", "job.commit", "job.succeeded"]


def test_a_cancel_before_the_commit_point_wins_and_the_step_is_not_done(api, user, probe):
    probe.hold_before_commit = True
    job = probe_job(user)
    thread, ended = run_job_in_thread(job.pk)
    try:
        assert probe.reached.wait(30), Job.objects.get(pk=job.pk).error
        resp = api.post(f"/api/v1/jobs/{job.pk}/cancel")
        assert resp.status_code == 202, resp.content
        assert resp.json()["cancel_requested"] is True
    finally:
        probe.release.set()
        thread.join(30)
    assert ended == ["cancelled"]
    assert not probe.committed.is_set() and probe.done == []
    row = Job.objects.get(pk=job.pk)
    assert row.state == "cancelled" and row.committed_at is None
    assert actions(job.pk) == ["job.start", "job.cancel_requested", "job.cancelled"]


def test_a_job_whose_worker_died_after_committing_cannot_be_cancelled_and_is_finished(
    api, user, probe
):
    probe.release.set()
    # A worker took the job, passed the commit point and died (its lease ran out).
    job = probe_job(
        user,
        state="running",
        attempts=1,
        lease_owner="dead",
        lease_until=timezone.now() - timedelta(seconds=1),
        committed_at=timezone.now() - timedelta(seconds=2),
    )
    resp = api.post(f"/api/v1/jobs/{job.pk}/cancel")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_committed"
    assert services.job_sweep()["resumed"] == 1
    assert services.job_run(job_id=job.pk) == "succeeded", Job.objects.get(pk=job.pk).error
    assert probe.done == [2]  # the resuming attempt did the step (its commit() let it)
    assert actions(job.pk) == ["job.resume", "job.succeeded"]  # committed once, by attempt 1


def test_a_handler_stopping_as_cancelled_after_its_commit_point_fails_the_job(user, monkeypatch):
    """Nobody can have cancelled a committed job, so it never ends ``cancelled``."""

    def stops(ctx) -> dict:
        ctx.commit()
        raise JobCancelled()

    monkeypatch.setattr(f"{__name__}.probe_handler", stops)
    monkeypatch.setitem(kinds.KINDS, "probe", f"{__name__}:probe_handler")
    job = probe_job(user)
    assert services.job_run(job_id=job.pk) == "failed"
    row = Job.objects.get(pk=job.pk)
    assert row.error == "the handler stopped (JobCancelled) after its commit point"
    assert actions(job.pk) == ["job.start", "job.commit", "job.failed"]


def test_of_a_cancel_and_a_commit_racing_exactly_one_wins(user, role_admin):
    """Two threads, released together, on many jobs: a cancel and the commit of the run
    holding the lease. Each job ends either cancel-requested and uncommitted (the commit
    refused) or committed and not cancel-requested (the cancel refused with 409)."""
    rounds = 16
    owner = uuid.uuid4().hex
    jobs = [
        probe_job(
            user,
            state="running",
            attempts=1,
            lease_owner=owner,
            lease_until=timezone.now() + timedelta(seconds=600),
        )
        for _ in range(rounds)
    ]
    outcomes: dict[int, dict[str, object]] = {job.pk: {} for job in jobs}

    def cancel(job: Job, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(10)
            try:
                services.job_cancel(job=job, actor=role_admin)
                outcomes[job.pk]["cancel"] = "accepted"
            except Conflict as exc:
                outcomes[job.pk]["cancel"] = exc.code
        finally:
            connection.close()

    def commit(job: Job, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(10)
            outcomes[job.pk]["commit"] = services.job_commit(job_id=job.pk, lease_owner=owner)
        finally:
            connection.close()

    for job in jobs:
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=cancel, args=(job, barrier)),
            threading.Thread(target=commit, args=(job, barrier)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    for job in jobs:
        row = Job.objects.get(pk=job.pk)
        got = outcomes[job.pk]
        if got["commit"]:
            assert got["cancel"] == "job_committed", got
            assert row.committed_at is not None and not row.cancel_requested
        else:
            assert got["cancel"] == "accepted", got
            assert row.committed_at is None and row.cancel_requested
        assert row.state == "running"
    print(f"commit won {sum(bool(o['commit']) for o in outcomes.values())} of {rounds} races")
