"""The traffic router in front of real model servers."""

from __future__ import annotations

import collections
import threading
import time

import requests

ROW = {"instances": [[0.3] * 20]}


def backend(proc) -> str:
    return f"127.0.0.1:{proc.port}"


def test_requests_are_spread_round_robin_over_the_backends(fleet, start_router):
    router, _ = start_router([backend(fleet["sklearn"]), backend(fleet["onnx"])])
    health = requests.get(router.url("/__router/health"), timeout=5).json()
    assert health["backends"] == [backend(fleet["sklearn"]), backend(fleet["onnx"])]
    versions = collections.Counter()
    with requests.Session() as session:
        for i in range(20):
            response = session.post(
                router.url("/invocations"), json=ROW, headers={"X-Request-Id": f"r{i}"}
            )
            assert response.status_code == 200
            assert response.headers["X-Request-Id"] == f"r{i}"
            assert "predictions" in response.json()
            versions[response.headers["X-Model-Version"]] += 1
    assert versions == {"3": 10, "7": 10}


def test_no_backends_is_503_until_the_file_names_one(fleet, start_router, backends_writer):
    router, backends_file = start_router([])
    response = requests.post(router.url("/invocations"), json=ROW, timeout=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_backends"
    assert requests.get(router.url("/__router/health"), timeout=5).json()["backends"] == []
    backends_writer(backends_file, [backend(fleet["sklearn"])])
    deadline = time.monotonic() + 2
    while requests.post(router.url("/invocations"), json=ROW, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the router did not pick up the new backends file"
        time.sleep(0.02)


def test_swapping_backends_under_load_then_stopping_the_old_one_fails_no_request(
    fleet, start_router, backends_writer
):
    old, new = fleet["old"], fleet["new"]
    router, backends_file = start_router([backend(old)])
    stop = threading.Event()
    results: list[tuple[float, int, str]] = []
    failures: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(router.url("/invocations"), json=ROW, timeout=10)
                    results.append((time.monotonic(), response.status_code,
                                    response.headers.get("X-Model-Version", "")))  # fmt: skip
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text}")
                except requests.RequestException as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.7)
        backends_writer(backends_file, [backend(new)])
        deadline = time.monotonic() + 2
        while requests.get(router.url("/__router/health"), timeout=5).json()["backends"] != [
            backend(new)
        ]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        old.proc.send_signal(15)
        assert old.proc.wait(timeout=15) == 0
        stopped = time.monotonic()
        time.sleep(0.7)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert failures == []
    versions = collections.Counter(version for _, _, version in results)
    assert versions["1"] > 5 and versions["2"] > 5, versions
    assert all(version == "2" for t, _, version in results if t > stopped)


def test_a_refused_request_is_retried_on_another_backend_even_under_concurrency(
    fleet, start_router
):
    # One backend is down (a crashed server the control plane has not noticed yet): every
    # request must still be answered by the other one. The round-robin position is shared by
    # concurrent requests, so "the next backend" alone can be the dead one on every retry.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: refuses
        router, _ = start_router([dead, backend(fleet["sklearn"])])
        failures: list[str] = []
        ok = collections.Counter()

        def client() -> None:
            with requests.Session() as session:
                for _ in range(40):
                    response = session.post(router.url("/invocations"), json=ROW, timeout=10)
                    if response.status_code == 200:
                        ok[response.headers["X-Model-Version"]] += 1
                    else:
                        failures.append(f"{response.status_code} {response.text}")

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    assert ok == {"3": 320}
