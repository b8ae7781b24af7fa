"""Token plaintext never shows up where it could leak: logs, audit rows,
error bodies, API responses."""

from __future__ import annotations

import logging

import pytest

from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def test_tokens_do_not_leak_into_logs_audit_or_responses(
    client, user, token_for, caplog, model_name
):
    caplog.set_level(logging.DEBUG)
    good = token_for(user)
    bad = good[:-4] + "zzzz"
    bodies = []
    for token in (good, bad):
        headers = {"Authorization": f"Bearer {token}"}
        for resp in (
            client.get("/api/v1/models", headers=headers),
            client.post(
                "/api/v1/models",
                {"name": model_name},
                content_type="application/json",
                headers=headers,
            ),
            client.post(
                "/api/v1/models", "{oops", content_type="application/json", headers=headers
            ),
            client.get("/api/v1/models/nope/versions/1", headers=headers),
            client.get("/api/v1/no-such-route", headers=headers),
        ):
            bodies.append(resp.content.decode(errors="replace"))
    secret_part = good.split("_", 2)[2]
    for text in [
        *bodies,
        caplog.text,
        *(str(e.before) + str(e.after) for e in AuditEvent.objects.all()),
    ]:
        assert secret_part not in text
    assert any(
        "model.create" == e.action for e in AuditEvent.objects.all()
    )  # the audit path did run
