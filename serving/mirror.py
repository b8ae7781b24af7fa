"""Shadow traffic: copies of live prediction requests sent to a candidate's backends.

The router calls ``Mirror.offer`` after the primary has answered (the caller's response is
already decided); a sampled fraction of prediction requests is put on a bounded queue and a
few worker tasks send them to the candidate. A full queue drops the copy and counts it; a
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
import time
from collections import deque
from collections.abc import Callable
from typing import Any

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


class Mirror:
    """The mirror of one candidate: sampling, the bounded queue, its workers and pool, the
    pairs buffer and the counters. Lives on the router's event loop; no locks needed."""

    def __init__(self, config: dict, upstream_factory: Callable[[str], asyncio.Protocol]) -> None:
        self.config = config
        self._factory = upstream_factory
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=config["queue"])
        self.pairs: deque[dict] = deque(maxlen=config["buffer"])
        self.pool: dict[str, list] = {}
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
        started: float,
    ) -> None:
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
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        queue.put_nowait((url, raw, response[0], elapsed_ms, response[2], time.time(), response[1]))
        counts["sent"] += 1

    # --- the candidate side ----------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            url, raw, p_status, p_ms, p_body, ts, p_headers = await self.queue.get()
            try:
                c_status, c_ms, c_body, error = await self._send(_with_request_id(raw, p_headers))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one copy stop a worker
                c_status, c_ms, c_body, error = None, None, b"", f"mirror failed: {exc}"
            self._record(url, ts, p_status, p_ms, p_body, c_status, c_ms, c_body, error)

    async def _send(self, raw: bytes) -> tuple[int | None, float | None, bytes, str]:
        backends = self.config["backends"]
        if not backends:
            return None, None, b"", "the candidate has no backends"
        self._rr = (self._rr + 1) % len(backends)
        backend = backends[self._rr]
        started = time.perf_counter()
        for attempt in range(2):
            conn = await self._connection(backend)
            if isinstance(conn, str):
                return None, None, b"", conn
            try:
                status, _headers, body = await asyncio.wait_for(
                    conn.send(raw), self.config["timeout_s"]
                )
            except TimeoutError:
                conn.close()
                return None, None, b"", f"{backend} timed out"
            except Exception as exc:
                conn.close()
                # A pooled connection the candidate had closed: one fresh try.
                if attempt == 0 and type(exc).__name__ == "UpstreamClosedEarly":
                    started = time.perf_counter()
                    continue
                return None, None, b"", str(exc)
            elapsed = (time.perf_counter() - started) * 1000.0
            self._release(conn)
            return status, elapsed, body, ""
        return None, None, b"", f"{backend} closed the connection"

    async def _connection(self, backend: str):
        idle = self.pool.get(backend)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            if backend.startswith("unix:"):
                _, conn = await loop.create_unix_connection(
                    lambda: self._factory(backend), backend[5:]
                )
            else:
                host, _, port = backend.rpartition(":")
                _, conn = await loop.create_connection(
                    lambda: self._factory(backend), host.strip("[]"), int(port)
                )
        except OSError as exc:
            return f"cannot connect to {backend}: {exc}"
        return conn

    def _release(self, conn) -> None:
        conn.reset()
        if conn.closed or not conn.keep_alive or conn.backend not in self.config["backends"]:
            conn.close()
            return
        idle = self.pool.setdefault(conn.backend, [])
        if len(idle) >= self.config["workers"]:
            conn.close()
        else:
            idle.append(conn)

    def _record(self, url, ts, p_status, p_ms, p_body, c_status, c_ms, c_body, error) -> None:
        counts = self.counts
        if c_status is None or c_status >= 500:
            counts["errors"] += 1
        if c_status is not None:
            counts["completed"] += 1
        limit = self.config["body_bytes"]
        p_text, p_cut = _cut(p_body, limit)
        c_text, c_cut = _cut(c_body, limit)
        self.seq += 1
        self.pairs.append(
            {
                "seq": self.seq,
                "ts": ts,
                "path": url.split(b"?", 1)[0].decode("latin-1")[:200],
                "primary": {
                    "status": p_status,
                    "ms": round(p_ms, 3),
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
        )

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
        first = pairs[0]["seq"] if pairs else self.seq + 1
        lost = max(0, first - after - 1) if after < first else 0
        skip = max(0, after - first + 1)
        out = [pairs[i] for i in range(skip, min(len(pairs), skip + limit))]
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
