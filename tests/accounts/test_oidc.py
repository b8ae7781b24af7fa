"""Single sign-on settings and role mapping (the browser sign-in is tests/e2e/test_oidc.py)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from accounts.oidc import role_map_parse, roles_from_claims

pytestmark = pytest.mark.django_db


def test_the_role_map_is_parsed_and_an_unknown_role_is_an_error():
    assert role_map_parse("ml=model-developer, ml=deployer,/ops=admin") == {
        "ml": ["model-developer", "deployer"],
        "/ops": ["admin"],
    }
    with pytest.raises(ImproperlyConfigured, match="'root' is not a role"):
        role_map_parse("ops=root")
    with pytest.raises(ImproperlyConfigured, match="is not GROUP=ROLE"):
        role_map_parse("ops")


def test_roles_come_from_the_claim_with_the_least_privilege_default():
    mapping = {"ml": ["model-developer"], "ops": ["deployer"]}
    claims = {"groups": ["ops", "ml", "unmapped"]}
    assert roles_from_claims(claims, claim="groups", mapping=mapping, default="") == [
        "deployer",
        "model-developer",
    ]
    assert roles_from_claims({"groups": "ml"}, claim="groups", mapping=mapping, default="") == [
        "model-developer"
    ]
    assert roles_from_claims({}, claim="groups", mapping=mapping, default="") == []
    assert roles_from_claims(
        {"groups": ["x"]}, claim="groups", mapping=mapping, default="viewer"
    ) == ["viewer"]


def test_without_configuration_there_is_no_sign_in_button_and_no_sso_route(client):
    page = client.get("/login/").content.decode()
    assert "Sign in with" not in page and 'name="password"' in page
    assert client.get("/oidc/sign-in/").status_code == 404
    assert client.get("/oidc/callback/?code=x&state=y").status_code == 404


def test_with_configuration_the_button_sends_to_the_provider(client, settings):
    settings.CONTROLPLANE_OIDC_ENABLED = True
    settings.CONTROLPLANE_OIDC_PROVIDER_NAME = "Keycloak"
    settings.OIDC_RP_CLIENT_ID = "cp"
    settings.OIDC_OP_AUTHORIZATION_ENDPOINT = "http://127.0.0.1:9/auth"
    settings.OIDC_USE_PKCE = True
    assert "Sign in with Keycloak" in client.get("/login/").content.decode()
    resp = client.get("/oidc/sign-in/")
    assert resp.status_code == 302
    location = resp["Location"]
    assert location.startswith("http://127.0.0.1:9/auth?") and "code_challenge=" in location
    assert "redirect_uri=http%3A%2F%2Ftestserver%2Foidc%2Fcallback%2F" in location


def test_local_passwords_can_be_turned_off(client, settings, django_user_model):
    django_user_model.objects.create_user(username="ann", password="ann-pw-12345")
    settings.CONTROLPLANE_OIDC_ENABLED = True
    settings.CONTROLPLANE_LOCAL_LOGIN = False
    page = client.get("/login/").content.decode()
    assert 'name="password"' not in page
    resp = client.post("/login/", {"username": "ann", "password": "ann-pw-12345"})
    assert resp.status_code == 403
    assert "_auth_user_id" not in client.session


def test_turning_off_local_passwords_without_sso_stops_start_up(tmp_path):
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "CONTROLPLANE_DATA_DIR": str(tmp_path),
        "CONTROLPLANE_LOCAL_LOGIN": "false",
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
    }
    env.pop("CONTROLPLANE_OIDC_CLIENT_ID", None)
    out = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        out.returncode != 0 and "CONTROLPLANE_LOCAL_LOGIN=false needs single sign-on" in out.stderr
    )
