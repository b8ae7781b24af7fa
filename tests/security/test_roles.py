"""The role table: every UI view and API route, as each role, allowed or refused.

The routes come from the URL resolver, so a new route without an entry in
``TABLE`` fails ``test_every_route_has_an_entry``. URL arguments name objects
that do not exist: a caller the permission gate lets through gets a 404 (or a
400 for an empty create form), one it refuses gets a 403 and changes nothing.
What the services decide once the objects exist (a followed alias needs the
deploy right...) is in tests/accounts/test_roles.py.
"""

from __future__ import annotations

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.views import APIView

from accounts.models import ApiToken
from accounts.permissions import user_scopes
from audit.models import AuditEvent
from tests.conftest import with_roles

pytestmark = pytest.mark.django_db

V, MD, D, AP, AD, NONE = "viewer", "model-developer", "deployer", "approver", "admin", "no role"
ROLES = (V, MD, D, AP, AD, NONE)
READERS = frozenset({V, MD, D, AP, AD})
EVERYONE = frozenset(ROLES)
REGISTRY = frozenset({MD, AD})
MOVERS = frozenset({MD, D, AD})  # the gate; the service then asks for deploy on followed aliases
DEPLOYERS = frozenset({D, AD})
APPROVERS = frozenset({AP, AD})
ADMINS = frozenset({AD})

