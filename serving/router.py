"""The traffic router: one stable address per deployment in front of its current servers.

    python -m serving.router --host 127.0.0.1 --port P --backends-file F

F is `{"backends": ["127.0.0.1:40001", "unix:/path/to/server.sock", ...]}`, rewritten
atomically (temp file + rename) by the control plane. The router re-reads it when its mtime/inode changes (polled every 50 ms) or on
SIGHUP; new requests then go only to the new set (round-robin), while requests already sent
to a removed backend complete. Idle pooled connections to removed backends are closed.

A request is retried on another backend (or a fresh connection) when connecting fails or the
upstream connection closes before any byte of the response: the backend did not process it
(our servers only close idle connections). So swapping the set from old servers to new ones
and then SIGTERMing the old ones loses no request.

With "groups" (and "sticky") in the file, each request first picks a weighted group
(serving/routing.py: canary and split), then a backend of that group; GET /__router/stats
reports per-group counters.

GET /__router/health answers 200 with the current backends; with no backends every proxied
request gets 503 (or, with "hold" in the file, waits a bounded time for a first backend:
serving/hold.py). GET /__router/stats answers the counters as JSON. SIGTERM: stop
accepting, finish in-flight requests, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import httptools

from serving import mirror as mirroring
from serving.hold import Hold, Traffic, parse_hold
from serving.routing import Group, Routing
from serving.routing import parse as parse_groups

logger = logging.getLogger("serving.router")

REASONS = {
    200: b"OK", 400: b"Bad Request", 404: b"Not Found", 413: b"Payload Too Large", 502: b"Bad Gateway",
    503: b"Service Unavailable",
}  # fmt: skip
# Hop-by-hop headers are not forwarded (RFC 9110 7.6.1); lengths are recomputed.
_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"content-length", b"expect",
}  # fmt: skip
MAX_BODY = 64 * 1024 * 1024
MAX_IDLE_PER_BACKEND = 256
POLL_INTERVAL_S = 0.05
# A backend on a node that died may not refuse but drop the connection attempt: give up on it
# after this long (TimeoutError is an OSError: forward() tries the next backend).
CONNECT_TIMEOUT_S = 2.0


class UpstreamClosedEarly(Exception):
    """The upstream connection ended before any byte of the response: safe to retry."""


class UpstreamFailed(Exception):
    """The upstream connection broke mid-response: not retried."""


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _json_response(status: int, payload: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return status, [(b"content-type", b"application/json")], json.dumps(payload).encode()


def _error(status: int, code: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return _json_response(status, {"error": {"code": code, "message": message}})


class Upstream(asyncio.Protocol):
    """A keep-alive connection to one backend; one request at a time."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self.got_bytes = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if self.got_bytes:
                waiter.set_exception(UpstreamFailed(f"{self.backend} closed mid-response"))
            else:
                waiter.set_exception(UpstreamClosedEarly(f"{self.backend} closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Bytes while idle are a protocol error: drop the connection.
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.waiter.done():
                self.waiter.set_exception(
                    UpstreamFailed(f"bad response from {self.backend}: {exc}")
                )
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))

    def send(self, data: bytes) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.got_bytes = False
        self.headers = []
        self.body = []
        self.transport.write(data)
        return self.waiter

    def reset(self) -> None:
        self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Router:
    """Backend set, round-robin choice and the upstream connection pool."""

    def __init__(self, backends_file: Path) -> None:
        self.backends_file = backends_file
        self.backends: list[str] = []
        self.pool: dict[str, list[Upstream]] = {}
        self._rr = 0
        self._stamp: tuple[int, int, int] | None = None
        self.connections: set[ClientConnection] = set()
        self.closing = False
        self.in_flight = 0
        self.traffic = Traffic()
        self.hold = Hold()
        self.mirror: mirroring.Mirror | None = None
        self.routing = Routing()  # canary/split weighted groups (serving/routing.py)
        self.known: set[str] = set()  # every backend of the pool and the groups

    # --- backends file -------------------------------------------------------------------

    def reload(self, force: bool = False) -> None:
        try:
            st = os.stat(self.backends_file)
        except FileNotFoundError:
            if self.backends:
                logger.warning("%s disappeared; keeping the current backends", self.backends_file)
            return
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            data = json.loads(self.backends_file.read_text())
            backends = data["backends"]
            if not isinstance(backends, list):
                raise ValueError("'backends' must be a list")
            parsed = [self._check(b) for b in backends]
            hold = parse_hold(data.get("hold"))
            groups, sticky = parse_groups(data, self._check)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("ignoring %s: %s", self.backends_file, exc)
            self._stamp = stamp
            return
        self._stamp = stamp
        self.hold.configure(hold)
        self._set_mirror(data.get("mirror"))
        self.routing.configure(groups, sticky)
        known = set(parsed) | self.routing.backends()
        changed = parsed != self.backends
        if changed:
            logger.info("backends: %s -> %s", self.backends, parsed)
        self.backends = parsed
        removed, self.known = self.known - known, known
        for backend in removed:
            for conn in self.pool.pop(backend, []):
                conn.close()
        if removed:
            self.traffic.forget(removed)
        if changed:
            self.hold.backends_changed(parsed)

    def _set_mirror(self, raw: object) -> None:
        """Start, retarget or stop shadow traffic (serving/mirror.py) from the file's key."""
        config = None
        if raw is not None:
            try:
                config = mirroring.parse_config(raw, self._check)
            except ValueError as exc:
                logger.error("ignoring the mirror in %s: %s", self.backends_file, exc)
        current = self.mirror
        if config is None:
            if current is not None:
                logger.info("mirror to %s stopped", current.config["name"])
                current.close()
                self.mirror = None
        elif current is not None and current.same_candidate(config):
            current.update(config)
        else:
            if current is not None:
                current.close()
            logger.info("mirroring %.0f%% to %s", config["fraction"] * 100, config["name"])
            self.mirror = mirroring.Mirror(config)

    @staticmethod
    def _check(backend: object) -> str:
        if not isinstance(backend, str):
            raise ValueError(f"backend {backend!r} is not a string")
        if backend.startswith("unix:"):
            if not backend[5:].startswith("/"):
                raise ValueError(f"backend {backend!r} is not unix:/absolute/path")
            return backend
        host, sep, port = backend.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"backend {backend!r} is not host:port")
        return backend

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self.reload()
        loop.call_later(POLL_INTERVAL_S, self.watch, loop)

    # --- choosing and connecting -----------------------------------------------------------

    def pick(
        self, avoid: set[str] | frozenset[str] = frozenset(), group: Group | None = None
    ) -> str | None:
        """The next backend round-robin (of ``group``, else of the pool), skipping those in
        ``avoid`` (the ones that refused this request) unless that is all of them."""
        if group is not None:
            backends = group.backends
            for _ in range(len(backends)):
                group.rr = (group.rr + 1) % len(backends)
                if backends[group.rr] not in avoid:
                    break
            return backends[group.rr]
        backends = self.backends
        if not backends:
            return None
        for _ in range(len(backends)):
            self._rr = (self._rr + 1) % len(backends)
            if backends[self._rr] not in avoid:
                break
        return backends[self._rr]

    async def connection(self, backend: str) -> tuple[Upstream, bool]:
        """A connection to backend: (pooled idle one or a new one, whether it was pooled)."""
        idle = self.pool.get(backend)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        if backend.startswith("unix:"):
            # a model server in its own network namespace, or a container without a network
            _, conn = await loop.create_unix_connection(lambda: Upstream(backend), backend[5:])
            return conn, False
        host, _, port = backend.rpartition(":")
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Upstream(backend), host.strip("[]"), int(port)),
            CONNECT_TIMEOUT_S,
        )
        return conn, False

    def stats(self) -> dict:
        """GET /__router/stats: each feature adds its own top-level keys."""
        stats = {**self.traffic.stats(self.backends), "hold": self.hold.stats()}
        stats.update(self.routing.snapshot())
        if self.mirror is not None:
            stats["mirror"] = self.mirror.stats()
        return stats

    def release(self, conn: Upstream) -> None:
        conn.reset()
        if conn.closed or not conn.keep_alive or conn.backend not in self.known:
            conn.close()
            return
        idle = self.pool.setdefault(conn.backend, [])
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            conn.close()
        else:
            idle.append(conn)

    async def forward(
        self, raw: bytes, group: Group | None = None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send one request upstream (to ``group`` if given), retrying where the backend
        cannot have processed it. With no backend at all and holding on (scale from zero),
        wait for one first."""
        if group is None and not self.backends and self.hold.enabled:
            if not await self.hold.wait():
                return self.hold.unavailable("no backend started in time; retry later")
        pool = group.backends if group is not None else self.backends
        attempts = max(3, 2 * len(pool) + 1)
        last_error = "no backends"
        # The round-robin position is shared with concurrent requests: without this, every
        # retry of one request could land on the same dead backend.
        refused: set[str] = set()
        for attempt in range(attempts):
            backend = self.pick(avoid=refused, group=group)
            if backend is None:
                return self.hold.unavailable("this deployment has no running backends")
            try:
                conn, _pooled = await self.connection(backend)
            except OSError as exc:
                last_error = f"cannot connect to {backend}: {exc}"
                refused.add(backend)
                if attempt >= len(pool):
                    await asyncio.sleep(0.01)  # every backend refused: give a swap a moment
                continue
            self.traffic.sent(backend)
            try:
                status, headers, body = await conn.send(raw)
            except UpstreamClosedEarly as exc:
                last_error = str(exc)
                conn.close()
                continue
            except UpstreamFailed as exc:
                conn.close()
                return _error(502, "bad_gateway", str(exc))
            finally:
                self.traffic.answered(backend)
            self.release(conn)
            return status, headers, body
        return _error(502, "bad_gateway", last_error)


async def _forward_grouped(router: Router, raw: bytes, headers):
    """A request of a deployment with weighted groups: choose one, count it per group."""
    group = router.routing.choose(headers)
    stats = group.stats
    stats.in_flight += 1
    started = time.perf_counter()
    status = 502
    try:
        response = await router.forward(raw, group)
        status = response[0]
        return response
    finally:
        stats.in_flight -= 1
        stats.record(status, (time.perf_counter() - started) * 1000.0)


class ClientConnection(asyncio.Protocol):
    """One downstream client connection; its requests are forwarded in order."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]] = deque()
        self.task: asyncio.Task | None = None
        self.receiving = False
        self.closed = False
        self.http10 = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport)
        self.router.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.router.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(*_error(400, "bad_http", "malformed HTTP request"), keep_alive=False)

    def on_message_begin(self) -> None:
        self.receiving = True
        self._url = b""
        self._headers = []
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            if name.lower() == b"expect" and value.lower() == b"100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size <= MAX_BODY:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self.receiving = False
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        self.http10 = self.parser.get_http_version() == "1.0"
        body = b"".join(self._body) if self._size <= MAX_BODY else None
        self.queue.append((method, self._url, self._headers, body, keep_alive))
        if self.task is None:
            self.task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        router = self.router
        try:
            while self.queue and not self.closed:
                method, url, headers, body, keep_alive = self.queue.popleft()
                router.in_flight += 1
                mirrored = None
                try:
                    if body is None:
                        response = _error(413, "payload_too_large", "the body is too large")
                        keep_alive = False
                    elif url == b"/__router/health":
                        response = _json_response(
                            200, {"status": "ok", "backends": router.backends}
                        )
                    elif url.startswith(b"/__router/"):
                        response = _router_endpoint(router, url)
                    else:
                        router.traffic.begin()
                        try:
                            raw = _request_bytes(method, url, headers, body)
                            # The clock only for a mirrored request: the plain path stays bare.
                            started = time.perf_counter() if router.mirror is not None else 0.0
                            if router.routing.enabled:
                                response = await _forward_grouped(router, raw, headers)
                            else:
                                response = await router.forward(raw)
                            if started and router.mirror is not None:
                                mirrored = (router.mirror, raw, time.perf_counter() - started)
                        finally:
                            router.traffic.end()
                except Exception:
                    logger.exception("proxying %s %s failed", method, url)
                    response = _error(502, "bad_gateway", "the router failed on this request")
                finally:
                    router.in_flight -= 1
                if router.closing and not self.queue:
                    keep_alive = False
                self._write(*response, keep_alive=keep_alive)
                if mirrored is not None:
                    # After the caller's answer is written: the copy only queues here; the
                    # candidate is written to by a mirror worker in a later loop iteration.
                    mirrored[0].offer(method, url, mirrored[1], response, mirrored[2])
        finally:
            self.task = None

    def _write(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, keep_alive: bool
    ) -> None:
        if self.closed:
            return
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Status"))]
        for name, value in headers:
            if name.lower() not in _HOP:
                parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.http10:
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        parts.append(body)
        self.transport.write(b"".join(parts))
        if not keep_alive:
            self.closed = True
            self.transport.close()

    @property
    def idle(self) -> bool:
        return self.task is None and not self.receiving and not self.queue

    def close_if_idle(self) -> None:
        if self.idle and not self.closed:
            self.closed = True
            self.transport.close()


