"""The embedded MLflow server requires authentication: anonymous writes are refused, the
control plane uses its own credential, users get theirs from the UI.

The server is a real `mlflow server --app-name basic-auth` on loopback, configured exactly
as `make run` configures it (``controlplane.run.mlflow_auth_setup``)."""

from __future__ import annotations

import io
import re

import pytest

from audit.models import AuditEvent
from controlplane.lib.errors import ApplicationError
from controlplane.run import MLFLOW_USER
from registry.models import RegisteredModel
from tests.conftest import with_roles

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("root-admin", password="pw-root-admin-1")


def test_anonymous_writes_and_reads_are_refused(auth_mlflow):
    alias = auth_mlflow.call(
        "POST",
        "/api/2.0/mlflow/registered-models/alias",
        json={"name": "any", "alias": "production", "version": "1"},
    )
    assert alias.status_code == 401
    create = auth_mlflow.call(
        "POST", "/api/2.0/mlflow/registered-models/create", json={"name": "anonymous"}
    )
    assert create.status_code == 401
    search = auth_mlflow.call("GET", "/api/2.0/mlflow/registered-models/search")
    assert search.status_code == 401
    wrong = auth_mlflow.call(
        "GET", "/api/2.0/mlflow/registered-models/search", auth=(MLFLOW_USER, "not-the-password")
    )
    assert wrong.status_code == 401
    assert (
        auth_mlflow.call(
            "GET",
            "/api/2.0/mlflow/registered-models/search",
            auth=(MLFLOW_USER, auth_mlflow.password),
        ).status_code
        == 200
    )


def test_the_control_plane_registers_and_promotes_with_its_own_credential(
    auth_mlflow, superuser, model_name, model_zip
):
    from registry.mlflow_store import get_store
    from registry.services import alias_promote, model_version_register, registered_model_create

    with auth_mlflow.settings():
        model = registered_model_create(name=model_name, actor=superuser)
        mv = model_version_register(
            model_name=model_name, archive=io.BytesIO(model_zip), actor=superuser
        )
        alias_promote(model=model, alias="staging", version=mv.version, reason="r", actor=superuser)
        assert get_store().get_alias(model_name, "staging") == mv.version
    # What MLflow holds, read with the admin credential over plain HTTP.
    got = auth_mlflow.call(
        "GET",
        "/api/2.0/mlflow/registered-models/get",
        params={"name": model_name},
        auth=(MLFLOW_USER, auth_mlflow.password),
    ).json()
    assert {a["alias"]: a["version"] for a in got["registered_model"]["aliases"]} == {
        "staging": str(mv.version)
    }


def test_a_wrong_credential_changes_nothing(auth_mlflow, superuser, model_name):
    from registry.services import registered_model_create

    with auth_mlflow.settings(MLFLOW_TRACKING_PASSWORD="wrong-password-123"):
        with pytest.raises(ApplicationError) as caught:
            registered_model_create(name=model_name, actor=superuser)
    assert caught.value.status_code == 503
    assert not RegisteredModel.objects.filter(name=model_name).exists()
    assert not AuditEvent.objects.filter(action="model.create", object_id=model_name).exists()


def _issue(client) -> str:
    resp = client.post("/tokens/mlflow")
    assert resp.status_code == 200, re.findall(r"form-error.*?</div>", resp.content.decode(), re.S)
    match = re.search(r'id="new-token" class="mono" value="([^"]+)"', resp.content.decode())
    assert match, resp.content.decode()[:2000]
    return match.group(1)


def test_users_get_their_own_mlflow_credential_from_the_ui(
    auth_mlflow, client, superuser, django_user_model
):
    run = {"experiment_id": "0"}
    with auth_mlflow.settings():
        # A model developer (here: may register versions) gets EDIT on experiments and runs.
        client.force_login(superuser)
        page = client.get("/tokens/mlflow")
        assert page.status_code == 200 and b"EDIT" in page.content
        assert b'id="new-token"' not in page.content  # nothing to show before asking
        password = _issue(client)
        mine = (superuser.username, password)
        assert auth_mlflow.call("POST", "/api/2.0/mlflow/runs/create", json=run, auth=mine).ok
        # ... but aliases move through the control plane, not with this credential.
        alias = auth_mlflow.call(
            "POST",
            "/api/2.0/mlflow/registered-models/alias",
            json={"name": "any", "alias": "production", "version": "1"},
            auth=mine,
        )
        assert alias.status_code in (403, 404)
        entry = AuditEvent.objects.filter(action="mlflow_credential.issue").latest("id")
        assert entry.after == {"mlflow_username": superuser.username, "permission": "EDIT"}
        assert password not in str(entry.after)

        # Asking again resets the password: the old one stops working.
        again = _issue(client)
        assert again != password
        search = "/api/2.0/mlflow/registered-models/search"
        assert auth_mlflow.call("GET", search, auth=mine).status_code == 401
        assert auth_mlflow.call("GET", search, auth=(superuser.username, again)).status_code == 200

        # A reader gets READ: reads, cannot log runs.
        viewer = with_roles(
            django_user_model.objects.create_user("vera", password="pw-vera-12345"), "viewer"
        )
        client.force_login(viewer)
        _issue(client)
        reader = ("vera", _issue(client))  # a reset of a reader's credential works too
        assert auth_mlflow.call("GET", search, auth=reader).status_code == 200
        denied = auth_mlflow.call("POST", "/api/2.0/mlflow/runs/create", json=run, auth=reader)
        assert denied.status_code == 403

        # No role, no credential; no MLflow user is created.
        nobody = django_user_model.objects.create_user("norole", password="pw-norole-123")
        client.force_login(nobody)
        refused = client.post("/tokens/mlflow")
        assert refused.status_code == 403 and b'id="new-token"' not in refused.content
    found = auth_mlflow.call(
        "GET",
        "/api/2.0/mlflow/users/get",
        params={"username": "norole"},
        auth=(MLFLOW_USER, auth_mlflow.password),
    )
    assert found.status_code == 404


def test_without_an_mlflow_server_with_authentication_the_page_says_so(client, superuser):
    client.force_login(superuser)
    resp = client.post("/tokens/mlflow")  # the test settings: a local store, no credential
    assert resp.status_code == 409
    assert b"need an MLflow server with authentication" in resp.content
    assert not AuditEvent.objects.filter(action="mlflow_credential.issue").exists()
