"""The server-rendered UI, through the views, logged in, against a real MLflow store."""

from __future__ import annotations

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from accounts.models import ApiToken
from audit.models import AuditEvent
from registry import services
from registry.models import (
    Alias,
    AliasMove,
    ApprovalPolicy,
    ModelVersion,
    PromotionRequest,
    RegisteredModel,
)

pytestmark = pytest.mark.django_db


def text(resp) -> str:
    return resp.content.decode()


def messages_of(resp) -> list[str]:
    return [str(m) for m in resp.context["messages"]] if resp.context else []


def register(user, name: str, source: str) -> ModelVersion:
    return services.model_version_register(
        model_name=name, source=source, actor=user, create_model=True
    )


@pytest.fixture
def v1(user, model_name, run_with) -> ModelVersion:
    return register(
        user,
        model_name,
        run_with(metrics={"accuracy": 0.875, "f1": 0.81}, params={"C": "0.5", "penalty": "l2"}),
    )


# --- access ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/",
        "/models/new",
        "/models/m/",
        "/models/m/compare?versions=1,2",
        "/models/m/history",
        "/models/m/promote",
        "/models/m/versions/1/",
        "/models/m/versions/1/archive",
        "/models/m/versions/1/delete",
        "/approvals/",
        "/tokens/",
        "/tokens/1/revoke",
        "/audit/",
    ],
)
def test_anonymous_users_are_sent_to_login_from_every_page(client, url):
    resp = client.get(url)
    assert resp.status_code == 302
    assert resp.url.startswith(reverse("login") + "?next=")


def test_anonymous_posts_change_nothing(client, v1):
    resp = client.post(f"/models/{v1.model.name}/versions/1/delete")
    assert resp.status_code == 302 and resp.url.startswith("/login/")
    assert ModelVersion.objects.filter(pk=v1.pk).exists()


def test_login_page_renders_a_form_with_csrf(client):
    resp = client.get("/login/")
    assert resp.status_code == 200
    assert 'name="csrfmiddlewaretoken"' in text(resp)
    assert 'name="password"' in text(resp)


def test_logout_is_a_post_form_in_the_nav(client_logged_in):
    body = text(client_logged_in.get("/"))
    assert re.search(
        r'<form method="post" action="/logout/"[^>]*>\s*<input type="hidden" name="csrfmiddlewaretoken"',
        body,
    )


# --- list and search ---------------------------------------------------------------------


def test_model_list_shows_models_and_searches_name_description_and_tag(client_logged_in, user):
    services.registered_model_create(
        name="churn-ui-a", description="predicts churn", tags={"team": "growth"}, actor=user
    )
    services.registered_model_create(
        name="fraud-ui-b", description="card fraud", tags={"team": "risk"}, actor=user
    )

    body = text(client_logged_in.get("/"))
    assert "churn-ui-a" in body and "fraud-ui-b" in body and "predicts churn" in body

    body = text(client_logged_in.get("/", {"q": "FRAUD"}))
    assert "fraud-ui-b" in body and "churn-ui-a" not in body
    body = text(client_logged_in.get("/", {"q": "predicts"}))
    assert "churn-ui-a" in body and "fraud-ui-b" not in body
    body = text(client_logged_in.get("/", {"tag": "team=risk"}))
    assert "fraud-ui-b" in body and "churn-ui-a" not in body
    body = text(client_logged_in.get("/", {"q": "nothing-like-this"}))
    assert "No model matches" in body


@pytest.mark.parametrize(
    "tag",
    ["=x", "team=", "a__b", "x" * 500, "é=ü", 'a"b=c', "a.b", "$", "[0]=1", "a b=c", "a\\b", "__"],
)
def test_odd_tag_filters_never_fail(client_logged_in, tag):
    assert client_logged_in.get("/", {"tag": tag}).status_code == 200


