"""The bearer token that guards a model server's admin endpoints (``GET /predictions``).

Every server the control plane starts gets one (``SERVING_ADMIN_TOKEN``), and the monitoring
pull sends the same one. Unless an operator sets ``CONTROLPLANE_SERVING_ADMIN_TOKEN`` (one
token for every server), each deployment's token is derived from ``SECRET_KEY`` and the
deployment's name: nothing is stored, a restarted control plane derives the same token for
the servers still running, and one deployment's token opens no other deployment's servers.
"""

from __future__ import annotations

from django.conf import settings
from django.utils.crypto import salted_hmac

_KEY_SALT = "controlplane.deployments.serving_admin_token"


def serving_admin_token(deployment: str) -> str:
    """The admin token of every model server of the deployment named ``deployment``."""
    return serving_admin_tokens(deployment)[0]


def serving_admin_tokens(deployment: str) -> list[str]:
    """The token new servers get, then those servers started before a rotation of
    SECRET_KEY may still hold (derived from SECRET_KEY_FALLBACKS), for the pull to try."""
    if settings.CONTROLPLANE_SERVING_ADMIN_TOKEN:
        return [settings.CONTROLPLANE_SERVING_ADMIN_TOKEN]
    tokens: list[str] = []
    for key in [settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS]:
        # HMAC-SHA256 keyed with a digest of the salt and the key (Django's salted_hmac).
        token = salted_hmac(_KEY_SALT, deployment, secret=key, algorithm="sha256").hexdigest()
        if token not in tokens:
            tokens.append(token)
    return tokens
