"""The strategy field and the rollout control actions through the API (no servers: the
reconciler is not run; a deployment is given a serving revision directly)."""

from __future__ import annotations

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from deployments.models import Deployment, Revision, Rollout
from tests.conftest import with_roles

pytestmark = pytest.mark.django_db

CANARY = {
    "type": "canary",
    "steps": [{"weight": 10, "seconds": 120}, {"weight": 50, "seconds": 120}],
}


@pytest.fixture
def serving(api, registered):
    """A deployment 'svc' with r1 (v1) serving, and version 2 registered."""
    name = registered(2)
    resp = api.post(
        "/api/v1/deployments", {"name": "svc", "model": name, "version": "1", "runtime": "local"}
    )
    assert resp.status_code == 202, resp.content
    d = Deployment.objects.get(name="svc")
    Revision.objects.filter(pk=d.desired_revision_id).update(
        state=Revision.State.LIVE, live_at=timezone.now()
    )
    Deployment.objects.filter(pk=d.pk).update(
        serving_revision_id=d.desired_revision_id, status=Deployment.Status.READY
    )
    return d


BAD = [
    ({"type": "blue-green"}, "strategy.type must be one of"),
    ({"type": "canary"}, "strategy.steps must be a list"),
    ({"type": "canary", "steps": [{"weight": 0, "seconds": 10}]}, "from 1 to 99"),
    ({"type": "canary", "steps": [{"weight": 100, "seconds": 10}]}, "from 1 to 99"),
    (
        {"type": "canary", "steps": [{"weight": 50, "seconds": 10}, {"weight": 20, "seconds": 10}]},
        "ascending",
    ),
    ({"type": "canary", "steps": [{"weight": 10, "seconds": 0}]}, "seconds must be"),
    ({"type": "canary", "steps": [{"weight": 10, "seconds": 1.5}]}, "seconds must be"),
    ({"type": "canary", "steps": [{"weight": 10}]}, "must be {"),
    ({**CANARY, "analysis": {"max_psi": -1}}, "must not be negative"),
    ({**CANARY, "analysis": {"nope": 1}}, "unknown analysis setting"),
    ({**CANARY, "extra": 1}, "unknown strategy field"),
    ("canary", "strategy must be an object"),
]


def test_a_bad_strategy_is_a_400_and_changes_nothing(api, serving):
    before = AuditEvent.objects.count()
    for strategy, message in BAD:
        resp = api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": strategy})
        assert resp.status_code == 400, (strategy, resp.content)
        assert resp.json()["error"]["code"] == "invalid_strategy"
        assert message in resp.json()["error"]["message"], strategy
    d = Deployment.objects.get(pk=serving.pk)
    assert d.desired_revision_id == serving.desired_revision_id and d.strategy == {}
    assert AuditEvent.objects.count() == before and not Rollout.objects.exists()


def test_an_update_with_a_canary_strategy_records_a_rollout_shown_on_the_deployment(api, serving):
    resp = api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    assert resp.status_code == 202, resp.content
    got = api.get("/api/v1/deployments/svc").json()
    assert got["strategy"]["type"] == "canary"
    assert got["rollout"]["strategy"]["steps"] == CANARY["steps"]
    assert (got["rollout"]["revision"], got["rollout"]["baseline"]) == (2, 1)
    assert (got["rollout"]["state"], got["rollout"]["step"]) == ("running", -1)
    assert got["rollout"]["checks"] == [] and got["rollout"]["weights"] == {}
    audit = AuditEvent.objects.filter(action="deployment.update", object_id="svc").latest("id")
    assert audit.after["strategy"]["type"] == "canary"
    # The strategy is the deployment's: a later update (or an alias move) uses it too, and a
    # new revision supersedes the rollout in progress.
    api.patch("/api/v1/deployments/svc", {"version": "2", "replicas": 2})
    states = dict(Rollout.objects.values_list("revision__number", "state"))
    assert states == {2: "superseded", 3: "running"}


def test_a_first_deployment_and_the_rolling_strategy_make_no_rollout(api, registered):
    name = registered(2)
    resp = api.post(
        "/api/v1/deployments", {"name": "fresh", "model": name, "version": "1", "strategy": CANARY}
    )
    assert resp.status_code == 202, resp.content
    assert not Rollout.objects.exists()  # nothing serves yet: there is no baseline
    resp = api.patch("/api/v1/deployments/fresh", {"strategy": {"type": "rolling"}})
    assert resp.status_code in (200, 202) and resp.json()["strategy"] == {"type": "rolling"}


