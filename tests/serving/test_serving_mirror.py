"""Shadow traffic in the router (serving/mirror.py): a real router process in front of two
tiny real backends (a primary and a candidate)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from serving import mirror as mirroring

REPO = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("tiny_backend.py")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not up after {timeout}s")


@pytest.fixture
def spawn(tmp_path):
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], ready_path: str, port: int) -> str:
        log = open(tmp_path / f"p{len(procs)}.log", "wb")
        procs.append(
            subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        )  # fmt: skip
        _wait(f"http://127.0.0.1:{port}{ready_path}")
        return f"127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def backend(spawn):
    def start(name: str, *flags: str) -> str:
        port = _port()
        return spawn([sys.executable, str(TINY), str(port), name, *flags], "/ping", port)

    return start


@pytest.fixture
def router(spawn, tmp_path):
    """Factory: router(primary backends, mirror dict or None) -> (base url, write(config))."""

    def start(backends: list[str], mirror: dict | None):
        path = tmp_path / "backends.json"

        def write(mirror: dict | None) -> None:
            body = {"backends": backends}
            if mirror is not None:
                body["mirror"] = mirror
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            os.replace(tmp, path)

        write(mirror)
        port = _port()
        argv = [sys.executable, "-m", "serving.router", "--port", str(port),
                "--backends-file", str(path)]  # fmt: skip
        spawn(argv, "/__router/health", port)
        return f"http://127.0.0.1:{port}", write

    return start


def _stats(base: str) -> dict:
    return requests.get(f"{base}/__router/stats", timeout=5).json().get("mirror") or {}


def _settle(base: str, timeout: float = 10.0) -> dict:
    """The mirror's counters once every queued copy is answered or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = _stats(base)
        if stats and stats["queued"] == 0 and stats["seq"] == stats["sent"]:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"mirror did not settle: {_stats(base)}")


def test_a_sampled_fraction_is_mirrored_and_paired_with_the_primary_answer(backend, router):
    primary, candidate = backend("primary"), backend("candidate")
    base, write = router(
        [primary], {"name": "r2", "revision": 2, "fraction": 0.25, "backends": [candidate]}
    )
    with requests.Session() as session:
        for i in range(40):
            response = session.post(f"{base}/invocations", data=b"x" * (i + 1))
            assert response.status_code == 200
            assert response.json()["by"] == "primary"
        assert session.get(f"{base}/ping").status_code == 200  # never mirrored
    stats = _settle(base)
    assert (stats["offered"], stats["sent"], stats["dropped"], stats["errors"]) == (40, 10, 0, 0)
    page = requests.get(f"{base}/__router/mirror?after=0&limit=4", timeout=5).json()
    assert (
        page["active"] and page["lost"] == 0 and [p["seq"] for p in page["pairs"]] == [1, 2, 3, 4]
    )
    rest = requests.get(f"{base}/__router/mirror?after=4", timeout=5).json()["pairs"]
    pairs = page["pairs"] + rest
    assert len(pairs) == 10
    for pair in pairs:
        p, c = json.loads(pair["primary"]["body"]), json.loads(pair["candidate"]["body"])
        assert (p["by"], c["by"]) == ("primary", "candidate")
        assert p["predictions"] == c["predictions"]  # the same request went to both
        assert pair["primary"]["status"] == pair["candidate"]["status"] == 200
        assert pair["candidate"]["ms"] is not None and pair["path"] == "/invocations"
    # Removing the key stops mirroring: the stats key disappears.
    write(None)
    deadline = time.monotonic() + 3
    while _stats(base):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_full_queue_drops_and_counts_without_slowing_the_primary(backend, router):
    primary, slow = backend("primary"), backend("slow", "--delay", "1.0")
    base, _ = router(
        [primary],
        {"name": "slow", "fraction": 1.0, "backends": [slow], "queue": 2, "workers": 1},
    )
    latencies = []
    with requests.Session() as session:
        for _ in range(30):
            started = time.perf_counter()
            response = session.post(f"{base}/invocations", data=b"{}")
            latencies.append(time.perf_counter() - started)
            assert response.json()["by"] == "primary"
    stats = _stats(base)
    assert stats["sent"] + stats["dropped"] == stats["offered"] == 30
    assert stats["dropped"] >= 25  # one in the worker, two queued; the rest dropped
    assert max(latencies) < 0.5  # a 1 s candidate never holds a caller


def test_a_failing_or_dead_candidate_never_affects_the_primary_answers(backend, router):
    primary, failing = backend("primary"), backend("failing", "--status", "500")
    dead = f"127.0.0.1:{_port()}"  # nothing listens there
    base, _ = router([primary], {"name": "bad", "fraction": 1.0, "backends": [failing, dead]})
    with requests.Session() as session:
        answers = [session.post(f"{base}/invocations", data=b"{}") for _ in range(20)]
    assert [(a.status_code, a.json()["by"]) for a in answers] == [(200, "primary")] * 20
    stats = _settle(base)
    assert stats["errors"] == 20 and stats["completed"] == 10  # 10 × 500, 10 × refused
    pairs = requests.get(f"{base}/__router/mirror", timeout=5).json()["pairs"]
    refused = [p for p in pairs if p["candidate"]["status"] is None]
    assert len(refused) == 10 and all("cannot connect" in p["candidate"]["error"] for p in refused)


