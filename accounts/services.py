from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from controlplane.lib.errors import ApplicationError, Conflict, Forbidden, NotFound

from .models import ApiToken
from .permissions import ADMIN_ROLE, ROLES, Right, user_can, user_scopes
from .scopes import ALL_SCOPES

TOKEN_PREFIX = "mlcp_"


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    plaintext: str  # shown once, never stored


@transaction.atomic
def api_token_create(
    *,
    user: AbstractBaseUser,
    name: str,
    scopes: list[str] | None = None,
    expires_in_days: int | None = None,
    actor: AbstractBaseUser | None = None,
) -> IssuedToken:
    """A token for ``user``; ``scopes`` default to every scope the user holds.
    A scope the user's roles do not carry is refused (a token never exceeds
    its owner, and it is intersected with the owner's rights on every request)."""
    allowed = user_scopes(user)
    scopes = sorted(set(scopes if scopes is not None else allowed))
    unknown = [s for s in scopes if s not in ALL_SCOPES]
    if unknown:
        raise ApplicationError(
            f"unknown scope(s): {', '.join(unknown)}; valid scopes: {', '.join(ALL_SCOPES)}",
            code="invalid_scope",
        )
    if not scopes:
        raise ApplicationError(
            "a token needs at least one scope"
            + ("" if allowed else f"; {user.get_username()} has no role that grants one"),
            code="invalid_scope",
        )
    lacking = [s for s in scopes if s not in allowed]
    if lacking:
        raise Forbidden(
            f"{user.get_username()} lacks the scope(s) {', '.join(lacking)}: a token cannot "
            f"have more rights than its owner (allowed: {', '.join(allowed) or 'none'})",
            code="scope_not_held",
        )
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ApplicationError("token name must be 1 to 100 characters", code="invalid_name")
    if expires_in_days is not None and not (1 <= expires_in_days <= 3650):
        raise ApplicationError("expires_in_days must be between 1 and 3650", code="invalid_expiry")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    plaintext = f"{TOKEN_PREFIX}{key_id}_{secret}"
    token = ApiToken.objects.create(
        user=user,
        name=name,
        key_id=key_id,
        key_hash=_digest(plaintext),
        scopes=scopes,
        expires_at=timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None,
    )
    audit_record(
        actor=actor or user,
        action="token.create",
        object_type="api_token",
        object_id=token.pk,
        object_repr=str(token),
        after={
            "user": user.get_username(),
            "name": name,
            "scopes": scopes,
            "expires_at": token.expires_at.isoformat() if token.expires_at else None,
        },
    )
    return IssuedToken(token=token, plaintext=plaintext)


@transaction.atomic
def api_token_revoke(*, token_id: int, actor: AbstractBaseUser) -> ApiToken:
    token = ApiToken.objects.select_for_update().filter(pk=token_id).first()
    if token is None or (token.user_id != actor.pk and not user_can(actor, Right.MANAGE_USERS)):
        raise NotFound("token not found")
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            action="token.revoke",
            object_type="api_token",
            object_id=token.pk,
            object_repr=str(token),
            before={"revoked": False},
            after={"revoked": True},
        )
    return token


def api_token_authenticate(plaintext: str) -> ApiToken | None:
    """The active token for ``plaintext``, or None. Compares digests in constant time."""
    if not plaintext.startswith(TOKEN_PREFIX):
        return None
    key_id, _, secret = plaintext[len(TOKEN_PREFIX) :].partition("_")
    if not key_id or not secret or len(key_id) > 16:
        return None
    token = ApiToken.objects.select_related("user").filter(key_id=key_id).first()
    if token is None:
        hmac.compare_digest(_digest(plaintext), _digest("x"))  # same work either way
        return None
    if not hmac.compare_digest(token.key_hash, _digest(plaintext)):
        return None
    if not token.is_active or not token.user.is_active:
        return None
    now = timezone.now()
    # Avoid a write per request: last-used is precise to a minute.
    if token.last_used_at is None or now - token.last_used_at > timedelta(seconds=60):
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


# --- users and roles ----------------------------------------------------------------------


