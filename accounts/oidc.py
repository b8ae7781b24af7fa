"""Single sign-on with OpenID Connect (mozilla-django-oidc does the protocol).

What is ours: who a provider's user is here (found by the ``sub`` claim, see
``OidcIdentity``) and which roles they get. Roles come from one claim (default
``groups``) through ``CONTROLPLANE_OIDC_ROLE_MAP`` and are set again at every
sign-in, so the provider stays the source of truth: removing someone from a group
there takes the role away at their next sign-in. A user none of whose groups map
gets ``CONTROLPLANE_OIDC_DEFAULT_ROLE`` (none unless set to ``viewer``).
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.db import transaction
from django.http import Http404
from django.utils import timezone
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.views import (
    OIDCAuthenticationCallbackView,
    OIDCAuthenticationRequestView,
)

from audit.services import audit_record

from .models import OidcIdentity
from .permissions import ADMIN_ROLE, ROLES

_USERNAME_UNSAFE = re.compile(r"[^\w.@+-]")


def role_map_parse(text: str) -> dict[str, list[str]]:
    """``"idp-group=role,other=role2"`` -> {group: [roles]}; an unknown role is an error."""
    mapping: dict[str, list[str]] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        group, sep, role = item.rpartition("=")
        group, role = group.strip(), role.strip()
        if not sep or not group or not role:
            raise ImproperlyConfigured(f"CONTROLPLANE_OIDC_ROLE_MAP: {item!r} is not GROUP=ROLE")
        if role not in ROLES:
            raise ImproperlyConfigured(
                f"CONTROLPLANE_OIDC_ROLE_MAP: {role!r} is not a role ({', '.join(ROLES)})"
            )
        mapping.setdefault(group, []).append(role)
    return mapping


def roles_from_claims(
    claims: dict[str, Any], *, claim: str, mapping: dict[str, list[str]], default: str
) -> list[str]:
    """Our roles for a user with these claims. The claim may be a list or one string."""
    value = claims.get(claim)
    groups = [value] if isinstance(value, str) else list(value or [])
    roles = sorted({role for group in groups for role in mapping.get(str(group), [])})
    if not roles and default:
        roles = [default]
    return roles


def _free_username(wanted: str) -> str:
    User = get_user_model()
    base = (_USERNAME_UNSAFE.sub("-", wanted) or "user")[:140]
    name, n = base, 1
    while User.objects.filter(username=name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


class RoleMappingBackend(OIDCAuthenticationBackend):
    """mozilla-django-oidc's backend, finding users by subject and mapping roles."""

    def verify_claims(self, claims: dict[str, Any]) -> bool:
        return bool(claims.get("sub"))

    def filter_users_by_claims(self, claims: dict[str, Any]):
        return get_user_model().objects.filter(oidc_identity__subject=str(claims["sub"]))

    @transaction.atomic
    def create_user(self, claims: dict[str, Any]):
        User = get_user_model()
        sub = str(claims["sub"])
        wanted = str(claims.get(settings.CONTROLPLANE_OIDC_USERNAME_CLAIM) or "") or sub
        user = User.objects.create_user(
            username=_free_username(wanted), email=str(claims.get("email") or "")
        )  # no password: it signs in only through the provider
        OidcIdentity.objects.create(user=user, subject=sub)
        audit_record(
            actor=None,
            action="user.create",
            object_type="user",
            object_id=user.pk,
            object_repr=user.get_username(),
            after={"username": user.get_username(), "oidc_subject": sub},
            system="oidc",
        )
        return self.update_user(user, claims)

    @transaction.atomic
    def update_user(self, user, claims: dict[str, Any]):
        roles = roles_from_claims(
            claims,
            claim=settings.CONTROLPLANE_OIDC_ROLES_CLAIM,
            mapping=role_map_parse(settings.CONTROLPLANE_OIDC_ROLE_MAP),
            default=settings.CONTROLPLANE_OIDC_DEFAULT_ROLE,
        )
        before = sorted(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
        if before != roles or user.is_staff != (ADMIN_ROLE in roles):
            # Only role groups are the provider's; other groups an admin gave are kept.
            user.groups.remove(*Group.objects.filter(name__in=ROLES).exclude(name__in=roles))
            user.groups.add(*Group.objects.filter(name__in=roles))
            user.is_staff = ADMIN_ROLE in roles
            user.save(update_fields=["is_staff"])
            audit_record(
                actor=None,
                action="user.roles",
                object_type="user",
                object_id=user.pk,
                object_repr=user.get_username(),
                before={"roles": before},
                after={"roles": roles},
                system="oidc",
            )
        OidcIdentity.objects.filter(user=user).update(last_login_at=timezone.now())
        return user

    def get_or_create_user(self, access_token, id_token, payload):
        if not settings.CONTROLPLANE_OIDC_ENABLED:
            raise SuspiciousOperation("single sign-on is not configured")
        return super().get_or_create_user(access_token, id_token, payload)


class _OnlyWhenConfigured:
    def dispatch(self, request, *args, **kwargs):
        if not settings.CONTROLPLANE_OIDC_ENABLED:
            raise Http404("single sign-on is not configured")
        return super().dispatch(request, *args, **kwargs)


class SignInView(_OnlyWhenConfigured, OIDCAuthenticationRequestView):
    """Redirects to the provider's sign-in page."""

    def __init__(self, *args, **kwargs) -> None:  # the parent reads settings that may be absent
        if settings.CONTROLPLANE_OIDC_ENABLED:
            super().__init__(*args, **kwargs)


class CallbackView(_OnlyWhenConfigured, OIDCAuthenticationCallbackView):
    """Where the provider sends the browser back with a code."""
