"""The operators' console: the Django admin for deployments.

Domain fields are read-only; the actions call the same services as the UI and
the API, so they are audited with the admin user and refusals are messages.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission

from audit.models import AuditEvent
from deployments import services
from deployments.models import Deployment, DeploymentEvent, Instance, Revision, Rollout
from tests.deployments.test_ui import deploy, serving, two_revisions

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/deployments/deployment/"


def messages_of(resp) -> list[str]:
    return [str(m) for m in resp.context["messages"]]


def act(client, action: str, *deployments: Deployment, confirm: bool = True):
    data = {"action": action, "_selected_action": [d.pk for d in deployments]}
    if confirm:
        data["post"] = "yes"  # the rollback's confirmation page answered
    return client.post(CHANGELIST, data, follow=True)


@pytest.fixture
def model(registered) -> str:
    return registered(2)


def test_the_changelist_shows_deployments_at_a_glance(admin_client, user, model):
    d = two_revisions(user, model)
    deploy(user, model, "other")
    resp = admin_client.get(CHANGELIST)
    assert resp.status_code == 200
    page = resp.content.decode()
    for expected in ("web", "other", model, "v2", "local", "ready", "r2 (v2)", d.endpoint):
        assert expected in page, expected
    assert admin_client.get(CHANGELIST + "?status__exact=ready").context["cl"].result_count == 1
    assert admin_client.get(CHANGELIST + "?q=oth").context["cl"].result_count == 1


def test_the_rollback_action_rolls_back_and_records_the_admin(
    admin_client, admin_user, user, model
):
    d = two_revisions(user, model)
    resp = act(admin_client, "roll_back", d)
    assert resp.status_code == 200
    assert messages_of(resp) == ["Rolling back: web."]
    d.refresh_from_db()
    assert d.desired_revision.number == 1 and d.status == Deployment.Status.DEPLOYING
    event = AuditEvent.objects.get(action="deployment.rollback", object_id="web")
    assert event.actor == admin_user and event.actor_label == "admin"
    assert event.after["reason"] == "admin rollback" and event.before["revision"] == 2
    assert DeploymentEvent.objects.filter(
        deployment=d, kind="rollback", message="rollback from r2 to r1: admin rollback"
    ).exists()


def test_the_rollback_action_asks_first_and_changes_nothing_until_confirmed(
    admin_client, user, model
):
    d = two_revisions(user, model)
    resp = act(admin_client, "roll_back", d, confirm=False)
    assert resp.status_code == 200
    page = resp.content.decode()
    assert "Roll back 1 deployment to the previous revision" in page
    assert "<strong>web</strong>" in page and 'name="post" value="yes"' in page
    d.refresh_from_db()
    assert d.desired_revision.number == 2
    assert not AuditEvent.objects.filter(action="deployment.rollback").exists()


def test_admin_names_read_right(admin_client):
    page = admin_client.get("/admin/").content.decode()
    assert "Aliases" in page and "API tokens" in page
    assert "Aliass" not in page and "Api tokens" not in page
    from django.contrib import admin

    for model in admin.site._registry:
        singular, plural = model._meta.verbose_name, str(model._meta.verbose_name_plural)
        assert not (plural.endswith("ss") and not singular.endswith("ss")), plural
        assert "api " not in plural.lower() or "API" in plural, plural


def test_a_rollback_without_a_good_earlier_revision_is_an_error_message(admin_client, user, model):
    young = deploy(user, model, "young")
    good = two_revisions(user, model, "good")
    resp = act(admin_client, "roll_back", young, good)
    assert resp.status_code == 200
    assert messages_of(resp) == [
        "Rollback of young refused: there is no earlier revision that served successfully",
        "Rolling back: good.",
    ]
    young.refresh_from_db()
    assert young.desired_revision.number == 1
    assert list(
        AuditEvent.objects.filter(action="deployment.rollback").values_list("object_id", flat=True)
    ) == ["good"]


def test_stop_and_start_actions_call_the_services(admin_client, admin_user, user, model):
    d = two_revisions(user, model)
    assert messages_of(act(admin_client, "stop", d)) == ["Stopping: web."]
    d.refresh_from_db()
    assert d.stopped
    assert AuditEvent.objects.get(action="deployment.stop").actor == admin_user
    act(admin_client, "start", d)
    d.refresh_from_db()
    assert not d.stopped
    assert AuditEvent.objects.get(action="deployment.start").actor == admin_user


def test_the_change_form_does_not_edit_domain_fields(admin_client, user, model):
    d = two_revisions(user, model)
    url = f"{CHANGELIST}{d.pk}/change/"
    resp = admin_client.get(url)
    assert resp.status_code == 200
    page = resp.content.decode()
    for field in (
        "name",
        "replicas",
        "target_version",
        "target_alias",
        "runtime",
        "stopped",
        "status",
    ):
        assert f'name="{field}"' not in page, field
    assert 'name="_save"' not in page
    assert "update: version 2" in page  # the revisions inline
    assert "revision 2:" in page  # the recent events inline
    assert "4242:1" in page  # the instances inline
    assert 'href="/deployments/web/"' in page
    resp = admin_client.post(
        url, {"name": "renamed", "replicas": 9, "status": "failed", "stopped": "on"}
    )
    assert resp.status_code == 403
    d.refresh_from_db()
    assert (d.name, d.replicas, d.status, d.stopped) == ("web", 1, "ready", False)
    assert admin_client.get(f"{CHANGELIST}add/").status_code == 403
    assert admin_client.post(f"{CHANGELIST}{d.pk}/delete/").status_code == 403
    assert Deployment.objects.filter(pk=d.pk, deleted=False).exists()


def test_bulk_delete_is_not_offered(admin_client, user, model):
    two_revisions(user, model)
    actions = admin_client.get(CHANGELIST).context["action_form"].fields["action"].choices
    assert [name for name, _label in actions if name] == [
        "roll_back",
        "stop",
        "start",
        "rollout_promote",
        "rollout_abort",
        "rollout_pause",
        "rollout_resume",
        "promote_shadow",
        "stop_shadow",
    ]


def test_staff_without_the_operate_permission_get_no_actions(
    client, django_user_model, user, model
):
    d = two_revisions(user, model)
    viewer = django_user_model.objects.create_user(username="viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_deployment"))
    client.force_login(viewer)
    resp = client.get(CHANGELIST)
    assert resp.status_code == 200 and "web" in resp.content.decode()
    assert "action_form" not in resp.context or resp.context["action_form"] is None
    client.post(CHANGELIST, {"action": "roll_back", "_selected_action": [d.pk]})
    d.refresh_from_db()
    assert d.desired_revision.number == 2


@pytest.mark.parametrize("model_name", ["revision", "instance", "deploymentevent"])
def test_revisions_instances_and_events_are_read_only(admin_client, user, model, model_name):
    d = two_revisions(user, model)
    services.deployment_stop(deployment=d, actor=user)
    obj = {"revision": Revision, "instance": Instance, "deploymentevent": DeploymentEvent}[
        model_name
    ].objects.first()
    base = f"/admin/deployments/{model_name}/"
    resp = admin_client.get(base)
    assert resp.status_code == 200 and "web" in resp.content.decode()
    assert admin_client.get(f"{base}add/").status_code == 403
    change = admin_client.get(f"{base}{obj.pk}/change/")
    assert change.status_code == 200 and 'name="_save"' not in change.content.decode()
    assert admin_client.post(f"{base}{obj.pk}/change/", {}).status_code == 403
    assert admin_client.post(f"{base}{obj.pk}/delete/").status_code == 403


def test_the_rollout_actions_call_the_rollout_service_and_record_the_admin(
    admin_client, admin_user, user, model
):
    d = deploy(user, model)
    serving(d, 1)
    canary = {"type": "canary", "steps": [{"weight": 10, "seconds": 60}]}
    services.deployment_update(deployment=d, version="2", strategy=canary, actor=user)
    resp = act(admin_client, "rollout_pause", d)
    assert messages_of(resp) == ["Rollout pause requested: web."]
    assert Rollout.objects.get(deployment=d).state == Rollout.State.PAUSED
    event = AuditEvent.objects.get(action="deployment.rollout_pause", object_id="web")
    assert event.actor == admin_user and event.after["reason"] == "admin pause"
    resp = act(admin_client, "rollout_pause", d)  # already paused: refused, as a message
    assert "Rollout pause of web refused" in messages_of(resp)[0]
