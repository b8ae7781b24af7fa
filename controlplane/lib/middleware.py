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
