"""Single sign-on through a real OpenID Connect provider, in Chromium.

The provider is django-oauth-toolkit's (tests/accounts/oidc_idp), a process of its
own on loopback with its own login page, signing ID tokens with RS256. The control
plane is the test's live server. The browser goes from our login page to the
provider's, signs in there, comes back, and the roles are the groups' mapping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from accounts.models import OidcIdentity
from audit.models import AuditEvent
from tests.e2e.conftest import ROOT, VIEWPORT
from tests.support import free_port, wait_http

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CLIENT_ID = "controlplane-test"
CLIENT_SECRET = "s3cret-" + "c" * 30
PEOPLE = [
    # mapped to model-developer (an IdP group name unlike ours) and to viewer
    {
        "username": "erin",
        "password": "erin-pw-123",
        "email": "erin@example.test",
        "groups": ["ml-team"],
    },
    {
        "username": "vic",
        "password": "vic-pw-123",
        "email": "vic@example.test",
        "groups": ["staff-readonly"],
    },
    {
        "username": "nobody",
        "password": "nobody-pw-1",
        "email": "n@example.test",
        "groups": ["other"],
    },
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory, live_server) -> Iterator[str]:
    from jwcrypto import jwk

    work = tmp_path_factory.mktemp("idp")
    key_file = work / "key.pem"
    key_file.write_bytes(jwk.JWK.generate(kty="RSA", size=2048).export_to_pem(True, None))
    port = free_port()
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "port": port,
                "database": str(work / "idp.sqlite3"),
                "key_file": str(key_file),
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uri": f"{live_server.url}/oidc/callback/",
                "users": PEOPLE,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    log = open(work / "idp.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.accounts.oidc_idp.serve", str(spec)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/o/.well-known/openid-configuration", timeout=60, proc=proc)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        log.close()


@pytest.fixture
def sso(settings, idp):
    """The control plane configured as the README says, from the provider's discovery."""
    import requests

    conf = requests.get(f"{idp}/o/.well-known/openid-configuration", timeout=10).json()
    settings.CONTROLPLANE_OIDC_ENABLED = True
    settings.CONTROLPLANE_OIDC_PROVIDER_NAME = "Test IdP"
    settings.CONTROLPLANE_OIDC_ROLE_MAP = "ml-team=model-developer,staff-readonly=viewer"
    settings.CONTROLPLANE_OIDC_DEFAULT_ROLE = ""
    settings.OIDC_RP_CLIENT_ID = CLIENT_ID
    settings.OIDC_RP_CLIENT_SECRET = CLIENT_SECRET
    settings.OIDC_OP_AUTHORIZATION_ENDPOINT = conf["authorization_endpoint"]
    settings.OIDC_OP_TOKEN_ENDPOINT = conf["token_endpoint"]
    settings.OIDC_OP_USER_ENDPOINT = conf["userinfo_endpoint"]
    settings.OIDC_OP_JWKS_ENDPOINT = conf["jwks_uri"]
    settings.OIDC_RP_SIGN_ALGO = "RS256"
    settings.OIDC_RP_SCOPES = "openid email profile groups"
    settings.OIDC_USE_PKCE = True
    settings.LOGIN_REDIRECT_URL_FAILURE = "/login/?sso=failed"
    settings.AUTHENTICATION_BACKENDS = [
        *settings.AUTHENTICATION_BACKENDS,
        "accounts.oidc.RoleMappingBackend",
    ]
    return settings


def _sign_in(chromium: Browser, base_url: str, who: dict, artifacts: Path):
    context = chromium.new_context(viewport=VIEWPORT, base_url=base_url)
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login/"))
    page.screenshot(path=str(artifacts / "oidc-01-login.png"))
    page.get_by_role("link", name="Sign in with Test IdP").click()
    expect(page.get_by_role("heading", name="Test identity provider")).to_be_visible()
    page.get_by_label("IdP username").fill(who["username"])
    page.get_by_label("IdP password").fill(who["password"])
    page.get_by_role("button", name="Continue").click()
    return context, page


def test_signing_in_through_the_provider_maps_its_groups_to_roles(
    live_server, sso, chromium_with_db: Browser, artifacts, django_user_model
):
    # A model developer by the ml-team group: the write actions are there.
    context, page = _sign_in(chromium_with_db, live_server.url, PEOPLE[0], artifacts)
    expect(page.locator(".userbox .username")).to_have_text("erin")
    expect(page.get_by_role("link", name="Upload", exact=True)).to_be_visible()
    page.screenshot(path=str(artifacts / "oidc-02-signed-in.png"))
    erin = django_user_model.objects.get(username="erin")
    assert sorted(erin.groups.values_list("name", flat=True)) == ["model-developer"]
    assert not erin.has_usable_password() and erin.email == "erin@example.test"
    assert OidcIdentity.objects.get(user=erin).subject  # found by sub next time
    assert AuditEvent.objects.filter(action="user.roles", object_id=str(erin.pk)).exists()
    context.close()

    # A viewer by staff-readonly: reads, and sees no write action.
    context, page = _sign_in(chromium_with_db, live_server.url, PEOPLE[1], artifacts)
    expect(page.locator(".userbox .username")).to_have_text("vic")
    expect(page.get_by_role("heading", name="Models")).to_be_visible()
    expect(page.get_by_role("link", name="Upload", exact=True)).to_have_count(0)
    vic = django_user_model.objects.get(username="vic")
    assert sorted(vic.groups.values_list("name", flat=True)) == ["viewer"]
    context.close()

    # No mapped group and no default role: signed in with no role, reads nothing.
    context, page = _sign_in(chromium_with_db, live_server.url, PEOPLE[2], artifacts)
    expect(page.locator(".userbox .username")).to_have_text("nobody")
    assert list(django_user_model.objects.get(username="nobody").groups.all()) == []
    resp = page.request.get(f"{live_server.url}/api/v1/models")
    assert resp.status == 403
    context.close()


def test_a_local_user_of_the_same_name_is_not_taken_over(
    live_server, sso, chromium_with_db: Browser, artifacts, django_user_model
):
    local = django_user_model.objects.create_user(username="erin", password="local-pw-12345")
    context, page = _sign_in(chromium_with_db, live_server.url, PEOPLE[0], artifacts)
    expect(page.locator(".userbox .username")).to_have_text("erin-2")
    local.refresh_from_db()
    assert local.check_password("local-pw-12345") and not hasattr(local, "oidc_identity")
    context.close()