def test_model_list_queries_do_not_grow_with_the_number_of_models(client_logged_in, user):
    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client_logged_in.get("/").status_code == 200
        return len(ctx.captured_queries)

    RegisteredModel.objects.create(name="q-one")
    few = count()
    for i in range(6):
        RegisteredModel.objects.create(name=f"q-more-{i}")
    assert count() == few


def test_model_list_is_paginated(client_logged_in):
    RegisteredModel.objects.bulk_create([RegisteredModel(name=f"page-{i:02d}") for i in range(30)])
    first = text(client_logged_in.get("/"))
    assert "page-00" in first and "page-29" not in first and "Page 1 of 2" in first
    second = text(client_logged_in.get("/", {"page": 2}))
    assert "page-29" in second and "page-00" not in second


# --- upload ------------------------------------------------------------------------------


def test_uploading_a_zip_creates_the_model_and_version_and_redirects_to_it(
    client_logged_in, model_name, model_zip
):
    resp = client_logged_in.post(
        "/models/new",
        {
            "kind": "upload",
            "upload-model_name": model_name,
            "upload-artifact": SimpleUploadedFile(
                "model.zip", model_zip, content_type="application/zip"
            ),
            "upload-description": "first cut",
        },
    )
    mv = ModelVersion.objects.get(model__name=model_name)
    assert resp.status_code == 302
    assert resp.url == f"/models/{model_name}/versions/{mv.version}/"
    assert mv.description == "first cut" and mv.created_by.username == "alice"
    page = client_logged_in.get(resp.url)
    assert f"Registered {model_name} version 1." in text(page)
    assert "first cut" in text(page)


def test_uploading_to_an_existing_model_adds_a_version(client_logged_in, v1, model_zip):
    resp = client_logged_in.post(
        "/models/new",
        {
            "kind": "upload",
            "upload-model_name": v1.model.name,
            "upload-artifact": SimpleUploadedFile("model.zip", model_zip),
        },
    )
    assert resp.status_code == 302 and resp.url.endswith("/versions/2/")
    assert v1.model.versions.count() == 2


def test_a_bad_upload_shows_the_error_and_registers_nothing(client_logged_in, model_name):
    resp = client_logged_in.post(
        "/models/new",
        {
            "kind": "upload",
            "upload-model_name": model_name,
            "upload-artifact": SimpleUploadedFile("model.zip", b"this is not a zip"),
        },
    )
    assert resp.status_code == 400
    assert "not a valid zip archive" in text(resp)
    assert not ModelVersion.objects.filter(model__name=model_name).exists()


def test_an_invalid_model_name_is_a_form_error(client_logged_in, model_zip):
    resp = client_logged_in.post(
        "/models/new",
        {
            "kind": "upload",
            "upload-model_name": "../etc",
            "upload-artifact": SimpleUploadedFile("model.zip", model_zip),
        },
    )
    assert resp.status_code == 400
    assert "model name must be" in text(resp)
    assert not RegisteredModel.objects.exists()


def test_registering_from_an_mlflow_uri(client_logged_in, model_name, logged_run):
    resp = client_logged_in.post(
        "/models/new",
        {
            "kind": "source",
            "source-model_name": model_name,
            "source-source": logged_run["source"],
        },
    )
    assert resp.status_code == 302 and resp.url == f"/models/{model_name}/versions/1/"
    assert ModelVersion.objects.get(model__name=model_name).run_id == logged_run["run_id"]


def test_registering_from_a_bad_uri_is_an_error_not_a_500(client_logged_in, model_name):
    resp = client_logged_in.post(
        "/models/new",
        {
            "kind": "source",
            "source-model_name": model_name,
            "source-source": "file:///etc/passwd",
        },
    )
    assert resp.status_code == 400
    assert "is not a runs:/" in text(resp)
    assert not ModelVersion.objects.exists()


# --- model and version pages -------------------------------------------------------------


