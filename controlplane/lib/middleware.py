"""Request ids: taken from X-Request-Id when sane, generated otherwise, echoed
back, attached to log records and to audit rows."""

from __future__ import annotations

import logging
import re
import threading
import uuid

_local = threading.local()
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def current_request_id() -> str:
    return getattr(_local, "request_id", "-")


def current_source_address() -> str | None:
    return getattr(_local, "source_address", None)


class RequestIdLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get("X-Request-Id", "")
        request_id = incoming if _VALID.match(incoming) else uuid.uuid4().hex
        request.request_id = request_id
        _local.request_id = request_id
        _local.source_address = client_address(request)
        try:
            response = self.get_response(request)
        finally:
            _local.request_id = "-"
            _local.source_address = None
        response["X-Request-Id"] = request_id
        return response


def client_address(request) -> str | None:
    # REMOTE_ADDR only: X-Forwarded-For is client-controlled unless a trusted
    # proxy rewrites it, and we do not assume one.
    return request.META.get("REMOTE_ADDR") or None


class ApiContentTypeMiddleware:
    """A method an API route does not implement is a 405, whoever asks.

    State-changing API calls must say they send JSON (or a multipart upload).

    Browsers send ``text/plain``, form-encoded and multipart bodies cross-origin
    without a CORS preflight; refusing anything but JSON closes that door
    (cf. CVE-2023-43472) in addition to CSRF checks for session callers.
    """

    ALLOWED = ("application/json", "multipart/form-data")
    UNSAFE = ("POST", "PUT", "PATCH", "DELETE")

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith("/api/"):
            allowed = _allowed_methods(request)
            if allowed is not None and request.method not in allowed:
                # Before any permission or content check: the method does not exist here.
                from controlplane.lib.errors import json_error

                response = json_error(
                    405, "method_not_allowed", f'Method "{request.method}" not allowed.'
                )
                response["Allow"] = ", ".join(allowed)
                return response
        # Anonymous callers are left to the API's own 401/403 (it says less).
        caller = "HTTP_AUTHORIZATION" in request.META or request.user.is_authenticated
        if caller and request.method in self.UNSAFE and request.path.startswith("/api/"):
            has_body = (
                int(request.META.get("CONTENT_LENGTH") or 0) > 0
                or "HTTP_TRANSFER_ENCODING" in request.META
            )
            ctype = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
            if (has_body or request.method != "DELETE") and ctype not in self.ALLOWED:
                from controlplane.lib.errors import json_error

                return json_error(
                    415,
                    "unsupported_media_type",
                    f"Unsupported media type {ctype or '(none)'!r}: send application/json"
                    " (multipart/form-data for uploads).",
                )
        return self.get_response(request)


def _allowed_methods(request) -> list[str] | None:
    """The methods the route's class-based view implements; None when the path is
    no route (its 404 follows) or its view is a function."""
    from django.urls import Resolver404, resolve

    try:
        match = resolve(request.path_info)
    except Resolver404:
        return None
    view_class = getattr(match.func, "view_class", None)
    if view_class is None:
        return None
    return [m.upper() for m in view_class.http_method_names if hasattr(view_class, m)]