# (url name, method) -> the roles allowed. THE table.
TABLE: dict[tuple[str, str], frozenset[str]] = {
    # --- API: registry
    ("api:api-models", "GET"): READERS,
    ("api:api-models", "POST"): REGISTRY,
    ("api:api-model", "GET"): READERS,
    ("api:api-model", "PATCH"): REGISTRY,
    ("api:api-model", "DELETE"): REGISTRY,
    ("api:api-versions", "GET"): READERS,
    ("api:api-versions", "POST"): REGISTRY,
    ("api:api-version", "GET"): READERS,
    ("api:api-version", "PATCH"): REGISTRY,
    ("api:api-version", "DELETE"): REGISTRY,
    ("api:api-version-bundle", "GET"): READERS,
    ("api:api-alias", "POST"): MOVERS,
    ("api:api-alias", "DELETE"): MOVERS,
    ("api:api-history", "GET"): READERS,
    ("api:api-compare", "GET"): READERS,
    ("api:api-requests", "GET"): READERS,
    ("api:api-request-approve", "POST"): APPROVERS,
    ("api:api-request-reject", "POST"): APPROVERS,
    ("api:api-policies", "GET"): READERS,
    ("api:api-policies", "POST"): ADMINS,
    ("api:api-policy", "GET"): READERS,
    ("api:api-policy", "PATCH"): ADMINS,
    ("api:api-policy", "DELETE"): ADMINS,
    # --- API: deployments
    ("api:api-deployments", "GET"): READERS,
    ("api:api-deployments", "POST"): DEPLOYERS,
    ("api:api-deployment", "GET"): READERS,
    ("api:api-deployment", "PATCH"): DEPLOYERS,
    ("api:api-deployment", "DELETE"): DEPLOYERS,
    ("api:api-revisions", "GET"): READERS,
    ("api:api-events", "GET"): READERS,
    ("api:api-rollback", "POST"): DEPLOYERS,
    ("api:api-logs", "GET"): READERS,
    ("api:api-shadow-promote", "POST"): DEPLOYERS,
    ("api:api-rollout-action", "POST"): DEPLOYERS,
    ("api:api-cluster", "GET"): READERS,
    # --- API: monitoring
    ("api:api-metrics", "GET"): READERS,
    ("api:api-feedback", "POST"): DEPLOYERS,
    ("api:api-probes", "GET"): READERS,
    ("api:api-alert-rules", "GET"): READERS,
    ("api:api-alert-rules", "POST"): DEPLOYERS,
    ("api:api-alert-rule", "GET"): READERS,
    ("api:api-alert-rule", "PATCH"): DEPLOYERS,
    ("api:api-alert-rule", "DELETE"): DEPLOYERS,
    ("api:api-alert-events", "GET"): READERS,
    ("api:api-drift-reference", "GET"): READERS,
    ("api:api-drift-reference", "PUT"): DEPLOYERS,
    # --- API: jobs (owners see their own jobs, admins every job; the kind's right is the
    # service's: batch needs deploy, convert registry write)
    ("api:api-jobs", "GET"): READERS,
    ("api:api-jobs", "POST"): MOVERS,
    ("api:api-job", "GET"): READERS,
    ("api:api-job-cancel", "POST"): MOVERS,
    ("api:api-job-file", "GET"): READERS,
    ("api:api-batch-jobs", "POST"): DEPLOYERS,
    ("api:api-convert", "POST"): REGISTRY,
    # --- UI: registry
    ("registry:model-list", "GET"): READERS,
    ("registry:model-list", "POST"): READERS,  # 405
    ("registry:upload", "GET"): REGISTRY,
    ("registry:upload", "POST"): REGISTRY,
    ("registry:model-detail", "GET"): READERS,
    ("registry:model-detail", "POST"): READERS,  # 405
    ("registry:compare", "GET"): READERS,
    ("registry:compare", "POST"): READERS,  # 405
    ("registry:history", "GET"): READERS,
    ("registry:history", "POST"): READERS,  # 405
    ("registry:promote", "GET"): MOVERS,
    ("registry:promote", "POST"): MOVERS,
    ("registry:version-detail", "GET"): READERS,
    ("registry:version-detail", "POST"): READERS,  # 405
    ("registry:version-archive", "GET"): REGISTRY,
    ("registry:version-archive", "POST"): REGISTRY,
    ("registry:version-delete", "GET"): REGISTRY,
    ("registry:version-delete", "POST"): REGISTRY,
    ("registry:approvals", "GET"): READERS,
    ("registry:approvals", "POST"): READERS,  # 405
    ("registry:approval-decide", "GET"): APPROVERS,  # 405
    ("registry:approval-decide", "POST"): APPROVERS,
    # --- UI: deployments
    ("deployments:deployment-list", "GET"): READERS,
    ("deployments:deployment-list", "POST"): READERS,  # 405
    ("deployments:deployment-create", "GET"): DEPLOYERS,
    ("deployments:deployment-create", "POST"): DEPLOYERS,
    ("deployments:deployment-detail", "GET"): READERS,
    ("deployments:deployment-detail", "POST"): READERS,  # 405
    ("deployments:deployment-logs", "GET"): READERS,
    ("deployments:deployment-logs", "POST"): READERS,  # 405
    ("deployments:deployment-update", "GET"): DEPLOYERS,
    ("deployments:deployment-update", "POST"): DEPLOYERS,
    ("deployments:deployment-scale", "GET"): DEPLOYERS,
    ("deployments:deployment-scale", "POST"): DEPLOYERS,
    ("deployments:deployment-rollback", "GET"): DEPLOYERS,
    ("deployments:deployment-rollback", "POST"): DEPLOYERS,
    ("deployments:deployment-shadow", "GET"): DEPLOYERS,  # 405
    ("deployments:deployment-shadow", "POST"): DEPLOYERS,
    ("deployments:deployment-rollout", "GET"): DEPLOYERS,
    ("deployments:deployment-rollout", "POST"): DEPLOYERS,
    ("deployments:deployment-stop", "GET"): DEPLOYERS,
    ("deployments:deployment-stop", "POST"): DEPLOYERS,
    ("deployments:deployment-start", "GET"): DEPLOYERS,
    ("deployments:deployment-start", "POST"): DEPLOYERS,
    ("deployments:deployment-delete", "GET"): DEPLOYERS,
    ("deployments:deployment-delete", "POST"): DEPLOYERS,
    # --- UI: monitoring
    ("monitoring:overview", "GET"): READERS,
    ("monitoring:overview", "POST"): READERS,  # 405
    ("monitoring:deployment", "GET"): READERS,
    ("monitoring:deployment", "POST"): READERS,  # 405
    ("monitoring:alert-list", "GET"): READERS,
    ("monitoring:alert-list", "POST"): READERS,  # 405
    ("monitoring:alert-create", "GET"): DEPLOYERS,
    ("monitoring:alert-create", "POST"): DEPLOYERS,
    ("monitoring:alert-detail", "GET"): READERS,
    ("monitoring:alert-detail", "POST"): DEPLOYERS,
    ("monitoring:alert-delete", "GET"): DEPLOYERS,
    ("monitoring:alert-delete", "POST"): DEPLOYERS,
    # --- UI: jobs
    ("jobs:job-list", "GET"): READERS,
    ("jobs:job-list", "POST"): READERS,  # 405
    ("jobs:job-detail", "GET"): READERS,
    ("jobs:job-detail", "POST"): READERS,  # 405
    ("jobs:job-cancel", "GET"): MOVERS,  # 405
    ("jobs:job-cancel", "POST"): MOVERS,
    # --- UI: audit and tokens
    ("audit:audit-list", "GET"): ADMINS,
    ("audit:audit-list", "POST"): ADMINS,  # 405
    ("accounts:tokens", "GET"): EVERYONE,  # your own tokens; scopes limited to your roles
    ("accounts:tokens", "POST"): EVERYONE,
    ("accounts:token-revoke", "GET"): EVERYONE,
    ("accounts:token-revoke", "POST"): EVERYONE,
    ("accounts:mlflow-credential", "GET"): EVERYONE,  # says what your role would get
    ("accounts:mlflow-credential", "POST"): READERS,  # READ or EDIT by role; none without one
    ("monitoring:drift-reference-upload", "GET"): DEPLOYERS,  # 405
    ("monitoring:drift-reference-upload", "POST"): DEPLOYERS,
}