def test_version_page_shows_metrics_params_signature_example_and_requirements(client_logged_in, v1):
    resp = client_logged_in.get(f"/models/{v1.model.name}/versions/1/")
    body = text(resp)
    assert resp.status_code == 200
    assert ">accuracy<" in body and "0.875" in body and "0.81" in body
    assert ">penalty<" in body and ">l2<" in body
    assert re.search(r"<h3>Inputs</h3>.*f0.*f19.*<h3>Outputs</h3>", body, re.S)
    assert "&quot;f0&quot;" in body or '"f0"' in body  # the input example, as JSON
    assert "scikit-learn==" in body
    assert v1.source in body
    assert "Archive…" in body and "Delete…" in body and "Promote…" in body


def test_model_page_lists_versions_with_status_aliases_and_key_metrics(
    client_logged_in, user, v1, run_with
):
    register(user, v1.model.name, run_with(metrics={"accuracy": 0.9}))
    services.alias_promote(model=v1.model, alias="staging", version=1, reason="ok", actor=user)
    body = text(client_logged_in.get(f"/models/{v1.model.name}/"))
    assert ">v1<" in body and ">v2<" in body
    assert "@staging" in body
    assert "0.875" in body and "0.9<" in body
    assert 'name="versions" value="2"' in body  # compare checkboxes


def test_unknown_model_or_version_is_a_404_page(client_logged_in, v1):
    assert client_logged_in.get("/models/nope/").status_code == 404
    resp = client_logged_in.get(f"/models/{v1.model.name}/versions/99/")
    assert resp.status_code == 404 and "not found" in text(resp)
    assert client_logged_in.get(f"/models/{v1.model.name}/versions/abc/").status_code == 404


# --- promotion ---------------------------------------------------------------------------


def test_promoting_with_a_reason_moves_the_alias_and_appears_in_history(client_logged_in, v1):
    url = f"/models/{v1.model.name}/promote"
    form = {"alias": "staging", "version": "1", "reason": "beats the baseline"}
    review = client_logged_in.post(url, form)
    assert review.status_code == 200 and "Confirm promotion" in text(review)
    assert "moves immediately" in text(review)
    assert not Alias.objects.filter(model=v1.model).exists()  # nothing until confirmed

    resp = client_logged_in.post(url, {**form, "confirm": "yes"})
    assert resp.status_code == 302
    assert Alias.objects.get(model=v1.model, name="staging").version == v1
    history = text(client_logged_in.get(f"/models/{v1.model.name}/history"))
    assert "beats the baseline" in history and "@staging" in history and "alice" in history


def test_promoting_without_a_reason_shows_an_error_and_changes_nothing(client_logged_in, v1):
    url = f"/models/{v1.model.name}/promote"
    for extra in ({}, {"confirm": "yes"}):
        resp = client_logged_in.post(
            url, {"alias": "production", "version": "1", "reason": "   ", **extra}
        )
        assert resp.status_code == 400
        assert "This field is required" in text(resp)
    assert not Alias.objects.exists() and not AliasMove.objects.exists()


def test_a_refused_promotion_shows_the_service_error(client_logged_in, user, v1):
    services.model_version_archive(mv=v1, actor=user)
    resp = client_logged_in.post(
        f"/models/{v1.model.name}/promote",
        {"alias": "staging", "version": "1", "reason": "x", "confirm": "yes"},
    )
    assert resp.status_code == 400
    assert "is archived; restore it before promoting" in text(resp)
    assert not Alias.objects.exists()


