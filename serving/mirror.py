"""Shadow traffic: copies of live prediction requests sent to a candidate's backends.

The router calls ``Mirror.offer`` after it has written the primary's answer to the caller; a
sampled fraction of prediction requests is put on a bounded queue (references, no copies) and
a few worker tasks send them to the candidate, each a batch of what is queued in one write
(pipelined on one keep-alive connection). A full queue drops the copy and counts it; a
candidate that fails, hangs or refuses connections only shows up in the mirror's counters and
pairs, never on the primary path (the router never awaits anything of the mirror's).

Each mirrored request becomes a *pair* (primary status, latency and body; candidate status,
latency and body, each body cut to ``body_bytes``) in a bounded ring buffer with a sequence
number, which the control plane pulls: ``GET /__router/mirror?after=SEQ&limit=N``. The
``epoch`` in that answer changes when the router restarts (sequence numbers start over).

The ``mirror`` key of backends.json:
    {"name": "r9", "revision": 9, "fraction": 0.25, "backends": [...], "queue": 256}
(optional: "workers", "body_bytes", "buffer", "timeout_s").
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

logger = logging.getLogger("serving.router")

# Paths that are never mirrored: health, metrics and metadata, and the router's own.
_NOT_PREDICTIONS = (b"/ping", b"/health", b"/metrics", b"/version", b"/__router", b"/predictions")
_V2_NOT_INFER = (b"/v2/health",)

DEFAULTS = {"queue": 256, "workers": 4, "body_bytes": 4096, "buffer": 2048, "timeout_s": 30.0}
LIMITS = {"queue": (1, 65536), "workers": (1, 64), "body_bytes": (0, 1 << 20), "buffer": (1, 65536)}


def is_prediction(method: bytes, url: bytes) -> bool:
    """A request worth mirroring: a POST to a model route (not health, metrics, metadata)."""
    if method != b"POST":
        return False
    path = url.split(b"?", 1)[0]
    if path.startswith(_NOT_PREDICTIONS) or path.startswith(_V2_NOT_INFER):
        return False
    return True


def parse_config(raw: Any, check_backend: Callable[[object], str]) -> dict:
    """The validated mirror settings; ValueError on anything malformed."""
    if not isinstance(raw, dict):
        raise ValueError("'mirror' must be an object")
    fraction = raw.get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ValueError("mirror.fraction must be a number")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError("mirror.fraction must be between 0 and 1")
    backends = raw.get("backends")
    if not isinstance(backends, list):
        raise ValueError("mirror.backends must be a list")
    config: dict[str, Any] = {
        "name": str(raw.get("name") or "candidate")[:64],
        "revision": raw.get("revision") if isinstance(raw.get("revision"), int) else None,
        "fraction": float(fraction),
        "backends": [check_backend(b) for b in backends],
    }
    for key, default in DEFAULTS.items():
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"mirror.{key} must be a number")
        if key == "timeout_s":
            if not 0 < value <= 600:
                raise ValueError("mirror.timeout_s must be between 0 and 600")
            config[key] = float(value)
            continue
        low, high = LIMITS[key]
        if int(value) != value or not low <= value <= high:
            raise ValueError(f"mirror.{key} must be an integer from {low} to {high}")
        config[key] = int(value)
    return config


def _cut(body: bytes, limit: int) -> tuple[str, bool]:
    return body[:limit].decode("utf-8", "replace"), len(body) > limit


# Copies one worker writes to the candidate in one call (pipelined on one connection).
BATCH = 32


class _Unanswered(Exception):
    """A copy of a batch got no answer: the connection closed, broke or timed out."""

    def __init__(self, message: str, *, early: bool) -> None:
        super().__init__(message)
        self.early = early  # no byte of the batch's answers came: safe to send again


class CandidateConnection(asyncio.Protocol):
    """A keep-alive connection to one candidate backend carrying a batch of copies at a time:
    written in one call (HTTP/1.1 pipelining), answered in order. One write per batch, not
    per copy, is most of what a mirrored request costs the router's loop (the loopback
    write also runs the receiver's side of TCP)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiting: deque[asyncio.Future] = deque()
        self.closed = False
        self.keep_alive = True
        self.got_bytes = False
        self._body: list[bytes] = []
        self._last = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"{self.backend} closed the connection")

    def _fail(self, message: str) -> None:
        error = _Unanswered(message, early=not self.got_bytes)
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if not self.waiting:
            self.close()  # bytes nobody asked for: drop the connection
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad response from {self.backend}: {exc}")
            self.close()

    def on_message_begin(self) -> None:
        self._body = []

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        now = time.perf_counter()
        # The candidate's time for this copy: from when it could start on it (the batch was
        # written and the previous answer on this connection was done) to its answer.
        ms = (now - self._last) * 1000.0
        self._last = now
        if self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result((self.parser.get_status_code(), ms, b"".join(self._body)))

    async def exchange(self, requests: list[bytes], timeout: float) -> list[tuple]:
        """(status, ms, body, error) of each request, in order; status None where it failed."""
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in requests]
        self.waiting.extend(waiters)
        self.got_bytes = False
        self._last = time.perf_counter()
        self.transport.write(b"".join(requests))
        timer = loop.call_later(timeout, self._timed_out)
        results = []
        try:
            for waiter in waiters:
                try:
                    status, ms, body = await waiter
                    results.append((status, ms, body, ""))
                except _Unanswered as exc:
                    if exc.early and not results:
                        raise  # nothing of the batch was answered: the caller may resend
                    results.append((None, None, b"", str(exc)))
        finally:
            timer.cancel()
        return results

    def _timed_out(self) -> None:
        self.got_bytes = True  # it may have processed them: never resent
        self._fail(f"{self.backend} timed out")
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Mirror:
    """The mirror of one candidate: sampling, the bounded queue, its workers and pool, the
    pairs buffer and the counters. Lives on the router's event loop; no locks needed."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=config["queue"])
        # (seq, copy, candidate result) per mirrored request; a pair's JSON is built when the
        # control plane reads it, not on the router's hot path.
        self.pairs: deque[tuple] = deque(maxlen=config["buffer"])
        self.pool: dict[str, list[CandidateConnection]] = {}
        self.epoch = f"{os.getpid()}-{time.time_ns()}"
        self.seq = 0
        self._acc = 0.0
        self._rr = 0
        self.counts = {
            "offered": 0,  # prediction requests seen while mirroring
            "sent": 0,  # copies queued for the candidate
            "dropped": 0,  # copies not queued: the queue was full
            "completed": 0,  # copies the candidate answered (any status)
            "errors": 0,  # copies that failed: no connection, timeout, or a 5xx answer
            "batches": 0,  # writes to the candidate (copies / batches: the batching achieved)
        }
        self.workers = [asyncio.ensure_future(self._work()) for _ in range(config["workers"])]

    # --- configuration -------------------------------------------------------------------

    def same_candidate(self, config: dict) -> bool:
        keys = ("name", "revision", "queue", "workers", "buffer")
        return all(self.config[k] == config[k] for k in keys)

    def update(self, config: dict) -> None:
        """A new fraction or backend set for the same candidate: buffer and counters stay."""
        removed = set(self.config["backends"]) - set(config["backends"])
        self.config = config
        for backend in removed:
            for conn in self.pool.pop(backend, []):
                conn.close()

    def close(self) -> None:
        for task in self.workers:
            task.cancel()
        for conns in self.pool.values():
            for conn in conns:
                conn.close()
        self.pool.clear()

    # --- the hot path: called once per proxied request ---------------------------------------

    def offer(
        self,
        method: bytes,
        url: bytes,
        raw: bytes,
        response: tuple[int, list, bytes],
        elapsed_s: float,
    ) -> None:
        """Queue a copy (no copying: references to the request and the answer) or count it
        dropped. The candidate is written to by a worker in a later loop iteration, after
        the primary's answer."""
        if not is_prediction(method, url):
            return
        counts = self.counts
        counts["offered"] += 1
        # Deterministic sampling: exactly ``fraction`` of the requests, evenly spread.
        self._acc += self.config["fraction"]
        if self._acc < 1.0:
            return
        self._acc -= 1.0
        queue = self.queue
        if queue.full():  # checked first: no exception raised per dropped copy
            counts["dropped"] += 1
            return
        queue.put_nowait((url, raw, response, elapsed_s, time.time()))
        counts["sent"] += 1

    # --- the candidate side ----------------------------------------------------------------

    async def _work(self) -> None:
        queue = self.queue
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                requests = [_with_request_id(copy[1], copy[2][1]) for copy in batch]
                results = await self._send(requests)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one batch stop a worker
                results = [(None, None, b"", f"mirror failed: {exc}")] * len(batch)
            for copy, result in zip(batch, results, strict=True):
                self._record(copy, result)

    async def _send(self, requests: list[bytes]) -> list[tuple]:
        backends = self.config["backends"]
        if not backends:
            return [(None, None, b"", "the candidate has no backends")] * len(requests)
        self._rr = (self._rr + 1) % len(backends)
        backend = backends[self._rr]
        for attempt in range(2):
            conn = await self._connection(backend)
            if isinstance(conn, str):
                return [(None, None, b"", conn)] * len(requests)
            self.counts["batches"] += 1
            try:
                results = await conn.exchange(requests, self.config["timeout_s"])
            except _Unanswered as exc:
                conn.close()
                # A pooled connection the candidate had closed: one fresh try.
                if attempt == 0:
                    continue
                return [(None, None, b"", str(exc))] * len(requests)
            self._release(conn)
            return results
        return [(None, None, b"", f"{backend} closed the connection")] * len(requests)

    async def _connection(self, backend: str) -> CandidateConnection | str:
        idle = self.pool.get(backend)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            if backend.startswith("unix:"):
                _, conn = await loop.create_unix_connection(
                    lambda: CandidateConnection(backend), backend[5:]
                )
            else:
                host, _, port = backend.rpartition(":")
                _, conn = await loop.create_connection(
                    lambda: CandidateConnection(backend), host.strip("[]"), int(port)
                )
        except OSError as exc:
            return f"cannot connect to {backend}: {exc}"
        return conn

    def _release(self, conn: CandidateConnection) -> None:
        if conn.closed or not conn.keep_alive or conn.backend not in self.config["backends"]:
            conn.close()
            return
        idle = self.pool.setdefault(conn.backend, [])
        if len(idle) >= self.config["workers"]:
            conn.close()
        else:
            idle.append(conn)

    def _record(self, copy: tuple, result: tuple) -> None:
        counts = self.counts
        status = result[0]
        if status is None or status >= 500:
            counts["errors"] += 1
        if status is not None:
            counts["completed"] += 1
        self.seq += 1
        limit = self.config["body_bytes"]
        url, _raw, (p_status, _headers, p_body), p_s, ts = copy
        c_status, c_ms, c_body, error = result
        # Only what the pair needs is kept: the bodies cut to the limit, not the request.
        self.pairs.append(
            (self.seq, ts, url, p_status, p_s, p_body[: limit + 1], c_status, c_ms,
             c_body[: limit + 1], error)
        )  # fmt: skip

    def _pair(self, entry: tuple) -> dict:
        seq, ts, url, p_status, p_s, p_body, c_status, c_ms, c_body, error = entry
        limit = self.config["body_bytes"]
        p_text, p_cut = _cut(p_body, limit)
        c_text, c_cut = _cut(c_body, limit)
        return {
            "seq": seq,
            "ts": ts,
            "path": url.split(b"?", 1)[0].decode("latin-1")[:200],
            "primary": {
                "status": p_status,
                "ms": round(p_s * 1000.0, 3),
                "body": p_text,
                "truncated": p_cut,
            },
            "candidate": {
                "status": c_status,
                "ms": None if c_ms is None else round(c_ms, 3),
                "body": c_text,
                "truncated": c_cut,
                "error": error[:500],
            },
        }

    # --- what the control plane reads --------------------------------------------------------

    def stats(self) -> dict:
        return {
            **self.counts,
            "name": self.config["name"],
            "revision": self.config["revision"],
            "fraction": self.config["fraction"],
            "backends": self.config["backends"],
            "queued": self.queue.qsize(),
            "queue": self.config["queue"],
            "seq": self.seq,
            "epoch": self.epoch,
        }

    def read(self, after: int, limit: int) -> dict:
        """Pairs with ``seq > after`` (oldest first, at most ``limit``); ``lost`` counts those
        that fell out of the buffer before being read."""
        pairs = self.pairs
        first = pairs[0][0] if pairs else self.seq + 1
        lost = max(0, first - after - 1) if after < first else 0
        skip = max(0, after - first + 1)
        out = [self._pair(pairs[i]) for i in range(skip, min(len(pairs), skip + limit))]
        return {**self.stats(), "lost": lost, "pairs": out}


def _with_request_id(raw: bytes, primary_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The copy carries the request id the primary answered with (its own, when the caller
    sent none), so late labels posted for that id reach both versions' predictions."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep or b"\r\nx-request-id:" in head.lower():
        return raw
    rid = next((v for k, v in primary_headers if k.lower() == b"x-request-id"), None)
    if rid is None or b"\r" in rid or b"\n" in rid:
        return raw
    line_end = raw.index(b"\r\n")
    return raw[:line_end] + b"\r\nx-request-id: " + rid + raw[line_end:]


def query_int(url: bytes, name: bytes, default: int) -> int:
    """An integer query parameter of ``url`` (``default`` when absent or malformed)."""
    _, _, query = url.partition(b"?")
    for part in query.split(b"&"):
        key, _, value = part.partition(b"=")
        if key == name:
            try:
                return int(value)
            except ValueError:
                return default
    return default
