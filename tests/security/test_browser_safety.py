"""Browser-facing defences: content types, CSRF, hosts, headers, deploy checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from registry.models import RegisteredModel

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "", "application/xml"],
)
def test_state_changing_api_calls_must_be_json(client, user, token_for, content_type, model_name):
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    body = f'{{"name": "{model_name}"}}'
    resp = client.generic(
        "POST", "/api/v1/models", body, content_type=content_type, headers=headers
    )
    assert resp.status_code == 415
    assert resp.json()["error"]["code"] == "unsupported_media_type"
    assert not RegisteredModel.objects.filter(name=model_name).exists()


def test_json_with_a_charset_is_accepted(client, user, token_for, model_name):
    resp = client.generic(
        "POST",
        "/api/v1/models",
        f'{{"name": "{model_name}"}}',
        content_type="application/json; charset=utf-8",
        headers={"Authorization": f"Bearer {token_for(user)}"},
    )
    assert resp.status_code == 201


def test_an_empty_post_without_content_type_is_refused(client, user, token_for):
    resp = client.generic(
        "POST",
        "/api/v1/promotion-requests/1/approve",
        "",
        content_type="",
        headers={"Authorization": f"Bearer {token_for(user)}"},
    )
    assert resp.status_code == 415


def test_unknown_hosts_are_refused(client):
    resp = client.get("/healthz", headers={"Host": "evil.example"})
    assert resp.status_code == 400


def test_security_headers_are_set(client, user):
    client.force_login(user)
    resp = client.get("/")
    assert resp["X-Content-Type-Options"] == "nosniff"
    assert resp["X-Frame-Options"] == "DENY"
    assert resp["Referrer-Policy"] == "same-origin"
    assert resp["Cross-Origin-Opener-Policy"] == "same-origin"


def test_ui_forms_require_csrf(user):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    resp = browser.post("/models/new", {"model_name": "x"})
    assert resp.status_code == 403


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        "CONTROLPLANE_DATA_DIR": str(tmp_path),
        "SECRET_KEY": "k3J9-production-secret-Qw8zL1mN5pR7tV2xY4bD6fH0jK_aS9dG3hF5jK7lZ",
        "CONTROLPLANE_HSTS_PRELOAD": "true",
        "DEBUG": "false",
        "ALLOWED_HOSTS": "cp.example.com",
        "CONTROLPLANE_TLS": "true",
        "CONTROLPLANE_SSL_REDIRECT": "true",
    }
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "no issues" in proc.stdout


def test_check_deploy_flags_an_insecure_setup(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
        "CONTROLPLANE_DATA_DIR": str(tmp_path),
        "DEBUG": "true",
    }
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "DEBUG" in proc.stderr + proc.stdout
