"""What the two schemathesis tests share: objects for generated calls to reach, and a
session that does not outlive the test."""

from __future__ import annotations

import io

import pytest
import requests

# Path parameters of objects the seeded fixture makes (or that exist in every test database).
KNOWN = {
    "version": "1",
    "alias": "staging",
    "request_id": 1,
    "rule_id": 1,
    "policy_id": 1,
    "job_id": 1,
    "action": "pause",
}


@pytest.fixture
def seeded(django_user_model, token_for, model_zip, model_name):
    """A superuser's full-scope token, a model with a version and a deployment, so
    generated calls reach real objects and their full answers, not only 404s."""
    from deployments.services import deployment_create
    from registry.services import model_version_register

    admin = django_user_model.objects.create_superuser("api-admin", password="pw-api-admin-123")
    model_version_register(
        model_name=model_name, archive=io.BytesIO(model_zip), actor=admin, create_model=True
    )
    deployment_create(
        name="api-dep", model_name=model_name, version="1", runtime="local", actor=admin
    )
    return {"token": token_for(admin), "model": model_name, "deployment": "api-dep"}


def aim_at_seeded(case, seeded: dict) -> None:
    """Point a generated case's path parameters at the seeded objects."""
    for key in case.path_parameters or {}:
        if key == "name":
            is_deployment = case.path.startswith("/api/v1/deployments")
            case.path_parameters[key] = seeded["deployment" if is_deployment else "model"]
        elif key in KNOWN:
            case.path_parameters[key] = KNOWN[key]


@pytest.fixture
def session():
    session = requests.Session()
    session.trust_env = False
    yield session
    # A kept-alive connection keeps its server thread (and its DB connection) alive.
    session.close()
