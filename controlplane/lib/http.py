"""The one outbound HTTP helper: a mandatory timeout and typed errors.

``address_url`` turns an instance address (``127.0.0.1:PORT`` or ``unix:/path/to.sock``, as
the runtimes report them) into a URL ``request`` can call; ``http+unix://`` URLs go over the
Unix socket named (percent-encoded) in their host part."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection


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


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, socket_path: str, *args, **kwargs) -> None:
        super().__init__("localhost", *args, **kwargs)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, socket_path: str, **kwargs) -> None:
        super().__init__("localhost", **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.socket_path, timeout=self.timeout.connect_timeout)


class _UnixAdapter(requests.adapters.HTTPAdapter):
    """http+unix://<percent-encoded socket path>/<path>: one pool per socket."""

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        socket_path = unquote(urlsplit(request.url).netloc)
        with self._pools_lock:
            pool = self._pools.get(socket_path)
            if pool is None:
                pool = self._pools[socket_path] = _UnixPool(socket_path, maxsize=self._pool_maxsize)
        return pool

    def request_url(self, request, proxies):
        parts = urlsplit(request.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def close(self) -> None:
        with self._pools_lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()
        super().close()

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._pools: dict[str, _UnixPool] = {}
        self._pools_lock = threading.Lock()
        self._pool_maxsize = kwargs.get("maxsize", 10)


def address_url(address: str, path: str = "") -> str:
    """``127.0.0.1:PORT`` -> ``http://127.0.0.1:PORT<path>``; ``unix:/x.sock`` ->
    ``http+unix://%2Fx.sock<path>``."""
    if address.startswith("unix:"):
        return f"http+unix://{quote(address[5:], safe='')}{path}"
    if address.startswith(("http://", "https://", "http+unix://")):
        return f"{address}{path}"
    return f"http://{address}{path}"


_session = requests.Session()
_session.trust_env = False  # no proxies from the environment for calls we make
_session.mount("http+unix://", _UnixAdapter())


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
