"""The one outbound HTTP helper: a mandatory timeout and typed errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests


class HttpError(Exception):
    """Any failure of an outbound call (connection, timeout, bad status)."""


class HttpTimeout(HttpError):
    pass


class HttpConnectionError(HttpError):
    pass


class HttpStatusError(HttpError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_ms: float

    def json(self) -> Any:
        import json

        return json.loads(self.body)


_session = requests.Session()
_session.trust_env = False  # no proxies from the environment for calls we make


def request(
    method: str,
    url: str,
    *,
    timeout: float,
    json: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    allow_redirects: bool = False,
    raise_for_status: bool = True,
) -> HttpResponse:
    if timeout is None or timeout <= 0:
        raise ValueError("timeout is mandatory")
    try:
        resp = _session.request(
            method,
            url,
            json=json,
            data=data,
            headers=headers,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )
    except requests.Timeout as exc:
        raise HttpTimeout(f"{method} {url} timed out after {timeout}s") from exc
    except requests.ConnectionError as exc:
        raise HttpConnectionError(f"{method} {url}: {exc}") from exc
    except requests.RequestException as exc:
        raise HttpError(f"{method} {url}: {exc}") from exc
    result = HttpResponse(
        status=resp.status_code,
        headers=dict(resp.headers),
        body=resp.content,
        elapsed_ms=resp.elapsed.total_seconds() * 1000,
    )
    if raise_for_status and resp.status_code >= 400:
        raise HttpStatusError(resp.status_code, resp.text)
    return result