# Routes outside the table, and why.
EXEMPT = {
    "healthz": "liveness, no data",
    "favicon": "a redirect to the static icon",
    "models": "a redirect to the models list (which asks for a login)",
    "login": "signing in",
    "logout": "signing out",
    "oidc-sign-in": "signing in (single sign-on; 404 unless configured)",
    "oidc-callback": "signing in (single sign-on; 404 unless configured)",
    "prometheus": "its own bearer token or address allow-list (tests/monitoring)",
    "api:api-prometheus-targets": "the Prometheus token or allow-list, as /metrics",
    "api:api-prometheus-instance-metrics": "the Prometheus token or allow-list, as /metrics",
    "schema": "the OpenAPI document: any authenticated caller",
    "api-docs": "Swagger UI: any authenticated caller",
}
ADMIN_SITE = "admin:"  # the Django admin: its actions are checked in tests/accounts/test_roles.py

UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


def _walk(patterns, prefix: str = "", namespace: str = ""):
    for p in patterns:
        if isinstance(p, URLResolver):
            ns = f"{namespace}{p.namespace}:" if p.namespace else namespace
            yield from _walk(p.url_patterns, prefix + str(p.pattern), ns)
        elif isinstance(p, URLPattern):
            yield f"{namespace}{p.name}", prefix + str(p.pattern), p


def routes() -> dict[str, tuple[str, URLPattern]]:
    found = {}
    for name, route, pattern in _walk(get_resolver().url_patterns):
        if name.startswith(ADMIN_SITE) or name in EXEMPT or route.startswith("static"):
            continue
        found[name] = (route, pattern)
    return found


def methods_of(pattern: URLPattern) -> list[str]:
    """An API view's methods from its class; a UI view: GET and POST (all a form sends)."""
    cls = getattr(pattern.callback, "cls", None)
    if cls is not None and issubclass(cls, APIView):
        return [m.upper() for m in ("get", "post", "put", "patch", "delete") if hasattr(cls, m)]
    return ["GET", "POST"]


def url_for(name: str, route: str) -> str:
    """The route's URL with arguments that name nothing."""
    kwargs = {}
    for converter, arg in re.findall(r"<(?:(\w+):)?(\w+)>", route):
        kwargs[arg] = 999999 if converter == "int" else "nothing-here"
    return reverse(name, kwargs=kwargs)


