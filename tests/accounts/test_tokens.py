from __future__ import annotations

import hashlib
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from accounts.models import ApiToken
from accounts.services import api_token_revoke
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def test_create_api_token_prints_the_token_last_and_stores_only_a_digest(user):
    out = StringIO()
    call_command(
        "create_api_token",
        "alice",
        "--scope",
        "read",
        "--expires-in",
        "7",
        stdout=out,
        stderr=StringIO(),
    )
    plaintext = out.getvalue().strip().splitlines()[-1]
    assert plaintext.startswith("mlcp_")
    token = ApiToken.objects.get(user=user)
    assert token.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert plaintext not in str(token.__dict__)
    assert token.scopes == ["read"]
    assert timedelta(days=6) < token.expires_at - timezone.now() <= timedelta(days=7)
    event = AuditEvent.objects.get(action="token.create")
    assert plaintext not in str(event.after) and plaintext[:20] not in str(event.after)


def test_create_api_token_refuses_unknown_users_and_scopes(user):
    with pytest.raises(CommandError, match="no user"):
        call_command("create_api_token", "nobody", stdout=StringIO(), stderr=StringIO())
    with pytest.raises(CommandError, match="unknown scope"):
        call_command(
            "create_api_token", "alice", "--scope", "root", stdout=StringIO(), stderr=StringIO()
        )
    assert ApiToken.objects.count() == 0


def test_a_valid_token_authenticates_and_records_last_use(client, user, token_for):
    plaintext = token_for(user)
    resp = client.get("/api/v1/models", headers={"Authorization": f"Bearer {plaintext}"})
    assert resp.status_code == 200
    assert ApiToken.objects.get().last_used_at is not None


@pytest.mark.parametrize(
    "header",
    ["Bearer mlcp_000000000000_wrong", "Bearer nonsense", "Bearer", "Bearer a b", "Token abc"],
)
def test_bad_tokens_are_401(client, user, token_for, header):
    token_for(user)
    resp = client.get("/api/v1/models", headers={"Authorization": header})
    assert resp.status_code in (401, 403)
    assert resp.json()["error"]["code"] in ("authentication_failed", "not_authenticated")


def test_a_tampered_secret_with_a_valid_key_id_is_refused(client, user, token_for):
    plaintext = token_for(user)
    resp = client.get("/api/v1/models", headers={"Authorization": f"Bearer {plaintext[:-2]}xx"})
    assert resp.status_code == 401


def test_revoked_and_expired_tokens_are_refused(client, user, token_for):
    revoked = token_for(user)
    api_token_revoke(token_id=ApiToken.objects.get().pk, actor=user)
    assert (
        client.get("/api/v1/models", headers={"Authorization": f"Bearer {revoked}"}).status_code
        == 401
    )
    expired = token_for(user, expires_in_days=1)
    ApiToken.objects.filter(revoked_at__isnull=True).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert (
        client.get("/api/v1/models", headers={"Authorization": f"Bearer {expired}"}).status_code
        == 401
    )
    assert AuditEvent.objects.filter(action="token.revoke").count() == 1


def test_tokens_of_inactive_users_are_refused(client, user, token_for):
    plaintext = token_for(user)
    user.is_active = False
    user.save()
    assert (
        client.get("/api/v1/models", headers={"Authorization": f"Bearer {plaintext}"}).status_code
        == 401
    )


def test_a_read_only_token_cannot_write(api_as, user, model_name):
    read_only = api_as(user, ["read"])
    assert read_only.get("/api/v1/models").status_code == 200
    resp = read_only.post("/api/v1/models", {"name": model_name})
    assert resp.status_code == 403
    assert "registry:write" in resp.json()["error"]["message"]


def test_a_deploy_only_token_cannot_touch_the_registry(api_as, user, model_name):
    deploy_only = api_as(user, ["deploy"])
    assert deploy_only.get("/api/v1/models").status_code == 403  # no read scope either
    assert deploy_only.post("/api/v1/models", {"name": model_name}).status_code == 403


def test_session_users_need_csrf_for_api_writes(user, model_name):
    from django.test import Client

    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.force_login(user)
    resp = csrf_client.post("/api/v1/models", {"name": model_name}, content_type="application/json")
    assert resp.status_code == 403


def test_cli_tokens_expire_by_default_like_ui_tokens(user, settings):
    settings.CONTROLPLANE_TOKEN_DEFAULT_DAYS = 30
    call_command("create_api_token", "alice", stdout=StringIO(), stderr=StringIO())
    token = ApiToken.objects.get(user=user)
    assert timedelta(days=29) < token.expires_at - timezone.now() <= timedelta(days=30)
    call_command("create_api_token", "alice", "--no-expiry", stdout=StringIO(), stderr=StringIO())
    assert ApiToken.objects.filter(user=user, expires_at=None).count() == 1


def test_create_api_token_in_the_wrong_data_dir_is_one_line_and_creates_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")
    }
    env["CONTROLPLANE_DATA_DIR"] = str(tmp_path / "elsewhere")
    out = subprocess.run(
        [sys.executable, str(root / "manage.py"), "create_api_token", "admin"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "CONTROLPLANE_DATA_DIR" in lines[0] and "DATABASE_URL" in lines[0]
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "var").exists()

    # A database without the control plane's tables (DATABASE_URL to the wrong one).
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    out = subprocess.run(
        [sys.executable, str(root / "manage.py"), "create_api_token", "admin"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in out.stderr.strip().splitlines() if "AXES: BEGIN" not in line]
    assert out.returncode != 0 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "no control plane tables" in lines[0] and "CONTROLPLANE_DATA_DIR" in lines[0]
