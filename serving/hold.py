"""In-flight accounting and scale-from-zero holding for the router (serving/router.py).

``Traffic`` counts what the autoscaler needs: requests in flight now (in total and per
backend) and requests proxied since start. Plain integer updates on the router's single
asyncio loop: no lock, no allocation in the hot path.

``Hold``: when backends.json has ``"hold": {"queue": N, "timeout_s": S}`` and the router has
no backend (a deployment scaled to zero), a request waits, instead of an immediate 503, until
a backend appears (then it is forwarded at once) or for at most S seconds; at most N wait at
once. A request that cannot wait (queue full) or waited in vain gets ``503`` with
``Retry-After``. The number waiting is in ``GET /__router/stats`` ("hold": {"waiting"}):
the control plane polls it every second and starts the first instance (the autoscaler's
scale-from-zero). A cold start is counted each time backends appear while requests wait.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

HOLD_QUEUE_MAX = 10_000
HOLD_TIMEOUT_MAX_S = 600.0


class Traffic:
    """Requests in flight (total and per backend) and requests proxied since start."""

    __slots__ = ("in_flight", "requests_total", "backend_in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests_total = 0
        self.backend_in_flight: dict[str, int] = {}

    def begin(self) -> None:
        self.in_flight += 1
        self.requests_total += 1

    def end(self) -> None:
        self.in_flight -= 1

    def sent(self, backend: str) -> None:
        per = self.backend_in_flight
        per[backend] = per.get(backend, 0) + 1

    def answered(self, backend: str) -> None:
        self.backend_in_flight[backend] -= 1

    def forget(self, backends: set[str]) -> None:
        """Drop idle counters of backends no longer in the set (their requests finished)."""
        for backend in backends:
            if not self.backend_in_flight.get(backend):
                self.backend_in_flight.pop(backend, None)

    def stats(self, backends: list[str]) -> dict[str, Any]:
        per = self.backend_in_flight
        listed = {b: {"in_flight": per.get(b, 0)} for b in backends}
        # a removed backend still finishing requests is listed too
        listed.update({b: {"in_flight": n} for b, n in per.items() if b not in listed and n})
        return {
            "in_flight": self.in_flight,
            "requests_total": self.requests_total,
            "backends": listed,
        }


def parse_hold(value: object) -> tuple[int, float] | None:
    """``{"queue": N, "timeout_s": S}`` -> (N, S); None (absent) -> None. Raises ValueError."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"queue", "timeout_s"}:
        raise ValueError('\'hold\' must be {"queue": N, "timeout_s": S}')
    queue = value.get("queue", 64)
    timeout = value.get("timeout_s", 30)
    if isinstance(queue, bool) or not isinstance(queue, int) or not 0 < queue <= HOLD_QUEUE_MAX:
        raise ValueError(f"hold.queue must be an integer from 1 to {HOLD_QUEUE_MAX}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= HOLD_TIMEOUT_MAX_S
    ):
        raise ValueError(f"hold.timeout_s must be a number of seconds up to {HOLD_TIMEOUT_MAX_S}")
    return queue, float(timeout)


class Hold:
    """Requests waiting for a first backend, and the counters of it."""

    def __init__(self) -> None:
        self.config: tuple[int, float] | None = None
        self.waiting = 0
        self.held_total = 0
        self.timeouts = 0
        self.rejected = 0  # the queue was full
        self.cold_starts = 0
        self.last_wait_ms: float | None = None
        self._ready = asyncio.Event()
        self._since = 0.0  # monotonic time the first of the waiting requests arrived

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def configure(self, config: tuple[int, float] | None) -> None:
        self.config = config

    def backends_changed(self, backends: list[str]) -> None:
        """Called by the router whenever it loads a backend set."""
        if backends:
            if self.waiting and not self._ready.is_set():
                self.cold_starts += 1
            self._ready.set()
        else:
            self._ready.clear()

    async def wait(self) -> bool:
        """Wait for a backend; True once there is one, False on a full queue or timeout."""
        if self.config is None:
            return False
        queue, timeout = self.config
        if self.waiting >= queue:
            self.rejected += 1
            return False
        if not self.waiting:
            self._since = time.monotonic()
        self.waiting += 1
        self.held_total += 1
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            self.timeouts += 1
            return False
        finally:
            self.waiting -= 1
        self.last_wait_ms = round((time.monotonic() - started) * 1000, 1)
        return True

    def retry_after(self) -> int:
        """Seconds a client should wait before trying again: the hold timeout (the time a
        first instance is given to start), at least 1."""
        return max(1, math.ceil(self.config[1])) if self.config else 1

    def unavailable(self, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        body = json.dumps({"error": {"code": "no_backends", "message": message}}).encode()
        headers = [(b"content-type", b"application/json")]
        if self.config is not None:
            headers.append((b"retry-after", b"%d" % self.retry_after()))
        return 503, headers, body

    def stats(self) -> dict[str, Any]:
        queue, timeout = self.config or (None, None)
        return {
            "enabled": self.config is not None,
            "queue": queue,
            "timeout_s": timeout,
            "waiting": self.waiting,
            "waiting_for_s": round(time.monotonic() - self._since, 3) if self.waiting else 0.0,
            "held_total": self.held_total,
            "timeouts": self.timeouts,
            "rejected": self.rejected,
            "cold_starts": self.cold_starts,
            "last_wait_ms": self.last_wait_ms,
        }
