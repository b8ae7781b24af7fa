"""The one error type of the server; `app` turns it into `{"error": {"code", "message"}}`."""

from __future__ import annotations


class ServingError(Exception):
    """A request the server refuses, with the HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(code: str, message: str) -> ServingError:
    return ServingError(400, code, message)
