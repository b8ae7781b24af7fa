"""Weighted groups and sticky hashing for the router (canary and split strategies).

backends.json may carry, beside today's ``backends`` (the whole primary pool):

    "groups": [{"name": "r7", "revision": 7, "weight": 90, "backends": [...]},
               {"name": "r8", "revision": 8, "weight": 10, "backends": [...]}],
    "sticky": {"header": "X-User-Id"}

With groups, each request goes to one group, then round-robin inside it. Without a sticky
header (or when the request lacks it) the choice is smooth weighted round-robin (nginx's):
exact proportions over any window of ``sum(weights)`` requests, no randomness. With one, the
group is chosen by a stable hash (CRC-32, the same in every process) of the header's value
mapped onto the cumulative weights, so one caller keeps its group while weights stay put. A
group without backends or with weight 0 is never chosen; with no choosable group the primary
pool serves.

Per-group counters (requests, errors = status >= 500 including the router's own 502/503 for
upstream failures, in-flight, a latency histogram) are plain integers on one asyncio loop: no
locks. They survive reconfiguration by group name, so the control plane reads deltas over
its analysis window from ``GET /__router/stats``.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left

# Upper bounds (ms) of the latency histogram; one more bucket for everything above.
LATENCY_BOUNDS_MS = (
    0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750,
    1000, 2000, 5000, 10000,
)  # fmt: skip


def percentile(counts: list[int], q: float, bounds=LATENCY_BOUNDS_MS) -> float | None:
    """The q-quantile (0..1) of a histogram, linearly interpolated inside its bucket;
    None when it is empty. The open last bucket answers its lower bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            low = bounds[i - 1] if i > 0 else 0.0
            if i >= len(bounds):
                return float(bounds[-1])
            return low + (bounds[i] - low) * max(0.0, rank - seen) / n
        seen += n
    return float(bounds[-1])


class GroupStats:
    """Cumulative counters of one group (since the router started)."""

    __slots__ = ("requests", "errors", "in_flight", "buckets", "latency_sum_ms")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.in_flight = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.latency_sum_ms = 0.0

    def record(self, status: int, elapsed_ms: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.buckets[bisect_left(LATENCY_BOUNDS_MS, elapsed_ms)] += 1
        self.latency_sum_ms += elapsed_ms

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "latency_ms": {
                "p50": percentile(self.buckets, 0.50),
                "p95": percentile(self.buckets, 0.95),
                "p99": percentile(self.buckets, 0.99),
            },
            "latency_sum_ms": round(self.latency_sum_ms, 3),
            "latency_buckets": list(self.buckets),
        }


class Group:
    """One weighted set of backends (a revision)."""

    __slots__ = ("name", "revision", "weight", "backends", "rr", "current", "stats")

    def __init__(self, name: str, revision, weight: int, backends: list[str]) -> None:
        self.name, self.revision, self.weight, self.backends = name, revision, weight, backends
        self.rr = 0
        self.current = 0  # smooth weighted round-robin state
        self.stats = GroupStats()


def parse(data: dict, check_backend) -> tuple[list[dict], str | None]:
    """Validate the ``groups`` and ``sticky`` keys of backends.json (ValueError if bad)."""
    groups = data.get("groups") or []
    if not isinstance(groups, list):
        raise ValueError("'groups' must be a list")
    parsed, names = [], set()
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("name"), str) or not g["name"]:
            raise ValueError(f"group {g!r} needs a name")
        if g["name"] in names:
            raise ValueError(f"group name {g['name']!r} repeated")
        names.add(g["name"])
        weight = g.get("weight", 0)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000000:
            raise ValueError(f"group {g['name']!r}: weight must be a non-negative integer")
        backends = g.get("backends") or []
        if not isinstance(backends, list):
            raise ValueError(f"group {g['name']!r}: 'backends' must be a list")
        parsed.append(
            {
                "name": g["name"],
                "revision": g.get("revision"),
                "weight": weight,
                "backends": [check_backend(b) for b in backends],
            }
        )
    sticky = data.get("sticky")
    header = None
    if sticky is not None:
        if not isinstance(sticky, dict) or not isinstance(sticky.get("header"), str):
            raise ValueError("'sticky' must be {\"header\": NAME}")
        header = sticky["header"].strip().lower() or None
    return parsed, header


class Routing:
    """The group table and the choice of a group per request."""

    def __init__(self) -> None:
        self.groups: list[Group] = []
        self.active: list[Group] = []  # weight > 0 and at least one backend
        self.total = 0
        self.sticky: bytes | None = None
        self.stats: dict[str, GroupStats] = {}

    def configure(self, groups: list[dict], sticky: str | None) -> None:
        table = []
        for g in groups:
            group = Group(g["name"], g["revision"], g["weight"], g["backends"])
            group.stats = self.stats.setdefault(g["name"], GroupStats())
            old = next((o for o in self.groups if o.name == g["name"]), None)
            if old is not None:
                group.rr = old.rr
            table.append(group)
        self.groups = table
        self.active = [g for g in table if g.weight > 0 and g.backends]
        self.total = sum(g.weight for g in self.active)
        self.sticky = sticky.encode() if sticky else None

    @property
    def enabled(self) -> bool:
        return bool(self.active)

    def backends(self) -> set[str]:
        return {b for g in self.groups for b in g.backends}

    def choose(self, headers: list[tuple[bytes, bytes]] | None = None) -> Group | None:
        active = self.active
        if not active:
            return None
        if len(active) == 1:
            return active[0]
        if self.sticky is not None and headers:
            for name, value in headers:
                if name.lower() == self.sticky:
                    return self.by_hash(value)
        # Smooth weighted round-robin: exact shares, interleaved.
        best = None
        for g in active:
            g.current += g.weight
            if best is None or g.current > best.current:
                best = g
        best.current -= self.total
        return best

    def by_hash(self, value: bytes) -> Group:
        point = zlib.crc32(value) * self.total >> 32  # 0 <= point < total
        for g in self.active:
            if point < g.weight:
                return g
            point -= g.weight
        return self.active[-1]

    def snapshot(self) -> dict:
        """The ``groups`` key of GET /__router/stats."""
        out = {}
        for g in self.groups:
            out[g.name] = {
                "revision": g.revision,
                "weight": g.weight,
                "backends": list(g.backends),
                **g.stats.as_dict(),
            }
        return {
            "groups": out,
            "routing": {
                "sticky": self.sticky.decode() if self.sticky else None,
                "latency_bounds_ms": list(LATENCY_BOUNDS_MS),
            },
        }
