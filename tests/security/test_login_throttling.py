"""Login: wrong passwords are throttled (django-axes) and audited; API tokens and
already-open sessions are not affected; passwords must pass Django's full set of
validators."""

from __future__ import annotations

import json

import pytest
from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError

from audit.models import AuditEvent

pytestmark = pytest.mark.django_db

WRONG = "not-the-password-9f3k"


def _login(client, username: str, password: str):
    return client.post("/login/", {"username": username, "password": password})


def test_the_login_is_locked_after_n_wrong_passwords_even_for_the_right_one(client, user):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        resp = _login(client, "alice", WRONG)
        assert resp.status_code == 200  # the form again, with its error
    assert _login(client, "alice", WRONG).status_code == 429
    resp = _login(client, "alice", "pw-alice-123")
    assert resp.status_code == 429
    assert "_auth_user_id" not in client.session


def test_a_correct_password_before_the_limit_logs_in_and_resets_the_count(client, user):
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        _login(client, "alice", WRONG)
    resp = _login(client, "alice", "pw-alice-123")
    assert resp.status_code == 302 and client.session["_auth_user_id"] == str(user.pk)
    client.logout()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login(client, "alice", WRONG).status_code == 200


def test_failed_logins_are_audited_with_the_username_and_address_never_the_password(client, user):
    for _ in range(settings.AXES_FAILURE_LIMIT + 2):
        _login(client, "alice", WRONG)
    _login(client, "nobody-here", WRONG)
    rows = list(AuditEvent.objects.filter(action="login.failed").order_by("id"))
    assert len(rows) == settings.AXES_FAILURE_LIMIT + 3
    assert {r.object_id for r in rows} == {"alice", "nobody-here"}
    assert {r.source_address for r in rows} == {"127.0.0.1"}
    assert all(r.after["source_address"] == "127.0.0.1" for r in rows)
    assert [r.after["locked_out"] for r in rows if r.object_id == "alice"][-1] is True
    assert all(r.actor is None and r.actor_label == "system:login" for r in rows)
    for row in rows:
        assert WRONG not in json.dumps([row.before, row.after, row.object_repr])


def test_a_lockout_does_not_touch_token_calls_sessions_or_other_users(
    client, user, other_user, token_for
):
    from django.test import Client

    token = token_for(user)
    session_client = Client()
    session_client.force_login(user)
    for _ in range(settings.AXES_FAILURE_LIMIT + 1):
        _login(client, "alice", WRONG)
    assert _login(client, "alice", "pw-alice-123").status_code == 429
    # The token owner keeps working through the API, from the same address.
    for _ in range(3):
        resp = client.get("/api/v1/models", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200
    assert session_client.get("/api/v1/models").status_code == 200
    # A lockout is for one username from one address: carol still logs in from here.
    assert _login(Client(), "carol", "pw-carol-123").status_code == 302


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("Xq7-short", "too short"),
        ("839201748362915", "entirely numeric"),
        ("password12345", "too common"),
        ("alice-smith-example", "too similar"),
    ],
)
def test_weak_passwords_are_refused_by_the_validators(django_user_model, password, fragment):
    person = django_user_model(username="alice-smith", email="alice-smith@example.com")
    with pytest.raises(ValidationError) as info:
        validate_password(password, user=person)
    assert any(fragment in m for m in info.value.messages), info.value.messages


def test_a_strong_password_passes_and_the_admin_form_applies_the_validators(
    admin_client, django_user_model
):
    validate_password("correct horse battery staple 7", user=django_user_model(username="x"))
    resp = admin_client.post(
        "/admin/auth/user/add/",
        {"username": "dave", "password1": "12345678901234", "password2": "12345678901234"},
    )
    assert (
        resp.status_code == 200 and not django_user_model.objects.filter(username="dave").exists()
    )
    assert b"entirely numeric" in resp.content
