"""Who may do what: the one permission helper every UI view, API route, admin
action and service asks.

Rights are Django permissions. Roles are Django groups granting rights (the
``ROLES`` table; a migration and every ``migrate`` keep the groups equal to it).
A session user has their roles' rights. A token has its scopes' rights
*intersected* with its owner's current rights, computed on every request from
the database, so demoting the owner takes the token's rights at once.
Superusers have every right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from rest_framework.permissions import SAFE_METHODS, BasePermission

from . import scopes as S


class Right(StrEnum):
    """What a caller may do, as ``app_label.codename`` Django permissions."""

    READ = "accounts.read"
    REGISTRY_WRITE = "accounts.registry_write"
    DEPLOY = "accounts.deploy"
    MONITORING_WRITE = "accounts.monitoring_write"
    APPROVE = "registry.approve_promotion"
    MANAGE_POLICIES = "accounts.manage_policies"
    VIEW_AUDIT = "accounts.view_audit"
    MANAGE_USERS = "accounts.manage_users"


# The custom permissions declared on accounts.Rights (APPROVE lives on registry.PromotionRequest).
RIGHT_LABELS: dict[Right, str] = {
    Right.READ: "Read models, versions, deployments, metrics and alerts",
    Right.REGISTRY_WRITE: "Register, tag, archive, delete versions; move aliases no deployment follows",
    Right.DEPLOY: "Create, update, roll back, stop deployments; move aliases deployments follow",
    Right.MONITORING_WRITE: "Post feedback, manage alert rules and drift references",
    Right.APPROVE: "Approve or reject promotion requests of others",
    Right.MANAGE_POLICIES: "Create, change and delete approval policies",
    Right.VIEW_AUDIT: "Read the audit log",
    Right.MANAGE_USERS: "Create users and give them roles",
}

ADMIN_ROLE = "admin"

# THE role table. ``admin`` also gets every other Django permission (the admin site).
ROLES: dict[str, frozenset[Right]] = {
    "viewer": frozenset({Right.READ}),
    "model-developer": frozenset({Right.READ, Right.REGISTRY_WRITE}),
    "deployer": frozenset({Right.READ, Right.DEPLOY, Right.MONITORING_WRITE}),
    "approver": frozenset({Right.READ, Right.APPROVE}),
    ADMIN_ROLE: frozenset(Right),
}

# What each token scope can carry (always intersected with the owner's rights).
SCOPE_RIGHTS: dict[str, frozenset[Right]] = {
    S.READ: frozenset({Right.READ, Right.VIEW_AUDIT}),
    S.REGISTRY_WRITE: frozenset({Right.REGISTRY_WRITE, Right.APPROVE, Right.MANAGE_POLICIES}),
    S.DEPLOY: frozenset({Right.DEPLOY}),
    S.MONITORING_WRITE: frozenset({Right.MONITORING_WRITE}),
}

# The right an API view needs when it only declares a scope.
SCOPE_DEFAULT_RIGHT: dict[str, Right] = {
    S.READ: Right.READ,
    S.REGISTRY_WRITE: Right.REGISTRY_WRITE,
    S.DEPLOY: Right.DEPLOY,
    S.MONITORING_WRITE: Right.MONITORING_WRITE,
}

TOKEN_ATTR = "api_token"  # set on request.user by BearerTokenAuthentication


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple | set | frozenset) else (value,)


def user_can(user: Any, right: Right | str) -> bool:
    """Whether ``user`` (with the token it authenticated with, if any) holds ``right``."""
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    token = getattr(user, TOKEN_ATTR, None)
    if token is not None and not any(right in SCOPE_RIGHTS.get(s, ()) for s in token.scopes):
        return False
    return user.has_perm(str(right))


def user_can_any(user: Any, rights: Iterable[Right | str]) -> bool:
    return any(user_can(user, right) for right in rights)


def user_rights(user: Any) -> set[Right]:
    return {right for right in Right if user_can(user, right)}


def user_scopes(user: Any) -> list[str]:
    """The token scopes ``user`` may mint: those carrying at least one right they hold."""
    rights = user_rights(user)
    return [scope for scope in S.ALL_SCOPES if SCOPE_RIGHTS[scope] & rights]


def require(user: Any, right: Right | str, message: str | None = None) -> None:
    """Raise ``Forbidden`` unless ``user`` holds ``right``. For services."""
    from controlplane.lib.errors import Forbidden

    if not user_can(user, right):
        raise Forbidden(message or f"your role does not allow this (needs {right})")


# --- API views ----------------------------------------------------------------------------


class HasScope(BasePermission):
    """Deny by default. Safe methods need ``read``; writes need the view's
    ``write_scope`` (one scope or a tuple: any of them) for tokens, and the
    view's ``write_right`` (default: the scope's right; a tuple means any) for
    every caller. A view that declares no write scope allows no writes."""

    message = "Authentication credentials were not provided or lack the required scope."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        if request.method in SAFE_METHODS:
            scopes = _as_tuple(getattr(view, "read_scope", S.READ))
            rights = _as_tuple(getattr(view, "read_right", None))
        else:
            scopes = _as_tuple(getattr(view, "write_scope", None))
            rights = _as_tuple(getattr(view, "write_right", None))
            if not scopes:
                return False  # a view that forgot to declare its scope allows no writes
        if not rights:
            rights = tuple(SCOPE_DEFAULT_RIGHT[s] for s in scopes)
        token = getattr(user, TOKEN_ATTR, None)
        if token is not None and not any(s in token.scopes for s in scopes):
            wanted = "' or '".join(scopes)
            self.message = f"This token lacks the '{wanted}' scope."
            return False
        if not user_can_any(user, rights):
            self.message = forbidden_message(user, rights)
            return False
        return True


def roles_granting(right: Right | str) -> list[str]:
    return [name for name, rights in ROLES.items() if right in rights and name != ADMIN_ROLE]


def forbidden_message(user: Any, rights: Iterable[Right | str]) -> str:
    """Names the roles that would allow it: "... needs the deployer role (or admin)"."""
    roles = [role for right in rights for role in roles_granting(right)]
    needed = " or ".join(dict.fromkeys(roles)) or ADMIN_ROLE
    if getattr(user, TOKEN_ATTR, None) is not None:
        return (
            f"This token's scopes and its owner's roles do not allow this: it needs the "
            f"{needed} role (or admin) and a token scope that carries it."
        )
    return f"Your roles do not allow this: it needs the {needed} role (or admin)."


# --- UI views -----------------------------------------------------------------------------

View = Callable[..., HttpResponse]


def requires(
    *rights: Right, write: Right | tuple[Right, ...] | None = None
) -> Callable[[View], View]:
    """A UI view decorator: log in first; then every method needs one of
    ``rights``, and POST (any unsafe method) also needs one of ``write``."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            needed = rights
            if write is not None and request.method not in SAFE_METHODS:
                needed = _as_tuple(write)
            if needed and not user_can_any(request.user, needed):
                return render(
                    request,
                    "403.html",
                    {"message": forbidden_message(request.user, needed)},
                    status=403,
                )
            return view(request, *args, **kwargs)

        return login_required(wrapper)

    return decorate


# --- roles as groups ----------------------------------------------------------------------


def roles_sync(verbosity: int = 0) -> None:
    """Make the role groups equal to ``ROLES``: create missing permissions and
    groups, set each group's permissions. Idempotent; runs after every ``migrate``
    (the roles migration created the groups first)."""
    from django.apps import apps
    from django.contrib.auth.management import create_permissions

    for config in apps.get_app_configs():
        create_permissions(config, verbosity=verbosity)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")

    def lookup(rights: Iterable[Right]) -> list:
        found = []
        for right in rights:
            app_label, codename = str(right).split(".")
            found.append(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        return found

    for name, rights in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        perms = Permission.objects.all() if name == ADMIN_ROLE else lookup(rights)
        group.permissions.set(perms)


def role_names() -> list[str]:
    return list(ROLES)
