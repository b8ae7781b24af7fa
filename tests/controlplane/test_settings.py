"""Configuration is parsed strictly: a bad value stops start-up with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from controlplane.lib.env import database_from_url, env_bool, env_int

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("raw", "value"), [("true", True), ("0", False), ("Yes", True), ("off", False)]
)
def test_booleans_parse(monkeypatch, raw, value):
    monkeypatch.setenv("X_FLAG", raw)
    assert env_bool("X_FLAG", not value) is value


def test_a_bad_boolean_raises(monkeypatch):
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="X_FLAG='maybe' is not a boolean"):
        env_bool("X_FLAG", False)


def test_integers_are_range_checked(monkeypatch):
    monkeypatch.setenv("X_N", "0")
    with pytest.raises(ImproperlyConfigured, match="below the minimum"):
        env_int("X_N", 5, minimum=1)
    monkeypatch.setenv("X_N", "ten")
    with pytest.raises(ImproperlyConfigured, match="not an integer"):
        env_int("X_N", 5)


def test_secrets_can_come_from_files(monkeypatch, tmp_path):
    (tmp_path / "flag").write_text("true\n")
    monkeypatch.setenv("X_FLAG_FILE", str(tmp_path / "flag"))
    assert env_bool("X_FLAG", False) is True


def test_database_urls():
    pg = database_from_url("postgres://u:p%40ss@db.example:5433/cp?sslmode=require")
    assert (pg["ENGINE"], pg["NAME"], pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"]) == (
        "django.db.backends.postgresql",
        "cp",
        "u",
        "p@ss",
        "db.example",
        "5433",
    )
    assert pg["OPTIONS"] == {"sslmode": "require"}
    assert database_from_url("sqlite:////var/x.db")["NAME"] == "/var/x.db"
    with pytest.raises(ImproperlyConfigured, match="not supported"):
        database_from_url("mysql://x/y")


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("DEBUG", "sure", "DEBUG='sure' is not a boolean"),
        ("DATABASE_URL", "oracle://x/y", "not supported"),
        ("SECRET_KEY", "short", "at least 32 characters"),
        ("CONTROLPLANE_DEFAULT_RUNTIME", "k8s", "must be one of"),
        ("CONTROLPLANE_RAY_INGRESS", "always", "must be one of"),
    ],
)
def test_bad_configuration_stops_start_up_with_a_clear_message(tmp_path, var, value, message):
    env = {
        **os.environ,
        "CONTROLPLANE_DATA_DIR": str(tmp_path),
        var: value,
        "DJANGO_SETTINGS_MODULE": "controlplane.settings.base",
    }
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr


def test_healthz_is_public_and_reports_ok(client, db):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}
    assert resp["X-Request-Id"]


def test_request_ids_are_echoed(client, db):
    assert client.get("/healthz", headers={"X-Request-Id": "abc-123"})["X-Request-Id"] == "abc-123"
    assert (
        client.get("/healthz", headers={"X-Request-Id": "bad id\n"})["X-Request-Id"] != "bad id\n"
    )
