"""One error type for domain rule violations and one JSON error shape.

Every API error, whatever raised it, leaves as::

    {"error": {"code": "...", "message": "...", "details": ...}}
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class ApplicationError(Exception):
    """A domain rule was violated; carries the HTTP status it maps to."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid",
        status_code: int = 400,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        self.details = details


class NotFound(ApplicationError):
    def __init__(self, message: str, *, code: str = "not_found", details: Any = None) -> None:
        super().__init__(message, code=code, status_code=404, details=details)


class Conflict(ApplicationError):
    def __init__(self, message: str, *, code: str = "conflict", details: Any = None) -> None:
        super().__init__(message, code=code, status_code=409, details=details)


class Forbidden(ApplicationError):
    def __init__(self, message: str, *, code: str = "forbidden", details: Any = None) -> None:
        super().__init__(message, code=code, status_code=403, details=details)


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def _first_message(detail: Any) -> str:
    if isinstance(detail, dict):
        for key, value in detail.items():
            inner = _first_message(value)
            return inner if key == "non_field_errors" else f"{key}: {inner}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, ApplicationError):
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status_code)
    if isinstance(exc, OperationalError | InterfaceError):
        # The database is unreachable or restarting: transient. A 503 tells clients to
        # retry; a 500 would read as a bug.
        logger.warning("database unavailable: %s", exc)
        response = Response(
            error_body("database_unavailable", "The database is unavailable; retry shortly."),
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
        response["Retry-After"] = "1"
        return response
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        exc = exceptions.ValidationError(detail=detail)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    # Imported here: rest_framework.views pulls in the auth classes, which
    # import services, which import this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a real bug: Django's 500 handler logs it
    if isinstance(exc, exceptions.ValidationError):
        code, message, details = "invalid", _first_message(exc.detail), exc.detail
    else:
        code = getattr(exc, "default_code", "error")
        detail = getattr(exc, "detail", str(exc))
        message, details = str(detail), None
    response.data = error_body(code, message, details)
    return response


def json_error(status_code: int, code: str, message: str) -> JsonResponse:
    return JsonResponse(error_body(code, message), status=status_code)


def _wants_json(request) -> bool:
    return request.path.startswith("/api/") or "application/json" in request.headers.get(
        "Accept", ""
    )


def handler404(request, exception=None):  # noqa: ARG001
    if _wants_json(request):
        return json_error(status.HTTP_404_NOT_FOUND, "not_found", "Not found.")
    from django.shortcuts import render

    return render(
        request, "registry/error.html", {"error": NotFound("Page not found.")}, status=404
    )


def handler500(request):
    if _wants_json(request):
        return json_error(
            status.HTTP_500_INTERNAL_SERVER_ERROR, "server_error", "Internal server error."
        )
    from django.http import HttpResponseServerError

    # No template rendering here: a 500 may come from the template engine itself.
    return HttpResponseServerError(
        "<!doctype html><title>Server error</title><h1>Server error</h1>"
        "<p>Something went wrong on our side. The request id in the X-Request-Id header identifies it in the logs.</p>"
    )
