"""Roles, the token intersection, create_user, followed aliases and approval policies.

The route-by-route table is tests/security/test_roles.py; these are the rules
that need real objects.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.base import CommandError

from accounts.models import ApiToken
from accounts.permissions import ROLES, Right, user_can
from accounts.services import api_token_create
from audit.models import AuditEvent
from controlplane.lib.errors import Forbidden
from registry import services as registry_services
from registry.models import Alias, ApprovalPolicy, PromotionRequest
from tests.conftest import ApiClient, with_roles

pytestmark = pytest.mark.django_db


def make_user(django_user_model, name: str, *roles: str):
    return with_roles(
        django_user_model.objects.create_user(username=name, password="pw-x-12345"), *roles
    )


# --- the role groups ----------------------------------------------------------------------


def test_the_migration_made_one_group_per_role_with_the_tables_rights():
    assert set(Group.objects.values_list("name", flat=True)) >= set(ROLES)
    for name, rights in ROLES.items():
        group = Group.objects.get(name=name)
        held = {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.all()}
        if name == "admin":
            assert {str(r) for r in Right} <= held and "auth.add_user" in held
        else:
            assert held == {str(r) for r in rights}, name


def test_a_user_without_a_role_can_do_nothing_and_a_superuser_everything(django_user_model):
    nobody = make_user(django_user_model, "nobody")
    root = django_user_model.objects.create_superuser("root", password="pw-root-123")
    assert not any(user_can(nobody, r) for r in Right)
    assert all(user_can(root, r) for r in Right)


# --- create_user --------------------------------------------------------------------------


def test_create_user_gives_the_roles_reads_the_password_file_and_is_audited(
    tmp_path, django_user_model
):
    secret = tmp_path / "pw"
    secret.write_text("correct-horse-battery-staple\n")
    out = StringIO()
    call_command(
        "create_user",
        "erin",
        "--role",
        "deployer",
        "--role",
        "approver",
        "--password-file",
        str(secret),
        stdout=out,
    )
    erin = django_user_model.objects.get(username="erin")
    assert erin.check_password("correct-horse-battery-staple")
    assert sorted(erin.groups.values_list("name", flat=True)) == ["approver", "deployer"]
    assert not erin.is_staff
    assert user_can(erin, Right.DEPLOY) and not user_can(erin, Right.REGISTRY_WRITE)
    event = AuditEvent.objects.get(action="user.create")
    assert event.actor_label == "system:cli" and event.after["roles"] == ["approver", "deployer"]
    assert "correct-horse" not in str(event.after)


def test_create_user_prompts_for_the_password_and_the_admin_role_opens_the_admin_site(
    monkeypatch, django_user_model
):
    answers = iter(["a-long-enough-passphrase", "a-long-enough-passphrase"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    call_command("create_user", "frank", "--role", "admin", stdout=StringIO())
    frank = django_user_model.objects.get(username="frank")
    assert frank.is_staff and frank.check_password("a-long-enough-passphrase")


def test_create_user_refuses_unknown_roles_weak_passwords_and_taken_names(
    tmp_path, django_user_model, user
):
    secret = tmp_path / "pw"
    secret.write_text("correct-horse-battery-staple")
    with pytest.raises(CommandError, match="unknown role.*root.*roles are: viewer"):
        call_command("create_user", "gina", "--role", "root", "--password-file", str(secret))
    weak = tmp_path / "weak"
    weak.write_text("12345678")
    with pytest.raises(CommandError, match="too common|entirely numeric"):
        call_command("create_user", "gina", "--role", "viewer", "--password-file", str(weak))
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_user", "alice", "--role", "viewer", "--password-file", str(secret))
    assert not django_user_model.objects.filter(username="gina").exists()
    assert not AuditEvent.objects.filter(action="user.create").exists()


# --- tokens never exceed their owner -------------------------------------------------------


def test_a_user_cannot_mint_a_scope_their_roles_lack(django_user_model, client):
    viewer = make_user(django_user_model, "vera", "viewer")
    with pytest.raises(Forbidden, match="lacks the scope.*deploy"):
        api_token_create(user=viewer, name="x", scopes=["read", "deploy"])
    with pytest.raises(CommandError, match="lacks the scope"):
        call_command(
            "create_api_token",
            "vera",
            "--scope",
            "registry:write",
            stdout=StringIO(),
            stderr=StringIO(),
        )
    client.force_login(viewer)
    page = client.get("/tokens/").content.decode()
    assert 'value="read"' in page and 'value="deploy"' not in page
    resp = client.post("/tokens/", {"name": "ci", "scopes": ["deploy"]})
    assert resp.status_code == 400
    assert not ApiToken.objects.filter(user=viewer).exists()
    # Without scopes given, a token gets the scopes its owner holds.
    assert api_token_create(user=viewer, name="default").token.scopes == ["read"]


def test_a_demoted_owners_token_loses_the_right_on_the_next_request(
    django_user_model, client, token_for, model_name
):
    dev = make_user(django_user_model, "dev", "model-developer")
    api = ApiClient(client, token_for(dev, ["read", "registry:write"]))
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    dev.groups.set([Group.objects.get(name="viewer")])
    resp = api.post("/api/v1/models", {"name": model_name + "-2"})
    assert resp.status_code == 403
    assert "owner's roles" in resp.json()["error"]["message"]
    assert api.get("/api/v1/models").status_code == 200  # reading stays


def test_a_session_user_gets_only_their_roles_rights(django_user_model, client, model_name):
    client.force_login(make_user(django_user_model, "dora", "deployer"))
    resp = client.post("/api/v1/models", {"name": model_name}, content_type="application/json")
    assert resp.status_code == 403 and "model-developer" in resp.json()["error"]["message"]


# --- aliases a deployment follows ----------------------------------------------------------


@pytest.fixture
def followed(user, model_name, logged_run):
    """A model with two versions; deployment ``web`` follows its ``production`` alias (v1)."""
    from deployments import services as deployment_services

    for _ in range(2):
        registry_services.model_version_register(
            model_name=model_name, source=logged_run["source"], actor=user, create_model=True
        )
    model = registry_services.RegisteredModel.objects.get(name=model_name)
    registry_services.alias_promote(
        model=model, alias="production", version=1, reason="first", actor=user
    )
    deployment_services.deployment_create(
        name="web", model_name=model_name, alias="production", runtime="local", actor=user
    )
    return model


def test_moving_a_followed_alias_needs_the_deploy_right(
    followed, django_user_model, client, token_for
):
    dev = make_user(django_user_model, "dev", "model-developer")
    deployer = make_user(django_user_model, "dep", "deployer")
    url = f"/api/v1/models/{followed.name}/aliases/production"
    dev_api = ApiClient(client, token_for(dev))
    before = AuditEvent.objects.count()
    resp = dev_api.post(url, {"version": "2", "reason": "ship"})
    assert resp.status_code == 403
    assert "web follow" in resp.json()["error"]["message"]
    assert "deploy right" in resp.json()["error"]["message"]
    assert Alias.objects.get(model=followed, name="production").version.version == 1
    assert AuditEvent.objects.count() == before
    # A full-rights owner with a registry:write-only token is refused too: the token is the limit.
    both = make_user(django_user_model, "both", "model-developer", "deployer")
    resp = ApiClient(client, token_for(both, ["registry:write"])).post(
        url, {"version": "2", "reason": "ship"}
    )
    assert resp.status_code == 403
    resp = ApiClient(client, token_for(deployer, ["deploy"])).post(
        url, {"version": "2", "reason": "ship"}
    )
    assert resp.status_code == 201, resp.content
    assert Alias.objects.get(model=followed, name="production").version.version == 2


def test_an_alias_nobody_follows_moves_with_registry_write_not_deploy(
    followed, django_user_model, client, token_for
):
    dev = make_user(django_user_model, "dev", "model-developer")
    deployer = make_user(django_user_model, "dep", "deployer")
    url = f"/api/v1/models/{followed.name}/aliases/staging"
    resp = ApiClient(client, token_for(deployer)).post(url, {"version": "2", "reason": "try"})
    assert resp.status_code == 403
    resp = ApiClient(client, token_for(dev)).post(url, {"version": "2", "reason": "try"})
    assert resp.status_code == 201
    # The UI asks the same service.
    client.force_login(dev)
    resp = client.post(
        f"/models/{followed.name}/promote",
        {"alias": "production", "version": "2", "reason": "ui", "confirm": "yes"},
    )
    assert resp.status_code == 400 and "deploy right" in resp.content.decode()
    assert Alias.objects.get(model=followed, name="production").version.version == 1


# --- approval policies API -----------------------------------------------------------------


@pytest.fixture
def admin_api(client, role_admin, token_for):
    return ApiClient(client, token_for(role_admin))


def test_admins_create_read_change_and_delete_approval_policies_audited(
    admin_api, user, model_name, logged_run
):
    registry_services.model_version_register(
        model_name=model_name, source=logged_run["source"], actor=user, create_model=True
    )
    resp = admin_api.post("/api/v1/approval-policies", {"model": None, "alias": "production"})
    assert resp.status_code == 201, resp.content
    body = resp.json()
    assert body["model"] is None and body["alias"] == "production"
    assert body["required_approvals"] == 1
    pid = body["id"]
    resp = admin_api.post(
        "/api/v1/approval-policies",
        {"model": model_name, "alias": "canary", "required_approvals": 1},
    )
    assert resp.status_code == 201
    listing = admin_api.get("/api/v1/approval-policies").json()
    assert listing["count"] == 2 and {p["alias"] for p in listing["results"]} == {
        "production",
        "canary",
    }
    assert admin_api.get(f"/api/v1/approval-policies/{pid}").json()["alias"] == "production"
    resp = admin_api.patch(f"/api/v1/approval-policies/{pid}", {"model": model_name})
    assert resp.status_code == 200 and resp.json()["model"] == model_name
    assert admin_api.delete(f"/api/v1/approval-policies/{pid}").status_code == 204
    assert admin_api.get(f"/api/v1/approval-policies/{pid}").status_code == 404
    actions = list(
        AuditEvent.objects.filter(object_type="approval_policy")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == [
        "approval_policy.create",
        "approval_policy.create",
        "approval_policy.update",
        "approval_policy.delete",
    ]
    update = AuditEvent.objects.get(action="approval_policy.update")
    assert update.before["model"] is None and update.after["model"] == model_name


def test_a_policy_made_through_the_api_gates_promotion(
    admin_api, api, user, model_name, logged_run
):
    registry_services.model_version_register(
        model_name=model_name, source=logged_run["source"], actor=user, create_model=True
    )
    assert admin_api.post("/api/v1/approval-policies", {"alias": "production"}).status_code == 201
    resp = api.post(
        f"/api/v1/models/{model_name}/aliases/production", {"version": "1", "reason": "go"}
    )
    assert (
        resp.status_code == 202 and PromotionRequest.objects.filter(status="pending").count() == 1
    )


@pytest.mark.parametrize(
    "payload, status, code",
    [
        ({"alias": "latest"}, 400, "invalid_alias"),
        ({"alias": "v3"}, 400, "invalid_alias"),
        ({}, 400, None),
        ({"alias": "production", "model": "no-such-model"}, 400, "unknown_model"),
        ({"alias": "production", "required_approvals": 2}, 400, "invalid_required_approvals"),
        ({"alias": "production", "required_approvals": "many"}, 400, None),
        ({"alias": "production", "model": ["x"]}, 400, None),
    ],
)
def test_bad_policies_are_refused_and_change_nothing(admin_api, payload, status, code):
    resp = admin_api.post("/api/v1/approval-policies", payload)
    assert resp.status_code == status, resp.content
    if code:
        assert resp.json()["error"]["code"] == code
    assert not ApprovalPolicy.objects.exists()
    assert not AuditEvent.objects.filter(object_type="approval_policy").exists()


def test_a_duplicate_policy_is_a_conflict_also_for_all_models(admin_api):
    assert admin_api.post("/api/v1/approval-policies", {"alias": "production"}).status_code == 201
    resp = admin_api.post("/api/v1/approval-policies", {"alias": "production", "model": None})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "policy_exists"
    assert ApprovalPolicy.objects.count() == 1


def test_viewers_read_policies_but_only_admins_write_them(
    client, django_user_model, token_for, admin_api
):
    pid = admin_api.post("/api/v1/approval-policies", {"alias": "production"}).json()["id"]
    for role in ("viewer", "model-developer", "deployer", "approver"):
        someone = make_user(django_user_model, f"u-{role}", role)
        api = ApiClient(client, token_for(someone))
        assert api.get("/api/v1/approval-policies").status_code == 200
        assert api.get(f"/api/v1/approval-policies/{pid}").status_code == 200
        assert api.post("/api/v1/approval-policies", {"alias": "staging"}).status_code == 403
        assert api.patch(f"/api/v1/approval-policies/{pid}", {"alias": "x"}).status_code == 403
        assert api.delete(f"/api/v1/approval-policies/{pid}").status_code == 403
    assert ApprovalPolicy.objects.get().alias == "production"


def test_the_policy_list_takes_a_constant_number_of_queries(
    admin_api, user, logged_run, django_assert_max_num_queries
):
    for i in range(5):
        name = f"policy-model-{i}"
        registry_services.model_version_register(
            model_name=name, source=logged_run["source"], actor=user, create_model=True
        )
        assert (
            admin_api.post(
                "/api/v1/approval-policies", {"model": name, "alias": "production"}
            ).status_code
            == 201
        )
    with django_assert_max_num_queries(8):
        resp = admin_api.get("/api/v1/approval-policies?page_size=2")
    assert resp.json()["count"] == 5 and len(resp.json()["results"]) == 2


def test_the_openapi_schema_lists_the_policy_routes(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").content.decode()
    assert "/api/v1/approval-policies" in schema
    assert "/api/v1/approval-policies/{policy_id}" in schema


# --- the admin site ------------------------------------------------------------------------


def test_admin_site_policy_changes_go_through_the_service_and_need_the_admin_role(
    client, django_user_model, role_admin
):
    staff_viewer = make_user(django_user_model, "sv", "viewer")
    staff_viewer.is_staff = True
    staff_viewer.save()
    client.force_login(staff_viewer)
    resp = client.post("/admin/registry/approvalpolicy/add/", {"alias": "production", "model": ""})
    assert resp.status_code == 403 and not ApprovalPolicy.objects.exists()
    role_admin.is_staff = True
    role_admin.save()
    client.force_login(role_admin)
    resp = client.post("/admin/registry/approvalpolicy/add/", {"alias": "latest", "model": ""})
    assert resp.status_code == 200 and not ApprovalPolicy.objects.exists()  # form error, no 500
    resp = client.post("/admin/registry/approvalpolicy/add/", {"alias": "production", "model": ""})
    assert resp.status_code == 302 and ApprovalPolicy.objects.get().alias == "production"
    assert AuditEvent.objects.get(action="approval_policy.create").actor == role_admin


# --- templates hide what a user cannot do -----------------------------------------------------


def test_pages_show_write_actions_only_to_roles_that_may_use_them(
    client, django_user_model, user, model_name, logged_run
):
    registry_services.model_version_register(
        model_name=model_name, source=logged_run["source"], actor=user, create_model=True
    )
    viewer = make_user(django_user_model, "vic", "viewer")
    client.force_login(viewer)
    listing = client.get("/").content.decode()
    detail = client.get(f"/models/{model_name}/versions/1/").content.decode()
    assert "/models/new" not in listing and "/audit/" not in listing
    assert "/promote" not in detail and "/archive" not in detail and "/delete" not in detail
    assert "New deployment" not in client.get("/deployments/").content.decode()
    client.force_login(user)  # model-developer and deployer
    listing = client.get("/").content.decode()
    detail = client.get(f"/models/{model_name}/versions/1/").content.decode()
    assert "/models/new" in listing and "/audit/" not in listing
    assert "/promote" in detail and "/archive" in detail and "/delete" in detail
    assert "New deployment" in client.get("/deployments/").content.decode()


def test_viewers_see_deployment_environment_names_not_values(
    followed, user, django_user_model, client, token_for
):
    from deployments import services as deployment_services

    deployment_services.deployment_create(
        name="keyed",
        model_name=followed.name,
        version="1",
        runtime="local",
        env={"API_KEY": "s3cret-value"},
        actor=user,
    )
    viewer = make_user(django_user_model, "vic", "viewer")
    seen = ApiClient(client, token_for(viewer)).get("/api/v1/deployments/keyed")
    assert seen.status_code == 200 and seen.json()["env"] == {"API_KEY": "********"}
    listed = ApiClient(client, token_for(viewer)).get("/api/v1/deployments").content.decode()
    assert "s3cret-value" not in listed and "API_KEY" in listed
    mine = ApiClient(client, token_for(user)).get("/api/v1/deployments/keyed")
    assert mine.json()["env"] == {"API_KEY": "s3cret-value"}


def test_the_admin_role_revokes_anyones_token_others_only_their_own(
    django_user_model, role_admin, user
):
    from accounts.services import api_token_revoke
    from controlplane.lib.errors import NotFound

    token = api_token_create(user=user, name="ci").token
    carol = make_user(django_user_model, "carol2", "deployer")
    with pytest.raises(NotFound):
        api_token_revoke(token_id=token.pk, actor=carol)
    assert api_token_revoke(token_id=token.pk, actor=role_admin).revoked_at is not None