def test_approval_flow_through_the_inbox(client, user, approver, v1):
    ApprovalPolicy.objects.create(alias="production")
    client.force_login(user)
    url = f"/models/{v1.model.name}/promote"
    form = {"alias": "production", "version": "1", "reason": "quarterly release"}
    assert "Approval required" in text(client.post(url, form))
    resp = client.post(url, {**form, "confirm": "yes"}, follow=True)
    assert "waiting for approval" in text(resp)
    request = PromotionRequest.objects.get()
    assert not Alias.objects.exists()

    inbox = text(client.get("/approvals/"))
    assert "quarterly release" in inbox and f'id="request-{request.pk}"' in inbox
    assert "deciding them needs the approver role" in inbox  # alice is no approver
    resp = client.post(f"/approvals/{request.pk}/decide", {"decision": "approve"}, follow=True)
    assert "needs the approver role" in text(resp)
    assert not Alias.objects.exists()

    # An approver cannot approve their own request either.
    client.force_login(approver)
    ApprovalPolicy.objects.create(alias="canary", model=v1.model)
    services.alias_promote(model=v1.model, alias="canary", version=1, reason="mine", actor=approver)
    own = PromotionRequest.objects.get(requested_by=approver)
    resp = client.post(f"/approvals/{own.pk}/decide", {"decision": "approve"}, follow=True)
    assert "someone other than its requester" in text(resp)
    assert PromotionRequest.objects.get(pk=own.pk).status == "pending"

    resp = client.post(
        f"/approvals/{request.pk}/decide", {"decision": "approve", "comment": "lgtm"}, follow=True
    )
    assert "now points at version 1" in text(resp)
    assert Alias.objects.get(model=v1.model, name="production").version == v1
    history = text(client.get(f"/models/{v1.model.name}/history"))
    assert re.search(r"quarterly release.*?bob", history, re.S)  # approved by bob
    assert "lgtm" in text(client.get("/approvals/"))


def test_an_approver_can_reject_with_a_comment(client, user, approver, v1):
    ApprovalPolicy.objects.create(alias="production")
    outcome = services.alias_promote(
        model=v1.model, alias="production", version=1, reason="r", actor=user
    )
    client.force_login(approver)
    resp = client.post(
        f"/approvals/{outcome.request.pk}/decide",
        {"decision": "reject", "comment": "not yet"},
        follow=True,
    )
    assert "Rejected request" in text(resp)
    request = PromotionRequest.objects.get()
    assert request.status == "rejected" and request.decision_comment == "not yet"
    assert not Alias.objects.exists()


def test_deciding_needs_post_and_a_known_decision(client, approver):
    client.force_login(approver)
    assert client.get("/approvals/1/decide").status_code == 405
    resp = client.post("/approvals/1/decide", {"decision": "maybe"}, follow=True)
    assert "Choose approve or reject" in text(resp)
    resp = client.post("/approvals/999/decide", {"decision": "approve"}, follow=True)
    assert "promotion request not found" in text(resp)


def test_nav_shows_the_pending_approval_count(client_logged_in, user, v1):
    ApprovalPolicy.objects.create(alias="production")
    services.alias_promote(model=v1.model, alias="production", version=1, reason="r", actor=user)
    body = text(client_logged_in.get("/"))
    assert re.search(r'Approvals <span class="count"[^>]*>1</span>', body)


# --- compare -----------------------------------------------------------------------------


def test_compare_shows_versions_side_by_side_and_highlights_differences(
    client_logged_in, user, v1, run_with
):
    register(
        user,
        v1.model.name,
        run_with(metrics={"accuracy": 0.92, "f1": 0.81}, params={"C": "0.5", "penalty": "l1"}),
    )
    body = text(client_logged_in.get(f"/models/{v1.model.name}/compare", {"versions": "1,2"}))
    rows = {
        key: cls
        for cls, key in re.findall(
            r'<tr class="(differs|same)">\s*<td class="mono">([^<]+)</td>', body
        )
    }
    assert rows["accuracy"] == "differs" and rows["penalty"] == "differs"
    assert rows["f1"] == "same" and rows["C"] == "same"
    assert rows["inputs.f0"] == "same"
    assert "0.875" in body and "0.92" in body

    only = text(
        client_logged_in.get(f"/models/{v1.model.name}/compare?versions=1&versions=2&diff=1")
    )
    assert ">accuracy<" in only and ">f1<" not in only


