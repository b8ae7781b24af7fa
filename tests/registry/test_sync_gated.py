"""Approvals hold whatever path a change takes: an approval-gated alias moved with valid
credentials straight on the MLflow server is recorded, moved back, turned into a pending
promotion request, and never rolled out by the deployment following it.

A real MLflow server with basic-auth on loopback (as `make run` starts it); the deployment
follow logic is the reconciler's own function."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import Permission

from audit.models import AuditEvent
from controlplane.run import MLFLOW_USER
from deployments.services import deployment_create, deployment_follow_alias
from registry.mlflow_store import get_store
from registry.models import AliasMove, ApprovalPolicy, PromotionRequest
from registry.services import (
    SYNC_REQUESTER,
    alias_promote,
    model_version_register,
    promotion_request_approve,
    registered_model_create,
    registry_sync,
)

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


@pytest.fixture
def outsider(auth_mlflow):
    """Someone with valid MLflow credentials who may move aliases there (EDIT on every
    registered model), but goes around the control plane."""
    admin = (MLFLOW_USER, auth_mlflow.password)
    name, password = "outsider", "outsider-password-123"
    created = auth_mlflow.call(
        "POST",
        "/api/2.0/mlflow/users/create",
        json={"username": name, "password": password},
        auth=admin,
    )
    assert created.status_code in (200, 400), created.text  # 400: exists (a second test)
    granted = auth_mlflow.call(
        "POST",
        "/api/3.0/mlflow/users/permissions/grant",
        json={
            "username": name,
            "resource_type": "registered_model",
            "resource_id": "*",
            "permission": "EDIT",
        },
        auth=admin,
    )
    assert granted.ok or "ALREADY_EXISTS" in granted.text, granted.text

    def move(model: str, alias: str, version: int) -> None:
        resp = auth_mlflow.call(
            "POST",
            "/api/2.0/mlflow/registered-models/alias",
            json={"name": model, "alias": alias, "version": str(version)},
            auth=(name, password),
        )
        assert resp.status_code == 200, resp.text

    return move


@pytest.fixture
def people(django_user_model):
    root = django_user_model.objects.create_superuser("root-admin", password="pw-root-admin-1")
    approver = django_user_model.objects.create_user("appr", password="pw-approver-123")
    approver.user_permissions.add(Permission.objects.get(codename="approve_promotion"))
    return root, django_user_model.objects.get(pk=approver.pk)


def test_an_outside_move_of_a_gated_alias_is_reverted_requested_and_never_rolled_out(
    auth_mlflow, outsider, people, model_name, model_zip
):
    root, approver = people
    with auth_mlflow.settings():
        store = get_store()
        model = registered_model_create(name=model_name, actor=root)
        for _ in range(2):
            model_version_register(model_name=model_name, archive=io.BytesIO(model_zip), actor=root)
        alias_promote(model=model, alias="production", version=1, reason="first", actor=root)
        ApprovalPolicy.objects.create(alias="production", model=None)
        d = deployment_create(
            name=f"d-{model_name[-8:]}", model_name=model_name, alias="production", actor=root
        )
        assert d.desired_revision.model_version.version == 1
        revisions = d.revisions.count()

        outsider(model_name, "production", 2)
        assert store.get_alias(model_name, "production") == 2
        # Between the outside move and the sync, the follow logic keeps the approved version.
        d = deployment_follow_alias(deployment_id=d.pk)
        assert d.desired_revision.model_version.version == 1

        result = registry_sync()
        assert result.reverted == 1

        # Moved back in MLflow, and the mirror never left the approved version.
        assert store.get_alias(model_name, "production") == 1
        assert model.aliases.get(name="production").version.version == 1
        # The history tells both moves; the outside one became a pending request.
        revert, outside = AliasMove.objects.filter(model=model, alias="production")[:2]
        assert (outside.origin, outside.from_version, outside.to_version) == ("external", 1, 2)
        assert (revert.origin, revert.from_version, revert.to_version) == ("controlplane", 2, 1)
        request = PromotionRequest.objects.get(model=model, alias="production", status="pending")
        assert request.version.version == 2 and revert.request == request
        assert request.requested_by.username == SYNC_REQUESTER
        assert not request.requested_by.is_active  # it never logs in
        actions = set(
            AuditEvent.objects.filter(
                object_id__in=[f"{model_name}@production", str(request.pk)]
            ).values_list("action", flat=True)
        )
        assert {"alias.external_move", "alias.revert", "promotion.request"} <= actions

        # Nothing rolls out: the reconciler's follow step finds nothing to do.
        d = deployment_follow_alias(deployment_id=d.pk)
        assert d.desired_revision.model_version.version == 1
        assert d.revisions.count() == revisions

        # Idempotent: the next pass finds MLflow and the mirror agreeing.
        assert registry_sync().reverted == 0
        assert AliasMove.objects.filter(model=model).count() == 3  # promote, outside, revert
        assert PromotionRequest.objects.filter(model=model).count() == 1

        # Moved outside again: reverted again, the same request still waits.
        outsider(model_name, "production", 2)
        assert registry_sync().reverted == 1
        assert store.get_alias(model_name, "production") == 1
        assert PromotionRequest.objects.filter(model=model, status="pending").count() == 1

        # Approved, it goes through the control plane, and then it rolls out.
        promotion_request_approve(request_id=request.pk, actor=approver, comment="ok")
        assert store.get_alias(model_name, "production") == 2
        d = deployment_follow_alias(deployment_id=d.pk)
        assert d.desired_revision.model_version.version == 2


def test_a_gated_alias_deleted_outside_is_put_back(auth_mlflow, people, model_name, model_zip):
    root, _ = people
    with auth_mlflow.settings():
        store = get_store()
        model = registered_model_create(name=model_name, actor=root)
        model_version_register(model_name=model_name, archive=io.BytesIO(model_zip), actor=root)
        alias_promote(model=model, alias="production", version=1, reason="first", actor=root)
        ApprovalPolicy.objects.create(alias="production", model=model)
        store.client.delete_registered_model_alias(model_name, "production")
        assert registry_sync().reverted == 1
        assert store.get_alias(model_name, "production") == 1
        assert model.aliases.get(name="production").version.version == 1
        assert not PromotionRequest.objects.filter(model=model).exists()  # nothing to approve
        assert AuditEvent.objects.filter(
            action="alias.revert", object_id=f"{model_name}@production"
        ).exists()


def test_an_ungated_alias_moved_outside_is_still_only_recorded(
    auth_mlflow, outsider, people, model_name, model_zip
):
    root, _ = people
    with auth_mlflow.settings():
        model = registered_model_create(name=model_name, actor=root)
        for _ in range(2):
            model_version_register(model_name=model_name, archive=io.BytesIO(model_zip), actor=root)
        alias_promote(model=model, alias="staging", version=1, reason="first", actor=root)
        outsider(model_name, "staging", 2)
        assert registry_sync().reverted == 0
        move = AliasMove.objects.filter(model=model, alias="staging").first()
        assert (move.origin, move.from_version, move.to_version) == ("external", 1, 2)
        assert get_store().get_alias(model_name, "staging") == 2
        assert model.aliases.get(name="staging").version.version == 2
