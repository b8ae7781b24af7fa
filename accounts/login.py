"""Failed logins, recorded in the audit log: who was tried and from where, never
the password. Django sends ``user_login_failed`` for every failed password check
(the login page, the admin, and logins django-axes refuses during a lockout)."""

from __future__ import annotations

from django.db import transaction

from audit.services import audit_record
from controlplane.lib.middleware import client_address

USERNAME_MAX = 150


@transaction.atomic
def login_failure_record(*, username: str, source_address: str | None, locked_out: bool) -> None:
    username = (username or "")[:USERNAME_MAX]
    audit_record(
        actor=None,
        action="login.failed",
        object_type="user",
        object_id=username or "-",
        object_repr=username,
        after={"username": username, "source_address": source_address, "locked_out": locked_out},
        system="login",
    )


def on_user_login_failed(sender, credentials: dict, request=None, **kwargs) -> None:  # noqa: ARG001
    login_failure_record(
        username=str(credentials.get("username", "")),
        source_address=client_address(request) if request is not None else None,
        locked_out=bool(getattr(request, "axes_locked_out", False)),
    )
