"""The router's counters and scale-from-zero holding (serving/hold.py), on a real router
process with a real model server behind it."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import requests

ROW = {"instances": [[0.3] * 20]}


def write(path: Path, backends: list[str], hold: dict | None = None) -> None:
    """Atomically, as the control plane does."""
    config: dict = {"backends": backends}
    if hold is not None:
        config["hold"] = hold
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, path)


def stats(router) -> dict:
    return requests.get(router.url("/__router/stats"), timeout=5).json()


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_without_hold_no_backend_is_503_at_once(start_router):
    router, _ = start_router([])
    started = time.monotonic()
    response = requests.post(router.url("/invocations"), json=ROW, timeout=5)
    assert response.status_code == 503 and time.monotonic() - started < 1
    assert "Retry-After" not in response.headers
    assert stats(router)["hold"]["enabled"] is False


def test_a_held_request_times_out_with_503_and_retry_after(start_router):
    router, backends_file = start_router([])
    write(backends_file, [], hold={"queue": 4, "timeout_s": 1})
    wait_for(lambda: stats(router)["hold"]["enabled"])
    started = time.monotonic()
    response = requests.post(router.url("/invocations"), json=ROW, timeout=10)
    waited = time.monotonic() - started
    assert response.status_code == 503 and 0.9 <= waited < 5
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "no_backends"
    hold = stats(router)["hold"]
    assert (hold["held_total"], hold["timeouts"], hold["waiting"], hold["cold_starts"]) == (
        1,
        1,
        0,
        0,
    )


def test_a_full_hold_queue_answers_503_without_waiting(start_router):
    router, backends_file = start_router([])
    write(backends_file, [], hold={"queue": 1, "timeout_s": 3})
    wait_for(lambda: stats(router)["hold"]["enabled"])
    first = threading.Thread(
        target=lambda: requests.post(router.url("/invocations"), json=ROW, timeout=10)
    )
    first.start()
    wait_for(lambda: stats(router)["hold"]["waiting"] == 1)
    assert stats(router)["in_flight"] == 1  # a held request is in flight: the autoscaler sees it
    started = time.monotonic()
    second = requests.post(router.url("/invocations"), json=ROW, timeout=10)
    assert second.status_code == 503 and time.monotonic() - started < 1
    assert second.headers["Retry-After"] == "3"
    first.join()
    assert stats(router)["hold"]["rejected"] == 1


def test_held_requests_are_forwarded_once_a_backend_appears(fleet, start_router):
    router, backends_file = start_router([])
    write(backends_file, [], hold={"queue": 8, "timeout_s": 20})
    wait_for(lambda: stats(router)["hold"]["enabled"])
    results: list[int] = []

    def client() -> None:
        results.append(requests.post(router.url("/invocations"), json=ROW, timeout=30).status_code)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()
    wait_for(lambda: stats(router)["hold"]["waiting"] == 3)
    time.sleep(0.3)
    address = f"127.0.0.1:{fleet['sklearn'].port}"
    write(backends_file, [address], hold={"queue": 8, "timeout_s": 20})
    for t in clients:
        t.join()
    assert results == [200, 200, 200]
    after = stats(router)
    assert after["hold"]["cold_starts"] == 1 and after["hold"]["held_total"] == 3
    assert after["hold"]["timeouts"] == 0 and after["hold"]["last_wait_ms"] >= 300
    assert after["requests_total"] == 3 and after["in_flight"] == 0
    assert after["backends"] == {address: {"in_flight": 0}}


def test_in_flight_is_counted_per_backend(start_router):
    """A backend that accepts and never answers: the request stays in flight on it."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(8)
        address = f"127.0.0.1:{stalled.getsockname()[1]}"
        router, _ = start_router([address])
        client = threading.Thread(
            target=lambda: requests.post(router.url("/invocations"), json=ROW, timeout=10)
        )
        client.start()
        # The request counts as in flight when it arrives, on its backend once one is chosen:
        # wait for the second (a snapshot between the two saw 1 and {address: 0} under load).
        wait_for(lambda: stats(router)["backends"].get(address, {}).get("in_flight") == 1)
        now = stats(router)
        assert now["backends"] == {address: {"in_flight": 1}} and now["requests_total"] == 1
        assert now["in_flight"] == 1
        conn, _ = stalled.accept()
        stalled.close()  # then closed before answering: the retries are refused (502)
        conn.close()
        client.join()
    wait_for(lambda: stats(router)["in_flight"] == 0)
    assert stats(router)["backends"][address] == {"in_flight": 0}