def test_control_actions_move_the_rollout_and_are_audited(api, serving):
    api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    url = "/api/v1/deployments/svc/rollout/"
    resp = api.post(url + "pause", {"reason": "looking at it"})
    assert resp.status_code == 202, resp.content
    assert resp.json()["rollout"]["state"] == "paused"
    again = api.post(url + "pause", {})
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"
    assert api.post(url + "resume", {}).json()["rollout"]["state"] == "running"
    assert api.post(url + "promote", {}).json()["rollout"]["state"] == "promoting"
    assert api.post(url + "abort", {}).json()["rollout"]["state"] == "aborting"
    actions = list(
        AuditEvent.objects.filter(object_id="svc", action__startswith="deployment.rollout_")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == [
        "deployment.rollout_pause",
        "deployment.rollout_resume",
        "deployment.rollout_promote",
        "deployment.rollout_abort",
    ]
    bad = api.post(url + "explode", {})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_action"
    assert api.post("/api/v1/deployments/nothing/rollout/pause", {}).status_code == 404


def test_no_rollout_is_a_409_and_a_viewer_is_refused(api, api_as, serving, django_user_model):
    resp = api.post("/api/v1/deployments/svc/rollout/promote", {})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "no_rollout"
    api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    viewer = with_roles(django_user_model.objects.create_user("watcher"), "viewer")
    resp = api_as(viewer).post("/api/v1/deployments/svc/rollout/abort", {})
    assert resp.status_code == 403
    assert not AuditEvent.objects.filter(action__startswith="deployment.rollout_").exists()
    assert Rollout.objects.get().state == "running"


def test_a_rollback_during_a_canary_cancels_it_and_wants_the_baseline(api, serving):
    api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    resp = api.post("/api/v1/deployments/svc/rollback", {})
    assert resp.status_code == 202, resp.content
    d = Deployment.objects.select_related("desired_revision").get(pk=serving.pk)
    assert d.desired_revision.number == 1
    ro = Rollout.objects.get()
    assert ro.state == "aborted" and "rollback to r1" in ro.reason


def test_a_bad_split_is_a_400_or_409_and_changes_nothing(api, serving):
    url = "/api/v1/deployments/svc"
    cases = [
        ({"variants": [{"version": "1", "weight": 50}]}, 400, "invalid_split"),
        (
            {"variants": [{"version": "1", "weight": 60}, {"version": "2", "weight": 50}]},
            400,
            "invalid_split",
        ),
        (
            {"variants": [{"version": "1", "weight": 50}, {"version": "1", "weight": 50}]},
            400,
            "invalid_split",
        ),
        (
            {
                "variants": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
                "sticky": "cookie:x",
            },
            400,
            "invalid_split",
        ),
        (
            {
                "variants": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
                "replicas": 2,
            },
            400,
            "invalid_split",
        ),
        (
            {"variants": [{"version": "2", "weight": 50}, {"version": "9", "weight": 50}]},
            409,
            "baseline_not_a_variant",
        ),
        (
            {"variants": [{"version": "1", "weight": 50}, {"version": "9", "weight": 50}]},
            404,
            "version_not_found",
        ),
    ]
    for payload, code, error in cases:
        resp = api.patch(url, payload)
        assert (resp.status_code, resp.json()["error"]["code"]) == (code, error), payload
    assert Deployment.objects.get(pk=serving.pk).desired_revision_id == serving.desired_revision_id
    assert not Rollout.objects.exists()
    resp = api.patch(
        url,
        {
            "variants": [{"version": "1", "weight": 70}, {"version": "2", "weight": 30}],
            "sticky": "header:X-User-Id",
        },
    )
    assert resp.status_code == 202, resp.content
    rollout = resp.json()["rollout"]
    assert rollout["strategy"]["type"] == "split" and rollout["strategy"]["sticky"] == "X-User-Id"
    assert [v["weight"] for v in rollout["strategy"]["variants"]] == [70, 30]
    assert AuditEvent.objects.filter(action="deployment.split", object_id="svc").exists()


def test_the_deployment_page_shows_the_rollout_panel_with_its_buttons(api, client, user, serving):
    api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    client.force_login(user)
    page = client.get("/deployments/svc/").content.decode()
    assert 'id="dep-rollout"' in page and "10 % for 120 s" in page
    for action in ("pause", "promote", "abort"):
        assert f"/deployments/svc/rollout/{action}" in page
    resp = client.post("/deployments/svc/rollout/pause")
    assert resp.status_code == 302
    assert Rollout.objects.get().state == "paused"
    assert "/deployments/svc/rollout/resume" in client.get("/deployments/svc/").content.decode()


def test_two_concurrent_advances_of_one_step_land_once(api, serving):
    """Two reconciler passes that read the rollout at the same step both try to start the next
    one: compare-and-swap lets the first write land and refuses the second, which changes
    nothing (its decision is not appended over the first's)."""
    from deployments import canary

    api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    first, second = Rollout.objects.get(), Rollout.objects.get()  # what each pass read
    assert first.step == second.step == -1
    canary._save(first, step=0, step_started_at=timezone.now(), weights={"r1": 90, "r2": 10})
    with pytest.raises(canary.StaleRollout):
        canary._save(second, step=0, step_started_at=timezone.now(), weights={"r1": 90, "r2": 10})
    with pytest.raises(canary.StaleRollout):  # nor can it record a decision on the stale copy
        canary._decide(second, "wait", "too few samples", [])
    row = Rollout.objects.get()
    assert (row.step, row.decision, row.decisions) == (0, "", [])
    assert row.updated_at == first.updated_at
    canary._decide(first, "wait", "too few samples", [])  # the winner goes on
    assert Rollout.objects.get().decision == "wait"


def test_a_control_action_between_a_pass_reading_and_writing_wins(api, serving):
    """An abort posted while a pass is deciding to promote: the pass's write is refused (it
    read "running"), the abort stays for the next pass to carry out."""
    from deployments import canary

    api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    seen = Rollout.objects.get()
    resp = api.post("/api/v1/deployments/svc/rollout/abort", {"reason": "bad answers"})
    assert resp.status_code == 202, resp.content
    with pytest.raises(canary.StaleRollout):
        canary._save(seen, state=Rollout.State.PROMOTED, weights={"r2": 100})
    assert Rollout.objects.get().state == "aborting"


def test_a_rollback_ends_a_rollout_a_pass_wrote_meanwhile_without_losing_its_decision(api, serving):
    from deployments import canary, rollouts

    api.patch("/api/v1/deployments/svc", {"version": "2", "strategy": CANARY})
    stale = Rollout.objects.get()
    canary._decide(Rollout.objects.get(), "wait", "too few samples", [])  # a pass meanwhile
    rollouts._finish(stale, Rollout.State.ABORTED, "rollback to r1")
    row = Rollout.objects.get()
    assert row.state == "aborted"
    assert [e["decision"] for e in row.decisions] == ["wait", "aborted"]
