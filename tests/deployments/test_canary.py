"""Canary rollouts end to end on the local runtime: real model servers (custom pyfuncs), the
real router, real MLflow; the reconciler runs as the Celery task would. One test walks the
promote path then the abort path on one deployment (servers are the expensive part)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from deployments.models import Deployment, DeploymentEvent, Revision, Rollout
from deployments.reconciler import reconcile
from tests.deployments.canary_support import TimedLoad, body, model_zip
from tests.deployments.conftest import converge

pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = {
    "type": "canary",
    "steps": [{"weight": 30, "seconds": 3}, {"weight": 60, "seconds": 2}],
    "analysis": {"min_samples": 40},
    "inconclusive_deadline_s": 60,
}


@pytest.fixture(scope="module")
def canary_zips(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("canary-models")
    return {mode: model_zip(workdir, mode) for mode in ("good", "fail")}


def _upload(api, name: str, payload: bytes) -> None:
    resp = api.upload(f"/api/v1/models/{name}/versions", payload)
    assert resp.status_code == 201, resp.content


def test_a_good_candidate_is_promoted_step_by_step_and_a_failing_one_aborted_at_once(
    api, canary_zips, model_name
):
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    for mode in ("good", "good", "fail"):  # v1 baseline, v2 identical, v3 fails on ~30 %
        _upload(api, model_name, canary_zips[mode])
    resp = api.post(
        "/api/v1/deployments",
        {"name": "cnry", "model": model_name, "version": "1", "runtime": "local"},
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("cnry", timeout=90)

    with TimedLoad(d.port, clients=2) as load:
        time.sleep(0.5)
        resp = api.patch("/api/v1/deployments/cnry", {"version": "2", "strategy": STEPS})
        assert resp.status_code in (200, 202), resp.content
        # A worker dies mid-canary (its lease left behind): the next one resumes the same
        # step with the same clock, from the database.
        deadline = time.monotonic() + 60
        while not Rollout.objects.filter(
            revision__deployment=d, revision__number=2, step=0
        ).exists():
            assert time.monotonic() < deadline, "the canary never started"
            reconcile(d.pk, budget=0.3)
        first = Rollout.objects.get(revision__deployment=d, revision__number=2)
        Deployment.objects.filter(pk=d.pk).update(
            lease_owner="dead-worker", lease_until=timezone.now() - timedelta(seconds=1)
        )
        reconcile(d.pk, budget=0.2)
        resumed = Rollout.objects.get(pk=first.pk)
        assert (resumed.step, resumed.step_started_at) == (0, first.step_started_at)
        assert resumed.window_start == first.window_start
        d = converge(
            "cnry",
            until=lambda dep: (
                dep.status == Deployment.Status.READY and dep.serving_revision.number == 2
            ),
            timeout=90,
        )
        promoted = api.get("/api/v1/deployments/cnry").json()["rollout"]
        assert promoted["state"] == "promoted" and promoted["decision"] == "promote"
        assert {c["name"]: c["verdict"] for c in promoted["checks"]} == {
            "error_rate": "pass",
            "latency_p95": "pass",
            "latency_p99": "pass",
            "prediction_psi": "pass",
            "accuracy": "skipped",
        }
        ro2 = Rollout.objects.get(revision__deployment=d, revision__number=2)
        assert [(e["step"], e["decision"]) for e in ro2.decisions] == [
            (0, "promote"),
            (1, "promote"),
        ]
        steps = DeploymentEvent.objects.filter(deployment=d, kind="canary_step")
        assert sorted(e.message.split(" gets ")[1] for e in steps) == [
            "30 % for 3 s",
            "60 % for 2 s",
        ]
        before_abort = load.snapshot()
        assert before_abort and all(status == 200 for _, status, _ in before_abort)
        assert {v for _, _, v in before_abort} >= {"1", "2"}

        resp = api.patch("/api/v1/deployments/cnry", {"version": "3"})  # the same strategy
        assert resp.status_code in (200, 202), resp.content
        d = converge(
            "cnry",
            until=lambda dep: (
                dep.desired_revision.number == 2 and dep.status == Deployment.Status.READY
            ),
            timeout=90,
        )
        time.sleep(1.0)
    r3 = Revision.objects.get(deployment=d, number=3)
    assert r3.state == Revision.State.FAILED and "error_rate fail" in r3.failure
    ro = Rollout.objects.get(revision=r3)
    assert ro.state == Rollout.State.ABORTED and ro.step == 0
    abort = ro.decisions[-1]
    assert abort["decision"] == "abort" and abort["router_confirmed"] is True
    assert abort["to_baseline_ms"] < 1000
    decided = datetime.fromisoformat(abort["at"]).timestamp()
    step_start = ro.step_started_at.timestamp()
    results = load.snapshot()
    failed = [r for r in results if r[1] != 200]
    in_step = [r for r in results if step_start <= r[0] <= decided]
    assert failed, "the failing candidate got no traffic at all"
    # Failures only from the candidate's share of its first step, none after the abort
    # (the decision is stamped once the router confirmed 100 % baseline).
    assert all(step_start <= t <= decided + 0.05 for t, _, _ in failed), (
        step_start,
        decided,
        failed,
    )
    assert len(failed) <= 0.30 * 0.30 * len(in_step) * 1.6 + 5, (len(failed), len(in_step))
    got = api.get("/api/v1/deployments/cnry").json()
    assert got["rollout"]["revision"] == 3 and got["rollout"]["decision"] == "abort"
    assert {c["name"]: c["verdict"] for c in got["rollout"]["checks"]}["error_rate"] == "fail"
    assert DeploymentEvent.objects.filter(deployment=d, kind="canary_abort").exists()
    assert AuditEvent.objects.filter(action="deployment.rollout_abort", object_id="cnry").exists()

    # A sticky A/B split on the same deployment: v2 (serving) and v1 at 50/50, both serving;
    # one caller always gets the same variant; abort returns to the baseline.
    resp = api.patch(
        "/api/v1/deployments/cnry",
        {
            "variants": [{"version": "2", "weight": 50}, {"version": "1", "weight": 50}],
            "sticky": "header:X-User-Id",
        },
    )
    assert resp.status_code in (200, 202), resp.content
    d = converge("cnry", until=lambda dep: dep.phase.startswith("split"), timeout=90)
    seen: dict[str, set[str]] = {}
    for _ in range(3):
        for user in range(12):
            _, version = predict(d.port, {"X-User-Id": f"user-{user}"})
            seen.setdefault(f"user-{user}", set()).add(version)
    assert all(len(v) == 1 for v in seen.values()), seen
    assert set().union(*seen.values()) == {"1", "2"}
    assert api.post("/api/v1/deployments/cnry/rollout/abort", {}).status_code == 202
    d = converge(
        "cnry",
        until=lambda dep: (
            dep.desired_revision.number == 2 and dep.status == Deployment.Status.READY
        ),
        timeout=60,
    )
    assert {predict(d.port, {"X-User-Id": f"user-{u}"})[1] for u in range(12)} == {"2"}


def predict(port: int, headers: dict) -> tuple[int, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/invocations",
        body=body(0.5),
        headers={"Content-Type": "application/json", **headers},
    )
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    return resp.status, resp.getheader("X-Model-Version", "")
