"""Benchmark: what shadow traffic costs the primary (serving/mirror.py in the router).

    CONTROLPLANE_PORT_RANGE=33500-33999 MLFLOW_DISABLE_TELEMETRY=true \\
        .venv/bin/python bench/shadow.py [--duration 10] [--rounds 3] [--concurrency 16]

Builds bench/serving.py's scikit-learn model, starts two real model servers (the primary and
the candidate, `python -m serving`, one worker each) and the router (`python -m
serving.router`) in front of the primary, on 127.0.0.1. Drives the router with one-row JSON
requests at concurrency 16 (wrk when installed, else the asyncio load generator of
bench/serving.py) in interleaved rounds of three setups: no mirror key, a mirror at 0 % and a
mirror at 100 % (the candidate answers every request a second time). Prints one markdown
table of the median p50/p99 over the rounds and the mirror's counters (sent, dropped by the
bounded queue, candidate errors). Everything shares the machine's cores: at 100 % the
candidate's server competes with the primary's for CPU, which is part of the real cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The repository first: bench/serving.py would otherwise stand in for the serving package.
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("bench_serving", REPO / "bench" / "serving.py")
bench_serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_serving)


def _ports(count: int) -> list[int]:
    """Free ports from CONTROLPLANE_PORT_RANGE when set (the shared machine's rule)."""
    import socket

    spec = os.environ.get("CONTROLPLANE_PORT_RANGE", "")
    if not spec:
        return [bench_serving.free_port() for _ in range(count)]
    low, _, high = spec.partition("-")
    found = []
    for port in range(int(low), int(high) + 1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise SystemExit("no free ports in CONTROLPLANE_PORT_RANGE")


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _write(path: Path, backends: list[str], mirror: dict | None) -> None:
    body: dict = {"backends": backends}
    if mirror is not None:
        body["mirror"] = mirror
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def _stats(router_port: int) -> dict:
    url = f"http://127.0.0.1:{router_port}/__router/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read()).get("mirror") or {}


def _wait_for_mirror(router_port: int, wanted: float | None) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = _stats(router_port)
        if (wanted is None and not stats) or (stats and stats.get("fraction") == wanted):
            return
        time.sleep(0.05)
    raise SystemExit(f"the router did not pick up the mirror setting {wanted}")


def offer_cost_us(fraction: float, calls: int = 200_000) -> float:
    """CPU microseconds the router's hook adds per proxied request (``Mirror.offer`` plus the
    extra work of the mirrored branch), measured in-process on the router's own event loop:
    fraction 0 samples nothing; fraction 1 with a full queue drops every copy (the worst case
    of the hot path: the candidate cannot keep up)."""
    import asyncio

    from serving import mirror as mirroring
    from serving.router import Upstream, _request_bytes

    async def run() -> float:
        config = mirroring.parse_config(
            {"fraction": fraction, "backends": ["127.0.0.1:9"], "queue": 1, "workers": 1},
            lambda b: b,
        )
        m = mirroring.Mirror(config, Upstream)
        for task in m.workers:  # nobody drains: the queue stays full
            task.cancel()
        m.queue.put_nowait(None)
        headers = [(b"host", b"x"), (b"content-type", b"application/json")]
        body = b'{"dataframe_split": {"columns": ["f0"], "data": [[1.0]]}}'
        response = (200, [(b"x-request-id", b"abc")], b'{"predictions": [1]}')
        started = time.process_time()
        for _ in range(calls):
            raw, t0 = _request_bytes(b"POST", b"/invocations", headers, body), time.perf_counter()
            m.offer(b"POST", b"/invocations", raw, response, t0)
        with_hook = time.process_time() - started
        started = time.process_time()
        for _ in range(calls):
            _request_bytes(b"POST", b"/invocations", headers, body)
        without = time.process_time() - started
        m.close()
        return (with_hook - without) / calls * 1e6

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setup")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    args = parser.parse_args()
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    generate = bench_serving.run_wrk if loadgen == "wrk" else bench_serving.run_python

    workdir = Path(tempfile.mkdtemp(prefix="bench-shadow-"))
    model_dir = workdir / "model"
    row, _ = bench_serving.build_model(model_dir)
    body = json.dumps({"dataframe_split": {"columns": bench_serving.FEATURES, "data": [row]}})
    primary_port, candidate_port, router_port = _ports(3)
    procs = []
    try:
        for port, version in ((primary_port, "1"), (candidate_port, "2")):
            procs.append(
                _spawn(
                    [
                        sys.executable,
                        "-m",
                        "serving",
                        "--model-dir",
                        str(model_dir),
                        "--name",
                        "bench",
                        "--version",
                        version,
                        "--port",
                        str(port),
                        "--log-level",
                        "WARNING",
                    ],
                    workdir / f"server-{version}.log",
                )  # fmt: skip
            )
        backends_file = workdir / "backends.json"
        primary, candidate = f"127.0.0.1:{primary_port}", f"127.0.0.1:{candidate_port}"
        _write(backends_file, [primary], None)
        procs.append(
            _spawn(
                [
                    sys.executable,
                    "-m",
                    "serving.router",
                    "--port",
                    str(router_port),
                    "--backends-file",
                    str(backends_file),
                    "--log-level",
                    "WARNING",
                ],
                workdir / "router.log",
            )  # fmt: skip
        )
        for port, proc in zip((primary_port, candidate_port), procs, strict=False):
            bench_serving.wait_ready(f"http://127.0.0.1:{port}/ping", proc)
        bench_serving.wait_ready(f"http://127.0.0.1:{router_port}/__router/health", procs[-1])
        url = f"http://127.0.0.1:{router_port}/invocations"
        setups = {"no shadow": None, "shadow 0 %": 0.0, "shadow 100 %": 1.0}
        results: dict[str, list[dict]] = {name: [] for name in setups}
        mirror_counts: dict[str, dict] = {}
        generate(url, body, args.concurrency, 2.0)  # warm-up
        for _ in range(args.rounds):
            for name, fraction in setups.items():
                mirror = None
                if fraction is not None:
                    mirror = {"name": "r2", "revision": 2, "fraction": fraction,
                              "backends": [candidate], "queue": 256}  # fmt: skip
                _write(backends_file, [primary], mirror)
                _wait_for_mirror(router_port, fraction)
                before = _stats(router_port)
                result = generate(url, body, args.concurrency, args.duration)
                after = _stats(router_port)
                results[name].append(result)
                if fraction:
                    counts = mirror_counts.setdefault(name, {"sent": 0, "dropped": 0, "errors": 0})
                    for key in counts:
                        counts[key] += after.get(key, 0) - before.get(key, 0)
                _write(backends_file, [primary], None)
                time.sleep(1.0)  # let the candidate's queue drain before the next run
    finally:
        for proc in procs:
            bench_serving.stop(proc)

    micro = {fraction: offer_cost_us(fraction) for fraction in (0.0, 1.0)}
    base = statistics.median(r["p50"] for r in results["no shadow"])
    print(
        f"\nShadow mirroring cost, c={args.concurrency}, {args.rounds} × {args.duration:g} s "
        f"per setup ({loadgen}), one-row JSON to /invocations through the router; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    print(
        "| setup | p50 ms | p99 ms | Δp50 vs no shadow | req/s | errors | mirrors sent / dropped / failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in setups:
        runs = results[name]
        p50 = statistics.median(r["p50"] for r in runs)
        p99 = statistics.median(r["p99"] for r in runs)
        rps = statistics.median(r["rps"] for r in runs)
        errors = sum(r["errors"] for r in runs)
        counts = mirror_counts.get(name)
        mirrored = f"{counts['sent']} / {counts['dropped']} / {counts['errors']}" if counts else "—"
        print(
            f"| {name} | {p50:.3f} | {p99:.3f} | {p50 - base:+.3f} | {rps:.0f} | {errors} | {mirrored} |"
        )
    print(
        f"\nRouter CPU added per request by the mirror hook (in-process, 200,000 calls): "
        f"{micro[0.0]:.2f} µs at 0 %, {micro[1.0]:.2f} µs at 100 % with a full queue (copy dropped)"
    )
    rounds = []
    for name, runs in results.items():
        rounds.append(f"{name}: " + ", ".join(f"{r['p50']:.3f}" for r in runs))
    print("\nper-round p50 ms: " + "; ".join(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
