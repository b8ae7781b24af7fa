"""Shadow traffic through the API without servers: validation (400s, nothing changes), the
deploy right (403s), audit rows, the desired state in the database, and the report's
statistics on synthetic pairs (deployments/shadow_report.py)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from deployments import shadow
from deployments.models import Deployment, Revision, ShadowPair, ShadowRun
from deployments.shadow_report import compare_pairs, outputs_of, percentile, shadow_window
from registry.models import ModelVersion, RegisteredModel
from tests.conftest import with_roles

pytestmark = pytest.mark.django_db

SPEC = {
    "runtime": "local", "replicas": 1, "cpu": None, "memory_mb": None, "env": {},
    "environment": "auto", "predict_method": None,
}  # fmt: skip


@pytest.fixture
def deployment(db):
    model = RegisteredModel.objects.create(name="churn-model")
    versions = {
        v: ModelVersion.objects.create(model=model, version=v, source=f"models:/churn-model/{v}")
        for v in (1, 2, 3)
    }
    ModelVersion.objects.filter(pk=versions[3].pk).update(status=ModelVersion.Status.ARCHIVED)
    d = Deployment.objects.create(
        name="churn", model=model, target_version=1, runtime="local", port=33990,
        status=Deployment.Status.READY, environment="auto",
    )  # fmt: skip
    rev = Revision.objects.create(
        deployment=d, number=1, model_version=versions[1], spec=SPEC, reason="created",
        state=Revision.State.LIVE, live_at=timezone.now(),
    )  # fmt: skip
    d.desired_revision = d.serving_revision = rev
    d.save()
    return d


@pytest.fixture
def deployer_api(api_as, django_user_model):
    user = django_user_model.objects.create_user("dora", password="x")
    with_roles(user, "deployer")
    return api_as(user)


URL = "/api/v1/deployments/churn"


@pytest.mark.parametrize(
    "body, code",
    [
        ({"shadow": {"version": "2", "fraction": 0}}, "invalid_shadow_fraction"),
        ({"shadow": {"version": "2", "fraction": 1.5}}, "invalid_shadow_fraction"),
        ({"shadow": {"version": "2", "fraction": -0.1}}, "invalid_shadow_fraction"),
        ({"shadow": {"version": "2", "fraction": "0.5"}}, "invalid_shadow_fraction"),
        ({"shadow": {"version": "2", "fraction": True}}, "invalid_shadow_fraction"),
        ({"shadow": {"version": "2"}}, "invalid_shadow_fraction"),
        ({"shadow": {"fraction": 0.5}}, "invalid_shadow"),
        ({"shadow": {"version": "9", "fraction": 0.5}}, "version_not_found"),
        ({"shadow": {"version": "two", "fraction": 0.5}}, "invalid_version"),
        ({"shadow": {"version": 10**30, "fraction": 0.5}}, "invalid_version"),
        ({"shadow": {"version": {"a": 1}, "fraction": 0.5}}, "invalid_version"),
        ({"shadow": {"version": "2", "fraction": 0.5, "extra": 1}}, "invalid_shadow"),
        ({"shadow": "v2"}, "invalid_shadow"),
        # a valid replica count with a bad shadow: the whole request changes nothing
        ({"replicas": 2, "shadow": {"version": "2", "fraction": 2}}, "invalid_shadow_fraction"),
    ],
)
def test_bad_shadow_requests_are_400_and_change_nothing(deployment, deployer_api, body, code):
    audits = AuditEvent.objects.count()
    resp = deployer_api.patch(URL, body)
    assert resp.status_code == 400, resp.content
    assert resp.json()["error"]["code"] == code
    assert not ShadowRun.objects.exists()
    assert Revision.objects.filter(deployment=deployment).count() == 1
    assert Deployment.objects.get(pk=deployment.pk).replicas == 1
    assert AuditEvent.objects.count() == audits


def test_an_archived_version_cannot_be_shadowed(deployment, deployer_api):
    resp = deployer_api.patch(URL, {"shadow": {"version": "3", "fraction": 0.5}})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "version_archived"


def test_shadow_needs_the_deploy_right(deployment, api_as, django_user_model):
    viewer = django_user_model.objects.create_user("vic", password="x")
    with_roles(viewer, "viewer")
    api = api_as(viewer)
    assert api.patch(URL, {"shadow": {"version": "2", "fraction": 0.5}}).status_code == 403
    assert api.post(f"{URL}/shadow/promote").status_code == 403
    assert not ShadowRun.objects.exists()
    assert api.get(URL).json()["shadow"] is None  # readers see the field


def test_starting_changing_and_stopping_a_shadow_is_desired_state_and_audited(
    deployment, deployer_api
):
    resp = deployer_api.patch(URL, {"shadow": {"version": "2", "fraction": 0.25}})
    assert resp.status_code in (200, 202), resp.content
    run = ShadowRun.objects.get(deployment=deployment, state="active")
    assert (run.revision.number, run.revision.model_version.version, run.fraction) == (
        3 - 1,
        2,
        0.25,
    )
    assert run.revision.state == Revision.State.PENDING  # the reconciler starts it
    # It serves no primary traffic: the desired and serving revisions are unchanged.
    d = Deployment.objects.get(pk=deployment.pk)
    assert d.desired_revision.number == d.serving_revision.number == 1
    shown = deployer_api.get(URL).json()["shadow"]
    assert shown["version"] == "2" and shown["fraction"] == 0.25 and not shown["mirroring"]
    assert shown["report"]["agreement"] is None  # no pairs: no verdict, not 1.0
    # Same version again: only the fraction changes (no new revision).
    assert deployer_api.patch(URL, {"shadow": {"version": "2", "fraction": 1}}).status_code < 300
    assert ShadowRun.objects.get(pk=run.pk).fraction == 1.0
    assert Revision.objects.filter(deployment=deployment).count() == 2
    assert deployer_api.patch(URL, {"shadow": None}).status_code < 300
    assert ShadowRun.objects.get(pk=run.pk).state == "stopped"
    assert deployer_api.get(URL).json()["shadow"] is None
    actions = list(
        AuditEvent.objects.filter(object_id="churn").order_by("id").values_list("action", flat=True)
    )
    assert actions == [
        "deployment.shadow_start", "deployment.shadow_start", "deployment.shadow_stop",
    ]  # fmt: skip
    assert deployer_api.post(f"{URL}/shadow/promote").status_code == 409  # nothing to promote


def test_the_mirror_key_names_only_ready_shadow_instances(deployment, deployer_api):
    from deployments.models import Instance

    deployer_api.patch(URL, {"shadow": {"version": "2", "fraction": 0.5}})
    run = ShadowRun.objects.get(state="active")
    assert shadow.shadow_mirror_key(deployment) is None  # nothing started yet
    inst = Instance.objects.create(
        deployment=deployment, revision=run.revision, ordinal=0, runtime="local",
        runtime_id="1:1:x", port=33991, state=Instance.State.STARTING,
    )  # fmt: skip
    assert shadow.shadow_mirror_key(deployment) is None
    Instance.objects.filter(pk=inst.pk).update(state=Instance.State.READY)
    key = shadow.shadow_mirror_key(deployment)
    assert key["backends"] == [inst.address] and key["fraction"] == 0.5
    assert key["revision"] == run.revision.number
    assert run.revision_id in shadow.shadow_revision_ids(deployment)


def test_promoting_an_idle_priority_shadow_rolls_out_a_fresh_revision_at_normal_priority(
    deployment, deployer_api
):
    deployer_api.patch(URL, {"shadow": {"version": "2", "fraction": 0.5}})
    run = ShadowRun.objects.get(state="active")
    assert run.revision.spec["priority"] == "idle"  # CONTROLPLANE_SHADOW_IDLE_PRIORITY's default
    resp = deployer_api.post(f"{URL}/shadow/promote")
    assert resp.status_code == 202, resp.content
    d = Deployment.objects.get(pk=deployment.pk)
    assert d.desired_revision_id != run.revision_id and d.serving_revision.number == 1
    assert d.desired_revision.model_version_id == run.revision.model_version_id
    assert "priority" not in d.desired_revision.spec
    assert d.target_version == 2 and d.status == Deployment.Status.DEPLOYING
    assert ShadowRun.objects.get(pk=run.pk).state == "promoted"
    assert AuditEvent.objects.filter(action="deployment.shadow_promote").count() == 1


def test_promoting_a_normal_priority_shadow_makes_it_the_desired_revision(
    deployment, deployer_api, settings
):
    settings.CONTROLPLANE_SHADOW_IDLE_PRIORITY = False
    deployer_api.patch(URL, {"shadow": {"version": "2", "fraction": 0.5}})
    run = ShadowRun.objects.get(state="active")
    assert "priority" not in run.revision.spec
    resp = deployer_api.post(f"{URL}/shadow/promote")
    assert resp.status_code == 202, resp.content
    d = Deployment.objects.get(pk=deployment.pk)
    assert d.desired_revision_id == run.revision_id and d.serving_revision.number == 1
    assert d.target_version == 2 and d.status == Deployment.Status.DEPLOYING


# --- the report's statistics on synthetic pairs -------------------------------------------


def _pair(p, c, *, ps=200, cs=200, pms=1.0, cms=2.0):
    return {
        "primary_status": ps, "primary_ms": pms, "primary_body": json.dumps(p),
        "candidate_status": cs, "candidate_ms": cms, "candidate_body": json.dumps(c),
    }  # fmt: skip


def test_agreement_counts_identical_labels_and_numbers_within_tolerance():
    pairs = [
        _pair({"predictions": [1, 0]}, {"predictions": [1, 0]}),
        _pair({"predictions": [1, 0]}, {"predictions": [1, 1]}),  # one label differs
        _pair({"predictions": [0.5]}, {"predictions": [0.5 + 1e-9]}),  # within tolerance
        _pair({"predictions": [0.5]}, {"predictions": [0.75]}),
        _pair({"predictions": [1]}, {"error": "boom"}, cs=500),  # an error: not compared
    ]
    report = compare_pairs(pairs)
    assert (report["pairs"], report["compared"], report["agreeing"]) == (5, 4, 2)
    assert report["agreement"] == 0.5
    out = report["outputs"]["predictions"]
    assert out["max_abs_diff"] == pytest.approx(1.0) and out["rate"] == 0.5  # the 0 vs 1 label
    assert report["candidate"]["errors"] == 1 and report["candidate"]["error_rate"] == 0.2
    assert report["primary"]["error_rate"] == 0.0


def test_agreement_is_per_output_for_columns_and_v2_outputs():
    rows = _pair(
        {"predictions": [{"label": "a", "score": 0.9}, {"label": "b", "score": 0.2}]},
        {"predictions": [{"label": "a", "score": 0.8}, {"label": "b", "score": 0.2}]},
    )
    v2 = _pair(
        {"outputs": [{"name": "y", "data": [1, 2]}, {"name": "p", "data": [0.1, 0.2]}]},
        {"outputs": [{"name": "y", "data": [1, 2]}, {"name": "p", "data": [0.1, 0.2]}]},
    )
    report = compare_pairs([rows, v2])
    assert report["outputs"]["label"]["rate"] == 1.0
    assert report["outputs"]["score"]["rate"] == 0.0
    assert report["outputs"]["score"]["max_abs_diff"] == pytest.approx(0.1)
    assert report["outputs"]["y"]["rate"] == report["outputs"]["p"]["rate"] == 1.0
    assert report["agreement"] == 0.5
    assert outputs_of("not json") is None
    assert outputs_of("[1, 2]") == {"predictions": [1, 2]}


def test_latency_percentiles_are_nearest_rank_and_empty_is_none():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (
        50.0, 95.0, 99.0,
    )  # fmt: skip
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
    report = compare_pairs([])
    assert report["agreement"] is None and report["primary"]["error_rate"] is None
    assert report["candidate"]["latency_ms"]["p50"] is None


def test_shadow_window_gives_the_analysis_both_variants_of_the_same_requests(deployment):
    rev = Revision.objects.create(
        deployment=deployment, number=2,
        model_version=ModelVersion.objects.get(model=deployment.model, version=2),
        spec=SPEC, reason="shadow",
    )  # fmt: skip
    now = timezone.now()
    run = ShadowRun.objects.create(
        deployment=deployment, revision=rev, fraction=1.0, mirroring_since=now - timedelta(minutes=5),
        counters={"e1": {"sent": 4, "dropped": 1, "errors": 1}},
    )  # fmt: skip
    for i, (c, cs, cms) in enumerate([(1, 200, 3.0), (0, 200, 5.0), (1, 500, 9.0), (1, 200, 4.0)]):
        ShadowPair.objects.create(
            run=run, seq=i + 1, ts=now - timedelta(minutes=4 - i),
            primary_status=200, primary_ms=1.0 + i, primary_body='{"predictions": [1]}',
            candidate_status=cs, candidate_ms=cms, candidate_body=json.dumps({"predictions": [c]}),
        )  # fmt: skip
    window = shadow_window(deployment, now - timedelta(minutes=10), now)
    assert window["run"]["revision"] == 2
    assert window["baseline"]["requests"] == window["candidate"]["requests"] == 4
    assert (window["baseline"]["errors"], window["candidate"]["errors"]) == (0, 1)
    assert window["baseline"]["latencies_ms"] == [1.0, 2.0, 3.0, 4.0]
    assert window["candidate"]["latency_ms"]["p50"] == 4.0
    assert window["pairs"][1] == {
        "ts": window["pairs"][1]["ts"], "baseline": {"predictions": [1]},
        "candidate": {"predictions": [0]},
    }  # fmt: skip
    assert window["comparison"]["agreement"] == pytest.approx(2 / 3)
    assert window["mirror"]["sent"] == 4 and window["mirror"]["dropped"] == 1
    # a window before any mirroring: no run, no data
    early = shadow_window(deployment, now - timedelta(hours=2), now - timedelta(hours=1))
    assert early["run"] is None and early["baseline"]["requests"] == 0


def test_the_shadow_panel_starts_shows_and_stops_a_shadow(deployment, client, django_user_model):
    from django.urls import reverse

    user = with_roles(django_user_model.objects.create_user("ui", password="x"), "deployer")
    client.force_login(user)
    page = reverse("deployments:deployment-detail", kwargs={"name": "churn"})
    action = reverse("deployments:deployment-shadow", kwargs={"name": "churn"})
    html = client.get(page).content.decode()
    assert 'id="shadow-start-form"' in html and "No shadow." in html
    resp = client.post(
        action, {"action": "start", "version": "2", "fraction": "150", "percent": "1"}
    )
    assert resp.status_code == 302 and not ShadowRun.objects.exists()  # refused: > 100 %
    client.post(action, {"action": "start", "version": "2", "fraction": "25", "percent": "1"})
    run = ShadowRun.objects.get(state="active")
    assert run.fraction == 0.25
    ShadowPair.objects.create(
        run=run, seq=1, ts=timezone.now(), primary_status=200, primary_ms=1.5,
        primary_body='{"predictions": [1]}', candidate_status=200, candidate_ms=2.5,
        candidate_body='{"predictions": [0]}',
    )  # fmt: skip
    html = client.get(page).content.decode()
    assert 'id="shadow-promote"' in html and "Mirroring <strong>25 %</strong>" in html
    assert 'id="shadow-agreement"' in html and ">0.000</p>" in html
    client.post(action, {"action": "stop"})
    assert ShadowRun.objects.get(pk=run.pk).state == "stopped"
    assert "was stopped" in client.get(page).content.decode()


def test_the_admin_promotes_and_stops_shadows_through_the_same_services(
    deployment, admin_client, django_user_model
):
    from django.urls import reverse

    changelist = reverse("admin:deployments_deployment_changelist")
    admin = django_user_model.objects.get(username="admin")
    run = shadow.shadow_start(deployment=deployment, version="2", fraction=0.5, actor=admin)
    resp = admin_client.post(
        changelist, {"action": "promote_shadow", "_selected_action": [deployment.pk]}
    )
    assert resp.status_code == 302
    assert ShadowRun.objects.get(pk=run.pk).state == "promoted"
    desired = Deployment.objects.get(pk=deployment.pk).desired_revision
    # A fresh revision of the shadow's version (the shadow ran at idle priority).
    assert desired.model_version_id == run.revision.model_version_id
    assert desired.number > run.revision.number
    resp = admin_client.post(
        changelist, {"action": "stop_shadow", "_selected_action": [deployment.pk]}
    )
    assert resp.status_code == 302  # nothing active any more: nothing changes
    assert AuditEvent.objects.filter(action="deployment.shadow_promote").count() == 1
