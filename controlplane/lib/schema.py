"""OpenAPI schema generation tweaks (drf-spectacular): the schema says what the
API answers, envelopes and errors included."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from rest_framework import serializers

from controlplane.lib.pagination import Pagination

ERROR_DESCRIPTIONS = {
    "400": "Invalid input (the error's details name the fields).",
    "401": "No credentials, or an invalid, expired or revoked token.",
    "403": "Authenticated, but the token's scopes or the user's rights do not allow it.",
    "404": "No such object (or page).",
    "409": "The change conflicts with the current state.",
    "413": "The body or the upload is larger than the limits allow.",
    "415": "The body is not application/json (multipart/form-data for uploads).",
    "503": "The database or MLflow is unavailable; retry shortly.",
}
_BODY_METHODS = ("POST", "PUT", "PATCH")


class ErrorDetail(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    details = serializers.JSONField(allow_null=True)


class Error(serializers.Serializer):
    """The one error shape: ``{"error": {"code", "message", "details"}}``."""

    error = ErrorDetail()


class AutoSchema(SpectacularAutoSchema):
    """Names nested ``InputSerializer``/``OutputSerializer`` classes after their
    API view (``ModelListApi.InputSerializer`` → ``ModelListInput``), so the
    style guide's one-view-one-input pattern gives unique component names; lists
    answered through ``controlplane.lib.apis.paginate`` are declared as its
    envelope; every operation declares the error responses it can give."""

    def get_serializer_name(self, serializer, direction):
        cls = serializer.__class__
        owner, _, inner = cls.__qualname__.rpartition(".")
        if owner:
            return owner.removesuffix("Api") + inner.removesuffix("Serializer")
        return super().get_serializer_name(serializer, direction)

    def _get_paginator(self):
        paginator = super()._get_paginator()
        if paginator is not None:
            return paginator
        # APIViews paginate by calling the one helper; its envelope is what they answer.
        handler = getattr(self.view, self.method.lower(), None)
        code = getattr(handler, "__code__", None)
        if code is not None and "paginate" in code.co_names:
            return Pagination()
        return None

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        codes = ["400", "401", "403", "404", "503"]
        if self.method != "GET":
            codes += ["409", "415"]
        if self.method in _BODY_METHODS:
            codes.append("413")
        for code in sorted(codes):
            if code not in responses:
                body = self._get_response_for_code(Error, code, direction=direction)
                responses[code] = {**body, "description": ERROR_DESCRIPTIONS[code]}
        return responses


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An API token: `mlcp_...`"}
