"""Benchmark: what shadow traffic costs the primary (serving/mirror.py in the router).

    CONTROLPLANE_PORT_RANGE=33500-33999 MLFLOW_DISABLE_TELEMETRY=true \\
        .venv/bin/python bench/shadow.py [--duration 10] [--rounds 3] [--concurrency 16]

Builds bench/serving.py's scikit-learn model, starts three real model servers (`python -m
serving`, one worker each: the primary and two candidates, one at idle CPU priority as the
local runtime starts a shadow revision's servers by default, one at normal priority) and the
router (`python -m serving.router`) in front of the primary, on 127.0.0.1. Drives the router
with one-row JSON requests at concurrency 16 (wrk when installed, else the asyncio load
generator of bench/serving.py) in interleaved rounds of four setups: no mirror key, a mirror
at 0 %, a mirror at 100 % to the idle-priority candidate and one to the normal-priority
candidate (the candidate answers every request a second time). Prints the median p50/p99
over the rounds with the mirror's counters (sent, dropped by the bounded queue, completed,
failed), and the CPU per request of the router, the primary and the candidate (from
/proc/<pid>/stat): the router's own cost per mirrored copy apart from the candidate's
competition for the machine's cores.
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


def _spawn(argv: list[str], log: Path, *, idle: bool = False) -> subprocess.Popen:
    """``idle``: under SCHED_IDLE from before exec, as the local runtime starts a shadow
    revision's servers (deployments/runtimes/process.py, CONTROLPLANE_SHADOW_IDLE_PRIORITY)."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}

    def to_idle() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=to_idle if idle else None,
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