def _check_roles(roles: list[str]) -> list[str]:
    roles = sorted(set(roles))
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ApplicationError(
            f"unknown role(s): {', '.join(unknown)}; roles are: {', '.join(ROLES)}",
            code="invalid_role",
        )
    if not roles:
        raise ApplicationError(f"give at least one role: {', '.join(ROLES)}", code="invalid_role")
    return roles


@transaction.atomic
def user_create(
    *,
    username: str,
    password: str,
    roles: list[str],
    actor: AbstractBaseUser | None = None,
) -> AbstractBaseUser:
    """A user with ``roles`` (groups of the role table). The ``admin`` role also
    opens the admin site (staff). The password must pass Django's validators."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError

    if actor is not None and not user_can(actor, Right.MANAGE_USERS):
        raise Forbidden("creating users needs the admin role", code="not_admin")
    roles = _check_roles(roles)
    User = get_user_model()
    username = (username or "").strip()
    try:
        User.username_validator(username)
    except ValidationError as exc:
        raise ApplicationError(" ".join(exc.messages), code="invalid_username") from None
    if not username or len(username) > 150:
        raise ApplicationError("username must be 1 to 150 characters", code="invalid_username")
    if User.objects.filter(username=username).exists():
        raise Conflict(f"a user named {username!r} already exists", code="user_exists")
    candidate = User(username=username)
    try:
        validate_password(password, user=candidate)
    except ValidationError as exc:
        raise ApplicationError(" ".join(exc.messages), code="weak_password") from None
    user = User.objects.create_user(
        username=username, password=password, is_staff=ADMIN_ROLE in roles
    )
    user.groups.set(Group.objects.filter(name__in=roles))
    audit_record(
        actor=actor,
        action="user.create",
        object_type="user",
        object_id=user.pk,
        object_repr=username,
        after={"username": username, "roles": roles, "staff": user.is_staff},
        system="cli" if actor is None else None,
    )
    return user


# --- MLflow credentials --------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedMlflowCredential:
    username: str
    password: str  # shown once, never stored by the control plane
    permission: str  # "EDIT" (experiments and runs) or "READ"
    tracking_uri: str
    created: bool


def mlflow_permission_for(user: AbstractBaseUser) -> str | None:
    """What a user may do on the MLflow server: EDIT (log runs and models) if they may
    register versions, READ if they may read the registry, nothing otherwise. Registered
    models stay READ for everyone: aliases move through the control plane's approvals."""
    if user_can(user, Right.REGISTRY_WRITE):
        return "EDIT"
    if user_can(user, Right.READ):
        return "READ"
    return None


@transaction.atomic
def mlflow_credential_issue(
    *, user: AbstractBaseUser, actor: AbstractBaseUser
) -> IssuedMlflowCredential:
    """Create (or reset) the user's own user on the MLflow server, with a new password."""
    from django.conf import settings

    from registry.mlflow_store import MlflowStoreError, get_store

    permission = mlflow_permission_for(user)
    if permission is None:
        raise ApplicationError(
            "your role gives no access to the registry, so no MLflow credential",
            code="permission_denied",
            status_code=403,
        )
    username = user.get_username()
    if username == settings.MLFLOW_TRACKING_USERNAME:
        raise ApplicationError(
            f"{username!r} is the control plane's own MLflow user", code="reserved_username"
        )
    password = secrets.token_urlsafe(24)
    audit_record(
        actor=actor,
        action="mlflow_credential.issue",
        object_type="user",
        object_id=user.pk,
        object_repr=username,
        after={"mlflow_username": username, "permission": permission},
    )
    try:
        created = get_store().auth_user_set(username, password, can_edit=permission == "EDIT")
    except MlflowStoreError as exc:
        status = 503 if exc.kind == "unavailable" else 409
        raise ApplicationError(
            str(exc), code="mlflow_credentials_unavailable", status_code=status
        ) from exc
    return IssuedMlflowCredential(
        username=username,
        password=password,
        permission=permission,
        tracking_uri=settings.MLFLOW_TRACKING_URI,
        created=created,
    )
