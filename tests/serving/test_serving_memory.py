"""The prediction log is bounded in bytes: under 100-row traffic the server's memory levels off
at its baseline plus the bound, and what the log drops is counted."""

from __future__ import annotations

import concurrent.futures
import resource
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import REPO
from test_serving_protocols import start

from serving import predlog

BOUND = 8 * 1024 * 1024
# allocator and interpreter noise on top of baseline + bound
SLACK = 24 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def gauges(proc) -> dict[str, float]:
    text = requests.get(proc.url("/metrics"), timeout=5).text
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("serving_prediction_log_")
    }


def send(proc, bodies: list[bytes], threads: int = 4) -> None:
    def run(chunk: list[bytes]) -> None:
        with requests.Session() as session:
            for body in chunk:
                response = session.post(
                    proc.url("/invocations"),
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=10,
                )
                assert response.status_code == 200, response.text

    chunks = [bodies[i::threads] for i in range(threads)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, chunks))


def bodies_of_100_rows(count: int, seed: int) -> list[bytes]:
    import json

    rng = np.random.default_rng(seed)
    # a few distinct bodies are enough: every request's matrix is parsed (and kept) anew
    distinct = [
        json.dumps({"instances": rng.normal(size=(100, 20)).tolist()}).encode() for _ in range(8)
    ]
    return [distinct[i % len(distinct)] for i in range(count)]


@pytest.fixture
def bounded_server(models, tmp_path):
    proc = start(
        models["sklearn"], "mem", "1", tmp_path, "--log-buffer-bytes", str(BOUND), grpc_on=False
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.kill()


def test_100_row_requests_fill_the_log_and_memory_stays_under_the_bound(bounded_server):
    proc = bounded_server
    send(proc, bodies_of_100_rows(100, seed=0))  # warm the allocator and the code paths
    baseline = rss_bytes(proc.proc.pid)
    # each record keeps a 100 x 20 float64 matrix (16 kB): 3,000 of them would be ~48 MiB,
    # more than BOUND + SLACK
    send(proc, bodies_of_100_rows(3000, seed=1))
    after = rss_bytes(proc.proc.pid)
    log = gauges(proc)
    assert log["serving_prediction_log_dropped_total"] > 2000
    assert 0 < log["serving_prediction_log_bytes"] <= BOUND
    assert log["serving_prediction_log_buffered"] < BOUND / 16_000
    assert after <= baseline + BOUND + SLACK, (baseline / 2**20, after / 2**20)
    # what the log holds is still served in full, inputs included
    records = requests.get(proc.url("/predictions"), params={"limit": 5}, timeout=5).json()
    assert records["dropped"] == log["serving_prediction_log_dropped_total"]
    assert len(records["records"][0]["inputs"]["f0"]) == 100


def test_unsampled_inputs_take_no_room_in_the_log(models, tmp_path):
    proc = start(
        models["sklearn"],
        "mem-unsampled",
        "1",
        tmp_path,
        "--log-buffer-bytes",
        str(BOUND),
        "--log-input-sample",
        "0",
        grpc_on=False,
    )
    try:
        proc.wait_ready()
        send(proc, bodies_of_100_rows(200, seed=2), threads=2)
        log = gauges(proc)
        assert log["serving_prediction_log_buffered"] == 200
        assert log["serving_prediction_log_dropped_total"] == 0
        # outputs (100 int64) and the record itself, no 16 kB input matrix
        assert log["serving_prediction_log_bytes"] / 200 < 2_000
        records = requests.get(proc.url("/predictions"), params={"limit": 3}, timeout=5).json()
        assert all(r["inputs"] is None for r in records["records"])
    finally:
        proc.kill()


def test_default_bound_is_an_eighth_of_the_memory_limit(tmp_path, monkeypatch):
    assert predlog.default_max_bytes({"SERVING_MEMORY_LIMIT_MB": "256"}) == 32 * 1024 * 1024
    cgroup = tmp_path / "memory.max"
    cgroup.write_text("536870912\n")
    monkeypatch.setattr(predlog, "_CGROUP_MAX", cgroup)
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    rlimit = None if soft == resource.RLIM_INFINITY else soft
    assert predlog.default_max_bytes({}) == min(512 * 1024 * 1024, rlimit or 2**62) // 8
    cgroup.write_text("max\n")
    expected = predlog.DEFAULT_MAX_BYTES if rlimit is None else rlimit // 8
    assert predlog.default_max_bytes({}) == expected


def test_the_local_runtimes_data_limit_sizes_the_log(models, tmp_path):
    """A server started under RLIMIT_DATA (as the local runtime enforces memory_mb) sizes its
    log to an eighth of it: 1 GiB -> 128 MiB."""
    limit = 1024 * 1024 * 1024

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    proc = start(models["sklearn"], "mem-rlimit", "1", tmp_path, grpc_on=False, launch=False)
    proc._log = open(proc.log_path, "wb")
    proc.proc = subprocess.Popen(
        proc.args,
        cwd=REPO,
        env=proc.env,
        stdout=proc._log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=limited,
    )
    try:
        proc.wait_ready()
        text = requests.get(proc.url("/metrics"), timeout=5).text
        assert "serving_prediction_log_max_bytes 134217728" in text
    finally:
        proc.kill()