def _machine_idle() -> float:
    """Idle CPU seconds of the whole machine so far (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def offer_cost_us(fraction: float, calls: int = 200_000) -> float:
    """CPU microseconds the router's hook adds per proxied request (``Mirror.offer`` plus the
    extra work of the mirrored branch), measured in-process on the router's own event loop:
    fraction 0 samples nothing; fraction 1 with a full queue drops every copy (the worst case
    of the hot path: the candidate cannot keep up)."""
    import asyncio

    from serving import mirror as mirroring
    from serving.router import _request_bytes

    async def run() -> float:
        config = mirroring.parse_config(
            {"fraction": fraction, "backends": ["127.0.0.1:9"], "queue": 1, "workers": 1},
            lambda b: b,
        )
        m = mirroring.Mirror(config)
        for task in m.workers:  # nobody drains: the queue stays full
            task.cancel()
        m.queue.put_nowait(None)
        headers = [(b"host", b"x"), (b"content-type", b"application/json")]
        body = b'{"dataframe_split": {"columns": ["f0"], "data": [[1.0]]}}'
        response = (200, [(b"x-request-id", b"abc")], b'{"predictions": [1]}')
        started = time.process_time()
        for _ in range(calls):
            raw, t0 = _request_bytes(b"POST", b"/invocations", headers, body), time.perf_counter()
            m.offer(b"POST", b"/invocations", raw, response, time.perf_counter() - t0)
        with_hook = time.process_time() - started
        started = time.process_time()
        for _ in range(calls):
            _request_bytes(b"POST", b"/invocations", headers, body)
        without = time.process_time() - started
        m.close()
        return (with_hook - without) / calls * 1e6

    return asyncio.run(run())


def copy_cost_us(backend: str, body: str, burst: int, copies: int = 20_000) -> float:
    """Router CPU microseconds per mirrored copy (the hook, the queue, the worker's write to
    the candidate, reading and parsing its answer, the pair), measured in-process on the
    router's kind of event loop against a real candidate server: ``burst`` copies are
    offered at once (1: one at a time; more: a backlog, as under load), then awaited."""
    import asyncio

    import uvloop

    from serving import mirror as mirroring
    from serving.router import _request_bytes

    async def run() -> float:
        config = mirroring.parse_config(
            {"fraction": 1.0, "backends": [backend], "queue": 65536}, lambda b: b
        )
        m = mirroring.Mirror(config)
        headers = [(b"host", b"x"), (b"content-type", b"application/json")]
        raw = _request_bytes(b"POST", b"/invocations", headers, body.encode())
        response = (200, [(b"x-request-id", b"abc")], b'{"predictions": [1]}')
        state: dict = {"done": 0, "want": 0, "waiter": None}
        record = m._record

        def counted(*args) -> None:
            record(*args)
            state["done"] += 1
            if state["done"] >= state["want"] and not state["waiter"].done():
                state["waiter"].set_result(None)

        m._record = counted

        async def push(count: int) -> None:
            loop = asyncio.get_running_loop()
            for _ in range(0, count, burst):
                state["want"] = state["done"] + burst
                state["waiter"] = loop.create_future()
                for _ in range(burst):
                    m.offer(b"POST", b"/invocations", raw, response, 0.001)
                await state["waiter"]

        await push(2000)  # warm-up: the connections are open
        started = time.process_time()
        await push(copies)
        used = time.process_time() - started
        failed = m.counts["errors"]
        m.close()
        if failed:
            raise SystemExit(f"{failed} copies failed measuring the router's cost per copy")
        return used / copies * 1e6

    return uvloop.run(run())


def _server(model_dir: Path, version: str, port: int, log: Path, *, idle: bool):
    argv = [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--name", "bench",
            "--version", version, "--port", str(port), "--log-level", "WARNING"]  # fmt: skip
    return _spawn(argv, log, idle=idle)


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
    primary_port, idle_port, normal_port, router_port = _ports(4)
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["primary"] = _server(
            model_dir, "1", primary_port, workdir / "primary.log", idle=False
        )
        # Two candidates, one per priority: the product's default (idle, as the local runtime
        # starts a shadow revision's servers) and normal, to show what CPU contention costs.
        procs["idle"] = _server(model_dir, "2", idle_port, workdir / "idle.log", idle=True)
        procs["normal"] = _server(model_dir, "2", normal_port, workdir / "normal.log", idle=False)
        backends_file = workdir / "backends.json"
        primary = f"127.0.0.1:{primary_port}"
        _write(backends_file, [primary], None)
        router_argv = [sys.executable, "-m", "serving.router", "--port", str(router_port),
                       "--backends-file", str(backends_file), "--log-level", "WARNING"]  # fmt: skip
        procs["router"] = _spawn(router_argv, workdir / "router.log")
        for port, key in ((primary_port, "primary"), (idle_port, "idle"), (normal_port, "normal")):
            bench_serving.wait_ready(f"http://127.0.0.1:{port}/ping", procs[key])
        bench_serving.wait_ready(f"http://127.0.0.1:{router_port}/__router/health", procs["router"])
        url = f"http://127.0.0.1:{router_port}/invocations"
        # name -> (fraction, the candidate's port); None: no mirror key at all
        setups: dict[str, tuple[float, int] | None] = {
            "no shadow": None,
            "shadow 0 %": (0.0, idle_port),
            "shadow 100 %, candidate at idle priority (default)": (1.0, idle_port),
            "shadow 100 %, candidate at normal priority": (1.0, normal_port),
        }
        results: dict[str, list[dict]] = {name: [] for name in setups}
        generate(url, body, args.concurrency, 2.0)  # warm-up
        for _ in range(args.rounds):
            for name, setup in setups.items():
                mirror = None
                if setup is not None:
                    mirror = {"name": "r2", "revision": 2, "fraction": setup[0],
                              "backends": [f"127.0.0.1:{setup[1]}"], "queue": 256}  # fmt: skip
                _write(backends_file, [primary], mirror)
                _wait_for_mirror(router_port, None if setup is None else setup[0])
                before = _stats(router_port)
                cpu_before = {k: bench_serving.process_cpu_seconds(p.pid) for k, p in procs.items()}
                idle_before = _machine_idle()
                result = generate(url, body, args.concurrency, args.duration)
                idle_after = _machine_idle()
                cpu_after = {k: bench_serving.process_cpu_seconds(p.pid) for k, p in procs.items()}
                after = _stats(router_port)
                n = max(result["requests"], 1)
                cpu = {k: cpu_after[k] - cpu_before[k] for k in procs}
                result["cpu_router_us"] = cpu["router"] / n * 1e6
                result["cpu_primary_us"] = cpu["primary"] / n * 1e6
                result["cpu_candidate_us"] = (cpu["idle"] + cpu["normal"]) / n * 1e6
                result["idle_cores"] = (idle_after - idle_before) / args.duration
                for key in ("sent", "dropped", "completed", "errors", "batches"):
                    result[key] = after.get(key, 0) - before.get(key, 0)
                results[name].append(result)
                _write(backends_file, [primary], None)
                time.sleep(1.0)  # let the candidate's queue drain before the next run
        copy_cost = {
            burst: statistics.median(
                copy_cost_us(f"127.0.0.1:{normal_port}", body, burst) for _ in range(3)
            )
            for burst in (1, 16)
        }
    finally:
        for proc in procs.values():
            bench_serving.stop(proc)

    micro = {fraction: offer_cost_us(fraction) for fraction in (0.0, 1.0)}

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base = med("no shadow", "p50")
    print(
        f"\nShadow mirroring cost, c={args.concurrency}, {args.rounds} × {args.duration:g} s "
        f"per setup ({loadgen}), one-row JSON to /invocations through the router; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    print(
        "| setup | p50 ms | p99 ms | Δp50 vs no shadow | req/s | errors "
        "| mirrors sent / dropped (queue full) / completed / failed | copies per write |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for name, setup in setups.items():
        runs = results[name]
        errors = sum(r["errors"] for r in runs)
        mirrored, per_write = "—", "—"
        if setup is not None and setup[0]:
            mirrored = " / ".join(
                str(sum(r[k] for r in runs)) for k in ("sent", "dropped", "completed", "errors")
            )
            batches = sum(r["batches"] for r in runs)
            per_write = f"{sum(r['sent'] for r in runs) / batches:.1f}" if batches else "—"
        print(
            f"| {name} | {med(name, 'p50'):.3f} | {med(name, 'p99'):.3f} "
            f"| {med(name, 'p50') - base:+.3f} | {med(name, 'rps'):.0f} | {errors} | {mirrored} "
            f"| {per_write} |"
        )
    print(
        "\nCPU per proxied request (/proc/<pid>/stat, medians over the rounds); the router's "
        "extra CPU per mirrored copy is (its µs/request − the no-shadow figure) × requests / "
        "copies completed:\n"
    )
    print(
        "| setup | router µs/req | primary µs/req | candidate µs/req | router µs per copy | idle cores |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    router_base = med("no shadow", "cpu_router_us")
    for name, setup in setups.items():
        per_copy = "—"
        if setup is not None and setup[0]:
            copies = [
                (r["cpu_router_us"] - router_base) * r["requests"] / r["completed"]
                for r in results[name]
                if r["completed"]
            ]
            per_copy = f"{statistics.median(copies):.1f}" if copies else "—"
        print(
            f"| {name} | {med(name, 'cpu_router_us'):.1f} | {med(name, 'cpu_primary_us'):.1f} "
            f"| {med(name, 'cpu_candidate_us'):.1f} | {per_copy} | {med(name, 'idle_cores'):.2f} |"
        )
    print(
        f"\nRouter CPU added per request by the mirror hook (in-process, 200,000 calls): "
        f"{micro[0.0]:.2f} µs at 0 %, {micro[1.0]:.2f} µs at 100 % with a full queue (copy dropped)"
    )
    print(
        f"\nRouter CPU per mirrored copy (in-process against the candidate's server, 20,000 "
        f"copies, median of 3): {copy_cost[1]:.1f} µs one at a time, {copy_cost[16]:.1f} µs "
        "with a backlog (16 offered at once: one pipelined write per batch)"
    )
    rounds = []
    for name, runs in results.items():
        rounds.append(f"{name}: " + ", ".join(f"{r['p50']:.3f}" for r in runs))
    print("\nper-round p50 ms: " + "; ".join(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