def test_compare_with_bad_versions_shows_the_error(client_logged_in, v1):
    resp = client_logged_in.get(f"/models/{v1.model.name}/compare", {"versions": "1"})
    assert resp.status_code == 400 and "at least two different versions" in text(resp)
    resp = client_logged_in.get(f"/models/{v1.model.name}/compare", {"versions": "1,7"})
    assert resp.status_code == 404 and "version(s) 7" in text(resp)
    resp = client_logged_in.get(f"/models/{v1.model.name}/compare", {"versions": "1,x"})
    assert resp.status_code == 400


# --- archive, restore, delete -----------------------------------------------------------


def test_archive_needs_a_confirmed_post_and_restore_undoes_it(client_logged_in, v1):
    url = f"/models/{v1.model.name}/versions/1/archive"
    page = client_logged_in.get(url)
    assert page.status_code == 200 and "Yes, archive v1" in text(page)
    assert ModelVersion.objects.get(pk=v1.pk).status == "ready"

    resp = client_logged_in.post(url, {"action": "archive"})
    assert resp.status_code == 302
    assert ModelVersion.objects.get(pk=v1.pk).status == "archived"
    assert "Yes, restore v1" in text(client_logged_in.get(url))
    client_logged_in.post(url, {"action": "restore"})
    assert ModelVersion.objects.get(pk=v1.pk).status == "ready"


def test_delete_needs_a_confirmed_post(client_logged_in, v1):
    url = f"/models/{v1.model.name}/versions/1/delete"
    page = client_logged_in.get(url)
    assert "Yes, delete v1" in text(page) and "cannot be undone" in text(page)
    assert ModelVersion.objects.filter(pk=v1.pk).exists()
    resp = client_logged_in.post(url)
    assert resp.status_code == 302 and resp.url == f"/models/{v1.model.name}/"
    assert not ModelVersion.objects.filter(pk=v1.pk).exists()


def test_refused_archive_or_delete_shows_why(client_logged_in, user, v1):
    services.alias_promote(model=v1.model, alias="staging", version=1, reason="r", actor=user)
    base = f"/models/{v1.model.name}/versions/1"
    assert "move those aliases first" in text(client_logged_in.get(f"{base}/delete"))
    resp = client_logged_in.post(f"{base}/delete", follow=True)
    assert "is the target of alias(es) staging" in text(resp)
    resp = client_logged_in.post(f"{base}/archive", {"action": "archive"}, follow=True)
    assert "is the target of alias(es) staging" in text(resp)
    assert ModelVersion.objects.get(pk=v1.pk).status == "ready"


# --- tokens ------------------------------------------------------------------------------


def test_a_new_token_is_shown_once_and_can_be_revoked(client_logged_in, user):
    resp = client_logged_in.post(
        "/tokens/", {"name": "ci", "scopes": ["read", "registry:write"], "expires_in_days": "30"}
    )
    assert resp.status_code == 200
    assert "no-store" in resp.headers["Cache-Control"]
    plaintext = resp.context["issued"].plaintext
    assert plaintext in text(resp) and "shown only this once" in text(resp)
    token = ApiToken.objects.get(user=user)
    assert token.scopes == ["read", "registry:write"] and token.expires_at is not None

    later = text(client_logged_in.get("/tokens/"))
    assert plaintext not in later
    assert token.display_prefix in later and "ci" in later

    # The token works against the API until revoked.
    api = {"Authorization": f"Bearer {plaintext}"}
    assert client_logged_in.get("/api/v1/models", headers=api).status_code == 200
    confirm = client_logged_in.get(f"/tokens/{token.pk}/revoke")
    assert "Yes, revoke it" in text(confirm)
    assert ApiToken.objects.get(pk=token.pk).revoked_at is None
    resp = client_logged_in.post(f"/tokens/{token.pk}/revoke", follow=True)
    assert "revoked" in text(resp)
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    client_logged_in.logout()
    assert client_logged_in.get("/api/v1/models", headers=api).status_code == 401