def test_every_route_has_an_entry():
    expected = {(name, m) for name, (_r, p) in routes().items() for m in methods_of(p)}
    missing = sorted(expected - set(TABLE))
    stale = sorted(set(TABLE) - expected)
    assert not missing, f"routes without an entry in the role table: {missing}"
    assert not stale, f"entries for routes that do not exist: {stale}"


@pytest.fixture
def people(django_user_model):
    made = {}
    for role in ROLES:
        user = django_user_model.objects.create_user(
            username=role.replace(" ", "-"), password="pw-x-12345"
        )
        made[role] = with_roles(user, *([] if role == NONE else [role]))
    return made


def _call(client, method: str, url: str, headers: dict | None = None):
    fn = getattr(client, method.lower())
    if method == "GET":
        return fn(url, headers=headers or {})
    if url.startswith("/api/"):
        return fn(url, data={}, content_type="application/json", headers=headers or {})
    return fn(url, data={}, headers=headers or {})


def _check(resp, *, allowed: bool, what: str, audit_before: int) -> None:
    if allowed:
        assert resp.status_code != 403, f"{what}: refused but the table allows it"
        assert resp.status_code not in (301, 302) or "/login" not in resp.get("Location", ""), (
            f"{what}: sent to the login page"
        )
    else:
        assert resp.status_code == 403, f"{what}: got {resp.status_code}, the table refuses it"
        assert AuditEvent.objects.count() == audit_before, f"{what}: a refusal changed something"


@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_what_the_table_says_in_the_ui_and_the_api(client, people, role):
    user = people[role]
    client.force_login(user)
    checked = 0
    for name, (route, pattern) in sorted(routes().items()):
        url = url_for(name, route)
        for method in methods_of(pattern):
            before = AuditEvent.objects.count()
            resp = _call(client, method, url)
            _check(
                resp,
                allowed=role in TABLE[(name, method)],
                what=f"{role} {method} {url}",
                audit_before=before,
            )
            checked += 1
    assert checked == len(TABLE)


@pytest.mark.parametrize("role", ROLES)
def test_each_roles_token_gets_what_the_table_says_in_the_api(client, people, token_for, role):
    user = people[role]
    held = user_scopes(user)
    if not held:  # nobody can mint a token without a role
        with pytest.raises(Exception, match="no role"):
            token_for(user)
        return
    headers = {"Authorization": f"Bearer {token_for(user, held)}"}
    for name, (route, pattern) in sorted(routes().items()):
        if not route.startswith("api/"):
            continue
        url = url_for(name, route)
        for method in methods_of(pattern):
            before = AuditEvent.objects.count()
            resp = _call(client, method, url, headers)
            _check(
                resp,
                allowed=role in TABLE[(name, method)],
                what=f"{role}'s token {method} {url}",
                audit_before=before,
            )


def test_a_token_with_every_scope_whose_owner_is_a_viewer_only_reads(
    client, people, token_for, django_user_model
):
    from django.contrib.auth.models import Group

    owner = with_roles(
        django_user_model.objects.create_user(username="demoted", password="pw-x-12345"), "admin"
    )
    plaintext = token_for(owner)  # every scope, minted while an admin
    assert sorted(ApiToken.objects.get(user=owner).scopes) == sorted(
        ["read", "registry:write", "deploy", "monitoring:write"]
    )
    owner.groups.set([Group.objects.get(name="viewer")])  # demoted: the token follows at once
    headers = {"Authorization": f"Bearer {plaintext}"}
    writes = 0
    for name, (route, pattern) in sorted(routes().items()):
        if not route.startswith("api/"):
            continue
        url = url_for(name, route)
        for method in methods_of(pattern):
            before = AuditEvent.objects.count()
            resp = _call(client, method, url, headers)
            _check(
                resp,
                allowed=V in TABLE[(name, method)],
                what=f"viewer-owned full token {method} {url}",
                audit_before=before,
            )
            writes += method in UNSAFE
    assert writes >= 20
