"""Deny by default: every route refuses anonymous callers but an explicit public list."""

from __future__ import annotations

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver

pytestmark = pytest.mark.django_db

PUBLIC = {
    "/healthz",
    "/login/",
    "/logout/",
    "/admin/login/",
    "/admin/logout/",
    "/oidc/sign-in/",  # single sign-on: to the provider, and back
    "/oidc/callback/",
    "/favicon.ico",  # a redirect to the static icon
    "/models/",  # a redirect to the models list, which asks for a login
}


def _walk(patterns, prefix=""):
    for p in patterns:
        if isinstance(p, URLResolver):
            yield from _walk(p.url_patterns, prefix + str(p.pattern))
        elif isinstance(p, URLPattern):
            yield prefix + str(p.pattern)


def _concrete(route: str) -> str:
    route = re.sub(r"<int:[^>]+>", "1", route)
    route = re.sub(r"<(?:str|slug|path):[^>]+>|<[^>]+>", "x", route)
    route = route.replace("^", "").replace("$", "").replace("\\Z", "")
    route = re.sub(r"\(\?P<[^>]+>[^)]*\)", "x", route)
    return "/" + route


def all_routes() -> list[str]:
    return sorted({_concrete(r) for r in _walk(get_resolver().url_patterns)})


def test_the_route_walk_finds_the_api():
    routes = all_routes()
    assert "/api/v1/models" in routes and "/api/v1/models/x/aliases/x" in routes


@pytest.mark.parametrize("method", ["get", "post", "patch", "delete"])
def test_every_route_refuses_anonymous_callers(client, method):
    leaks = []
    for route in all_routes():
        if route in PUBLIC or route.startswith("/static/"):
            continue
        resp = getattr(client, method)(route)
        if resp.status_code in (401, 403, 405):
            continue
        if resp.status_code == 302 and "/login/" in resp["Location"]:
            continue
        leaks.append((route, resp.status_code))
    assert leaks == []


def test_api_errors_for_anonymous_callers_are_json(client):
    resp = client.get("/api/v1/models")
    assert resp.status_code in (401, 403)
    assert resp.json()["error"]["code"] == "not_authenticated"


def test_every_openapi_path_refuses_anonymous_callers(client, user):
    client.force_login(user)
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    client.logout()
    assert paths
    for path, ops in paths.items():
        concrete = re.sub(r"\{[^}]+\}", "1", path)
        for method in ops:
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            resp = getattr(client, method)(concrete)
            assert resp.status_code in (401, 403), (method, path, resp.status_code)


def test_favicon_and_models_path_answer(client, django_user_model):
    resp = client.get("/favicon.ico")
    assert resp.status_code == 301 and resp["Location"].endswith("controlplane/favicon.ico")
    from django.contrib.staticfiles import finders

    icon = finders.find("controlplane/favicon.ico")
    assert icon and open(icon, "rb").read(4) == b"\x00\x00\x01\x00"  # an ICO file
    resp = client.get("/models/")
    assert resp.status_code == 302 and resp["Location"] == "/"