def _router_endpoint(router: Router, url: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``/__router/stats`` (counters; each feature adds its own key) and
    ``/__router/mirror?after=SEQ&limit=N`` (the shadow pairs, serving/mirror.py)."""
    path = url.split(b"?", 1)[0]
    if path == b"/__router/stats":
        return _json_response(200, router.stats())
    if path == b"/__router/mirror":
        if router.mirror is None:
            return _json_response(200, {"active": False, "pairs": []})
        after = mirroring.query_int(url, b"after", 0)
        limit = min(max(mirroring.query_int(url, b"limit", 500), 1), 5000)
        return _json_response(200, {"active": True, **router.mirror.read(after, limit)})
    return _error(404, "not_found", "no such router endpoint")


def _request_bytes(
    method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    parts = [b"%s %s HTTP/1.1\r\n" % (method, url)]
    for name, value in headers:
        if name.lower() not in _HOP:
            parts.append(b"%s: %s\r\n" % (name, value))
    parts.append(b"content-length: %d\r\n\r\n" % len(body))
    parts.append(body)
    return b"".join(parts)


async def serve(host: str, port: int, backends_file: Path, shutdown_timeout_s: float) -> int:
    loop = asyncio.get_running_loop()
    router = Router(backends_file)
    router.watch(loop)
    server = await loop.create_server(
        lambda: ClientConnection(router), host, port, reuse_address=True, backlog=2048
    )
    bound = server.sockets[0].getsockname()[1]
    logger.info("router listening on http://%s:%d, backends from %s", host, bound, backends_file)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: router.reload(force=True))
    await stop.wait()
    logger.info("router shutting down: %d in-flight request(s)", router.in_flight)
    server.close()
    router.closing = True
    deadline = time.monotonic() + shutdown_timeout_s
    while time.monotonic() < deadline:
        for conn in list(router.connections):
            conn.close_if_idle()
        if not router.connections:
            break
        await asyncio.sleep(0.01)
    for conns in router.pool.values():
        for conn in conns:
            conn.close()
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.router", description="Reverse proxy in front of model servers."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backends-file", type=Path, required=True)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        parser.error("--log-level must be DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s [router] %(message)s"
    )
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(
            serve(args.host, args.port, args.backends_file, args.shutdown_timeout)
        )
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
