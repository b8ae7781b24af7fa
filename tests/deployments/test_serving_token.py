"""The model servers' admin token: derived per deployment unless an operator sets one.

That the servers require it and the monitoring pull sends it is proven with real servers
in test_lifecycle.py (both runtimes) and test_docker_runtime.py."""

from __future__ import annotations

from deployments.serving_token import serving_admin_token, serving_admin_tokens


def test_the_derived_token_is_stable_and_differs_per_deployment(settings):
    settings.CONTROLPLANE_SERVING_ADMIN_TOKEN = None
    token = serving_admin_token("churn")

    assert token == serving_admin_token("churn")  # a restarted control plane derives the same
    assert token != serving_admin_token("fraud")
    assert len(token) == 64 and int(token, 16) >= 0
    assert settings.SECRET_KEY not in token


def test_the_derived_token_depends_on_the_secret_key(settings):
    settings.CONTROLPLANE_SERVING_ADMIN_TOKEN = None
    before = serving_admin_token("churn")
    settings.SECRET_KEY = "another-secret-key-of-at-least-32-characters"

    assert serving_admin_token("churn") != before


def test_a_configured_token_is_every_servers_token(settings):
    settings.CONTROLPLANE_SERVING_ADMIN_TOKEN = "operator-chosen-admin-token-0123456789"

    assert serving_admin_token("churn") == serving_admin_token("fraud")
    assert serving_admin_token("churn") == "operator-chosen-admin-token-0123456789"


def test_after_a_key_rotation_the_old_keys_tokens_come_after_the_new_one(settings):
    settings.CONTROLPLANE_SERVING_ADMIN_TOKEN = None
    old = serving_admin_token("churn")
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "another-secret-key-of-at-least-32-characters"

    assert serving_admin_tokens("churn") == [serving_admin_token("churn"), old]
    settings.CONTROLPLANE_SERVING_ADMIN_TOKEN = "operator-chosen-admin-token-0123456789"
    assert serving_admin_tokens("churn") == ["operator-chosen-admin-token-0123456789"]
