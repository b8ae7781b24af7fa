"""OpenAPI schema generation tweaks (drf-spectacular)."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema


class AutoSchema(SpectacularAutoSchema):
    """Names nested ``InputSerializer``/``OutputSerializer`` classes after their
    API view (``ModelListApi.InputSerializer`` → ``ModelListInput``), so the
    style guide's one-view-one-input pattern gives unique component names."""

    def get_serializer_name(self, serializer, direction):
        cls = serializer.__class__
        owner, _, inner = cls.__qualname__.rpartition(".")
        if owner:
            return owner.removesuffix("Api") + inner.removesuffix("Serializer")
        return super().get_serializer_name(serializer, direction)


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API token: `mlcp_...`"}
