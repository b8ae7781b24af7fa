"""Request ids: random (version 4) UUIDs as 32 hex digits, as `uuid.uuid4().hex` makes them,
from a pool of random bytes read 4 KiB at a time. `uuid.uuid4()` reads 16 bytes from the OS
per call (a getrandom syscall each): a few µs per request, as much as parsing its headers."""

from __future__ import annotations

import os

_POOL_IDS = 256
_pool = b""
_next = 0


def request_id() -> str:
    """A fresh random UUID (version 4, RFC 4122 variant) as 32 lowercase hex digits."""
    global _pool, _next
    if _next == 0:
        _pool = os.urandom(16 * _POOL_IDS)
    start = _next * 16
    _next = (_next + 1) % _POOL_IDS
    raw = bytearray(_pool[start : start + 16])
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # variant RFC 4122
    return raw.hex()


def _forget_pool() -> None:
    global _next
    _next = 0  # a forked child must not repeat its parent's ids


os.register_at_fork(after_in_child=_forget_pool)
