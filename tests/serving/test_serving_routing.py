"""Weighted groups and sticky hashing (serving/routing.py): the choice on its own, then a
real router in front of two real model servers."""

from __future__ import annotations

import collections
import json
import os
import time

import pytest
import requests

from serving.router import Router
from serving.routing import Routing, percentile

ROW = {"instances": [[0.3] * 20]}


def table(*groups, sticky=None) -> Routing:
    routing = Routing()
    routing.configure(
        [
            {"name": n, "revision": i, "weight": w, "backends": b}
            for i, (n, w, b) in enumerate(groups)
        ],
        sticky,
    )
    return routing


@pytest.mark.parametrize("weights", [(90, 10), (50, 50), (1, 99), (10, 30, 60)])
def test_weights_are_honoured_over_many_picks(weights):
    routing = table(*[(f"g{i}", w, [f"127.0.0.1:{9000 + i}"]) for i, w in enumerate(weights)])
    n = 10_000
    counts = collections.Counter(routing.choose([]).name for _ in range(n))
    for i, w in enumerate(weights):
        share = counts[f"g{i}"] / n
        assert abs(share - w / sum(weights)) < 0.01, (counts, weights)


def test_a_group_without_backends_or_weight_is_never_picked():
    routing = table(
        ("empty", 50, []), ("zero", 0, ["127.0.0.1:9001"]), ("v2", 50, ["127.0.0.1:9002"])
    )
    assert {routing.choose([]).name for _ in range(1000)} == {"v2"}
    assert {routing.by_hash(str(i).encode()).name for i in range(1000)} == {"v2"}
    assert table(("empty", 100, [])).choose([]) is None  # the primary pool serves


def test_the_same_header_value_always_gets_the_same_group_and_values_spread_by_weight():
    routing = table(("a", 30, ["127.0.0.1:1"]), ("b", 70, ["127.0.0.1:2"]), sticky="X-User-Id")
    first = {}
    for round_ in range(3):
        for i in range(2000):
            name = routing.choose([(b"x-user-id", f"user-{i}".encode())]).name
            assert first.setdefault(i, name) == name, f"user-{i} moved in round {round_}"
    share = sum(1 for v in first.values() if v == "a") / len(first)
    assert abs(share - 0.3) < 0.05
    # A request without the header falls back to weighted round-robin.
    assert {routing.choose([]).name for _ in range(10)} == {"a", "b"}


def test_the_hash_is_stable_across_processes():
    # CRC-32, not Python's per-process salted hash(): every router agrees.
    routing = table(("a", 50, ["127.0.0.1:1"]), ("b", 50, ["127.0.0.1:2"]), sticky="X-User-Id")
    assert [routing.by_hash(v).name for v in (b"alice", b"bob", b"carol", b"dave")] == [
        "a" if __import__("zlib").crc32(v) * 100 >> 32 < 50 else "b"
        for v in (b"alice", b"bob", b"carol", b"dave")
    ]


def test_percentiles_of_a_histogram():
    assert percentile([0] * 23, 0.5) is None
    counts = [0] * 23
    counts[6] = 100  # all in (7.5, 10] ms
    assert 7.5 <= percentile(counts, 0.95) <= 10


def test_a_bad_groups_key_is_ignored_and_the_old_table_kept(tmp_path):
    path = tmp_path / "backends.json"
    good = {
        "backends": ["127.0.0.1:1"],
        "groups": [{"name": "a", "weight": 1, "backends": ["127.0.0.1:1"]}],
    }
    path.write_text(json.dumps(good))
    router = Router(path)
    router.reload()
    assert router.routing.enabled
    path.write_text(json.dumps({"backends": [], "groups": [{"name": "a", "weight": -1}]}))
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    router.reload()
    assert router.routing.enabled and router.backends == ["127.0.0.1:1"]


def _write(path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def test_a_real_router_splits_by_weight_keeps_sticky_callers_and_counts_per_group(
    fleet, start_router
):
    a, b = f"127.0.0.1:{fleet['sklearn'].port}", f"127.0.0.1:{fleet['onnx'].port}"
    router, backends_file = start_router([a, b])
    _write(
        backends_file,
        {
            "backends": [a, b],
            "groups": [
                {"name": "r1", "revision": 1, "weight": 75, "backends": [a]},
                {"name": "r2", "revision": 2, "weight": 25, "backends": [b]},
            ],
        },
    )
    deadline = time.monotonic() + 3
    while "r1" not in requests.get(router.url("/__router/stats"), timeout=5).json()["groups"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    versions = collections.Counter()
    with requests.Session() as session:
        for _ in range(40):
            response = session.post(router.url("/invocations"), json=ROW)
            assert response.status_code == 200
            versions[response.headers["X-Model-Version"]] += 1
        assert versions == {"3": 30, "7": 10}  # smooth weighted round-robin: exact shares
        stats = session.get(router.url("/__router/stats")).json()["groups"]
        assert (stats["r1"]["requests"], stats["r2"]["requests"]) == (30, 10)
        assert stats["r1"]["errors"] == 0 and stats["r1"]["latency_ms"]["p95"] > 0

        _write(
            backends_file,
            {
                "backends": [a, b],
                "groups": [
                    {"name": "r1", "revision": 1, "weight": 50, "backends": [a]},
                    {"name": "r2", "revision": 2, "weight": 50, "backends": [b]},
                ],
                "sticky": {"header": "X-User-Id"},
            },
        )
        deadline = time.monotonic() + 3
        while session.get(router.url("/__router/stats")).json()["routing"]["sticky"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        seen: dict[str, set[str]] = collections.defaultdict(set)
        for _ in range(3):
            for user in range(20):
                response = session.post(
                    router.url("/invocations"), json=ROW, headers={"X-User-Id": f"u{user}"}
                )
                assert response.status_code == 200
                seen[f"u{user}"].add(response.headers["X-Model-Version"])
        assert all(len(v) == 1 for v in seen.values()), seen
        assert {v for s in seen.values() for v in s} == {"3", "7"}
        # The counters kept counting across the reconfiguration (same group names).
        stats = session.get(router.url("/__router/stats")).json()["groups"]
        assert stats["r1"]["requests"] + stats["r2"]["requests"] == 100