def test_token_form_errors_are_shown(client_logged_in):
    resp = client_logged_in.post("/tokens/", {"name": "", "scopes": [], "expires_in_days": "0"})
    assert resp.status_code == 400
    assert "This field is required" in text(resp)
    assert not ApiToken.objects.exists()
    resp = client_logged_in.post("/tokens/", {"name": "x", "scopes": ["root"]})
    assert resp.status_code == 400 and "not one of the available choices" in text(resp)


def test_other_users_tokens_are_not_listed_nor_revocable(client_logged_in, other_user, token_for):
    token_for(other_user)
    theirs = ApiToken.objects.get(user=other_user)
    assert theirs.display_prefix not in text(client_logged_in.get("/tokens/"))
    assert client_logged_in.post(f"/tokens/{theirs.pk}/revoke").status_code == 404
    assert ApiToken.objects.get(pk=theirs.pk).revoked_at is None


# --- audit -------------------------------------------------------------------------------


def test_audit_page_lists_records_and_filters_them(client_logged_in, user, role_admin, v1):
    services.alias_promote(model=v1.model, alias="staging", version=1, reason="r", actor=user)
    client_logged_in.force_login(role_admin)  # the audit log is the admin role's
    body = text(client_logged_in.get("/audit/"))
    assert "version.register" in body and "alias.set" in body and "model.create" in body
    body = text(client_logged_in.get("/audit/", {"action": "alias.set"}))
    assert f"{v1.model.name}@staging" in body and "<code>version.register</code>" not in body
    body = text(client_logged_in.get("/audit/", {"object_type": "model_version"}))
    assert "<code>version.register</code>" in body and "<code>alias.set</code>" not in body
    assert AuditEvent.objects.count() >= 3


def test_audit_page_is_read_only(client, role_admin):
    client.force_login(role_admin)
    assert client.post("/audit/").status_code == 405


# --- admin -------------------------------------------------------------------------------


def test_admin_approval_policy_changes_are_audited(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    resp = client.post("/admin/registry/approvalpolicy/add/", {"alias": "production", "model": ""})
    assert resp.status_code == 302
    policy = ApprovalPolicy.objects.get()
    event = AuditEvent.objects.get(action="approval_policy.create")
    assert event.actor_label == "root"
    assert event.after == {"alias": "production", "model": None, "required_approvals": 1}
    client.post(f"/admin/registry/approvalpolicy/{policy.pk}/delete/", {"post": "yes"})
    assert not ApprovalPolicy.objects.exists()
    assert AuditEvent.objects.filter(action="approval_policy.delete").count() == 1


def test_admin_approve_action_goes_through_the_service(client, user, django_user_model, v1):
    ApprovalPolicy.objects.create(alias="production")
    outcome = services.alias_promote(
        model=v1.model, alias="production", version=1, reason="r", actor=user
    )
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-root-123")
    client.force_login(admin)
    for page in (
        "registeredmodel",
        "modelversion",
        "alias",
        "aliasmove",
        "approvalpolicy",
        "promotionrequest",
    ):
        assert client.get(f"/admin/registry/{page}/").status_code == 200
    resp = client.post(
        "/admin/registry/promotionrequest/",
        {
            "action": "approve_requests",
            "_selected_action": [outcome.request.pk],
        },
    )
    assert resp.status_code == 302
    assert Alias.objects.get(model=v1.model, name="production").version == v1
    assert AuditEvent.objects.filter(action="promotion.approve", actor_label="root").exists()
    # Domain rows are read-only there.
    assert client.get(f"/admin/registry/modelversion/{v1.pk}/change/").status_code == 200
    assert (
        client.post(
            f"/admin/registry/modelversion/{v1.pk}/change/", {"status": "archived"}
        ).status_code
        == 403
    )
