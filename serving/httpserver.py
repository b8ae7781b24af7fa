"""A small HTTP/1.1 server protocol on asyncio + httptools (keep-alive, pipelining, 100-continue).

The protocol knows nothing about models: each complete request goes to `handler.handle(req,
conn)`, which answers now or later with `conn.respond(...)`. Requests of one connection are
answered in order. Each response goes out in a single write on a TCP_NODELAY socket: several
small writes would wait on delayed ACKs (~40 ms).
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
import time
from collections import deque
from typing import Any, Protocol
from urllib.parse import unquote

import httptools

logger = logging.getLogger("serving.http")

REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
# After a 413, the rest of the body is read and dropped for at most this long.
_DISCARD_GRACE_S = 5.0


def no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY on a connection's socket (a Unix socket has none to set): each answer goes
    out in one write and must not wait for the peer's ACK of the last."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class Request:
    """One parsed HTTP request."""

    __slots__ = (
        "method", "path", "query", "headers", "body", "keep_alive", "http10", "started",
        "too_large",
    )  # fmt: skip

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.query = ""
        self.too_large = False

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return value.decode("latin-1") if value is not None else None


class Handler(Protocol):
    max_body_bytes: int
    connections: set[HttpConnection]
    receiving: int
    closing: bool

    def handle(self, req: Request, conn: HttpConnection) -> None: ...

    def reject_too_large(self, req: Request, conn: HttpConnection) -> None: ...


class HttpConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.busy = False  # a request is being handled
        self.receiving = False  # a request has started arriving and is not complete
        self.closed = False
        self._dispatching = False
        self._discarding = False
        self._req: Request | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._size = 0

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)
        self.handler.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.receiving:
            self.receiving = False
            self.handler.receiving -= 1
        self.handler.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"protocol upgrades are not supported")
        except httptools.HttpParserError:
            self._fail(400, b"malformed HTTP request")

    def _fail(self, status: int, message: bytes) -> None:
        body = b'{"error":{"code":"bad_http","message":"' + message + b'"}}'
        self.write_raw(status, body, b"application/json", (), close=True)

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        req = Request()
        req.started = time.perf_counter()
        self._req = req
        self._url = b""
        self._body = []
        self._size = 0
        self.receiving = True
        self.handler.receiving += 1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._req.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        req = self._req
        limit = self.handler.max_body_bytes
        length = req.headers.get(b"content-length")
        if length is not None:
            try:
                req.too_large = int(length) > limit
            except ValueError:
                req.too_large = False
        expect = req.headers.get(b"expect", b"").lower() == b"100-continue"
        if req.too_large and not self.busy and not self.queue:
            # Answer 413 now, before the body; whatever of the body still comes is read and
            # dropped, so the client sees the answer rather than a reset connection.
            self._discarding = True
            self._finish_request(req)
            return
        if expect:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self._req
        if req is None or req.too_large:
            return
        self._size += len(body)
        if self._size > self.handler.max_body_bytes:
            # A chunked body (no Content-Length) just passed the limit: as for a declared
            # length, answer 413 now rather than after the whole body, and drop the rest.
            req.too_large = True
            self._body = []
            if not self.busy and not self.queue:
                self._discarding = True
                self._finish_request(req)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._discarding:
            self._discarding = False
            self.transport.close()
            return
        req = self._req
        if req is None:
            return
        self._finish_request(req)

    def _finish_request(self, req: Request) -> None:
        self._req = None
        if self.receiving:
            self.receiving = False
            self.handler.receiving -= 1
        parsed = httptools.parse_url(self._url)
        req.method = self.parser.get_method().decode()
        req.path = unquote(parsed.path.decode("latin-1"))
        req.query = parsed.query.decode("latin-1") if parsed.query else ""
        req.http10 = self.parser.get_http_version() == "1.0"
        req.keep_alive = self.parser.should_keep_alive() and not req.too_large
        req.body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        self.queue.append(req)
        self.dispatch()

    # --- answering -------------------------------------------------------------------------

    def dispatch(self) -> None:
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self.queue and not self.busy and not self.closed:
                req = self.queue.popleft()
                self.busy = True
                if req.too_large:
                    self.handler.reject_too_large(req, self)
                else:
                    self.handler.handle(req, self)
        finally:
            self._dispatching = False

    def respond(
        self,
        req: Request,
        status: int,
        body: bytes,
        content_type: bytes,
        headers: tuple[bytes, ...] | list[bytes] = (),
    ) -> None:
        """Answer `req` (the oldest unanswered request of this connection)."""
        close = not req.keep_alive or (self.handler.closing and not self.queue)
        self.busy = False
        self.write_raw(status, body, content_type, headers, close=close, http10=req.http10)
        if not close:
            self.dispatch()

    def write_raw(
        self,
        status: int,
        body: bytes,
        content_type: bytes,
        headers: tuple[bytes, ...] | list[bytes],
        *,
        close: bool,
        http10: bool = False,
    ) -> None:
        if self.closed:
            return
        parts = [
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            % (status, REASONS.get(status, b"Unknown"), content_type, len(body)),
            *headers,
        ]
        if close:
            parts.append(b"connection: close\r\n")
        elif http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self.transport.write(b"".join(parts))
        if close:
            self.closed = True
            if self._discarding:
                # closed when the rest of the body has arrived, or after a grace period
                asyncio.get_running_loop().call_later(_DISCARD_GRACE_S, self.transport.close)
            else:
                self.transport.close()

    @property
    def idle(self) -> bool:
        return not (self.busy or self.receiving or self.queue)

    def close_if_idle(self) -> None:
        if self.idle and not self.closed:
            self.closed = True
            self.transport.close()


def make_reuseport_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, so several worker processes can share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.setblocking(False)
    return sock


def query_params(query: str) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(query, keep_blank_values=True))


__all__: list[Any] = ["HttpConnection", "Request", "make_reuseport_socket", "query_params"]