def test_a_malformed_mirror_key_is_ignored_and_the_primary_keeps_serving(backend, router):
    primary = backend("primary")
    base, _ = router([primary], {"fraction": 2, "backends": []})
    assert requests.post(f"{base}/invocations", data=b"{}", timeout=5).json()["by"] == "primary"
    assert _stats(base) == {}


def test_mirror_settings_are_validated():
    def check(b):
        return b

    ok = mirroring.parse_config({"fraction": 0.5, "backends": ["127.0.0.1:1"]}, check)
    assert ok["queue"] == 256 and ok["fraction"] == 0.5
    for bad in (
        {"fraction": -0.1, "backends": []},
        {"fraction": True, "backends": []},
        {"fraction": 0.5, "backends": "x"},
        {"fraction": 0.5, "backends": [], "queue": 0},
        {"fraction": 0.5, "backends": [], "workers": 1.5},
        [],
    ):
        with pytest.raises(ValueError):
            mirroring.parse_config(bad, check)
    assert mirroring.is_prediction(b"POST", b"/invocations")
    assert mirroring.is_prediction(b"POST", b"/v2/models/m/infer")
    assert not mirroring.is_prediction(b"GET", b"/invocations")
    assert not mirroring.is_prediction(b"POST", b"/__router/stats")
    assert not mirroring.is_prediction(b"POST", b"/v2/health/ready")
    assert mirroring.query_int(b"/x?after=12&limit=3", b"after", 0) == 12
    assert mirroring.query_int(b"/x?after=abc", b"after", 7) == 7


def test_the_copy_carries_the_primary_request_id():
    raw = b"POST /invocations HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    got = mirroring._with_request_id(raw, [(b"X-Request-Id", b"abc")])
    assert got == (
        b"POST /invocations HTTP/1.1\r\nx-request-id: abc\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    )
    sent = b"POST / HTTP/1.1\r\nX-Request-Id: mine\r\n\r\n"
    assert mirroring._with_request_id(sent, [(b"x-request-id", b"abc")]) == sent
    assert mirroring._with_request_id(raw, []) == raw


def test_queued_copies_are_pipelined_and_each_answer_paired_with_its_own_request(backend, router):
    # A candidate slower than the caller: copies queue up and go out in batches on one
    # connection; each answer must still be paired with the request it answers.
    primary, slow = backend("primary"), backend("slow", "--delay", "0.03")
    base, _ = router([primary], {"name": "slow", "fraction": 1.0, "backends": [slow], "workers": 1})
    with requests.Session() as session:
        for i in range(40):
            assert session.post(f"{base}/invocations", data=b"x" * (i + 1)).status_code == 200
    stats = _settle(base)
    assert (stats["sent"], stats["dropped"], stats["errors"], stats["completed"]) == (40, 0, 0, 40)
    pairs = requests.get(f"{base}/__router/mirror", timeout=5).json()["pairs"]
    assert [json.loads(p["candidate"]["body"])["predictions"] for p in pairs] == [
        json.loads(p["primary"]["body"])["predictions"] for p in pairs
    ]
    assert sorted(json.loads(p["primary"]["body"])["predictions"][0] for p in pairs) == list(
        range(1, 41)
    )
    # A copy's latency is the candidate's time for it, not its wait behind the batch's others.
    # 40 copies at 30 ms each, answered one after the other: with the wait counted the median
    # would be ~0.6 s. Judged by the median: on a loaded machine the router can read two
    # answers in one go (the second then looks instant) or late (the first looks slow).
    seconds = sorted(p["candidate"]["ms"] / 1000 for p in pairs)
    assert 0.02 < seconds[len(seconds) // 2] < 0.2, seconds


def test_a_stalled_candidate_times_out_per_batch_and_never_delays_the_primary(backend, router):
    primary, stalled = backend("primary"), backend("stalled", "--delay", "30")
    base, _ = router(
        [primary],
        {"name": "stalled", "fraction": 1.0, "backends": [stalled], "workers": 1,
         "timeout_s": 0.5, "queue": 64},
    )  # fmt: skip
    latencies = []
    with requests.Session() as session:
        for _ in range(20):
            started = time.perf_counter()
            assert session.post(f"{base}/invocations", data=b"{}").json()["by"] == "primary"
            latencies.append(time.perf_counter() - started)
    assert max(latencies) < 0.25  # the copies wait on the candidate; the callers never do
    stats = _settle(base, timeout=5)
    assert (stats["sent"], stats["errors"], stats["completed"]) == (20, 20, 0)
    pairs = requests.get(f"{base}/__router/mirror", timeout=5).json()["pairs"]
    assert len(pairs) == 20
    assert all("timed out" in p["candidate"]["error"] for p in pairs)
    assert all(p["primary"]["status"] == 200 for p in pairs)
