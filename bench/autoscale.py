"""Autoscaling figures (issue 14, bench/scale.py parts c and d), measured end to end through
the REST API of a real control plane (`python -m controlplane.run`: gunicorn, Celery worker
and beat with the 1 s autoscaler poll, MLflow) on the `local` runtime:

  (c) a load ramp 1 -> 32 -> 1 concurrent clients against a deployment with
      {"min_replicas": 1, "max_replicas": 8, "target_in_flight": 8}: replicas over time,
      the p99 latency while scaling up (the first --up-seconds of the 32 clients) and
      afterwards, the time from the 32 clients' start to the first added replica, and the
      time from the load dropping back to 1 client until replicas are back at 1
  (d) scale from zero: a deployment with min_replicas 0 is left idle until it has no
      instance, then --burst concurrent first requests are sent; their latency (the cold
      start: held at the router while the first instance starts) and failed requests,
      over --rounds rounds

  router: the router's primary path with these counters against a baseline checkout's
      router (``--baseline /work/main``): one model server, wrk at concurrency 16 through
      each router in turn, --rounds alternations, medians of p50/p99 and req/s

Usage:
  CONTROLPLANE_PORT_RANGE=34500-34999 .venv/bin/python bench/autoscale.py \
      [--part c|d|both|router] [--high 32] [--high-seconds 60] [--scale-down-window 30] \
      [--idle-before-zero 10] [--rounds 3] [--burst 4] [--baseline /work/main]
Prints markdown. Not a test: nothing here asserts. The machine is shared: rerun for figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))
import deploy as deploy_bench  # noqa: E402

from bench.harness import control_plane  # noqa: E402
from tests.support import free_port, wait_http  # noqa: E402


def _bench_serving():
    """bench/serving.py (its run_wrk), under a name that does not shadow the serving package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROW = json.dumps(
    {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}
)


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Clients:
    """A varying number of keep-alive clients; every request's (start, latency, status)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.records: list[tuple[float, float, int]] = []
        self.lock = threading.Lock()
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def _run(self, stop: threading.Event) -> None:
        conn = None
        while not stop.is_set():
            started = time.monotonic()
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                conn.request(
                    "POST", "/invocations", body=ROW, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except OSError:
                status, conn = 0, None
            with self.lock:
                self.records.append((started, time.monotonic() - started, status))

    def set(self, n: int) -> None:
        while len(self.threads) < n:
            stop = threading.Event()
            t = threading.Thread(target=self._run, args=(stop,), daemon=True)
            t.start()
            self.threads.append((t, stop))
        while len(self.threads) > n:
            t, stop = self.threads.pop()
            stop.set()

    def between(self, start: float, end: float) -> list[tuple[float, float, int]]:
        with self.lock:
            return [r for r in self.records if start <= r[0] < end]


class Watcher:
    """Polls the deployment (replicas wanted, instances ready) and its router every 0.5 s."""

    def __init__(self, api, name: str, port: int) -> None:
        self.api, self.name, self.port = api, name, port
        self.timeline: list[tuple[float, int, int, int]] = []  # t, wanted, ready, in_flight
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                d = self.api.call("GET", f"/deployments/{self.name}")
                ready = sum(
                    1
                    for i in d["instances"]
                    if i["state"] == "ready" and i["revision"] == d["serving_revision"]
                )
                stats = json.loads(http_get(self.port, "/__router/stats"))
                self.timeline.append(
                    (time.monotonic(), d["autoscaling"]["replicas"], ready, stats["in_flight"])
                )
            except Exception as exc:  # noqa: BLE001 - a missed poll is only a gap
                print(f"poll failed: {exc}", file=sys.stderr)
            self.stop.wait(0.5)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)

    def first(self, since: float, predicate) -> float | None:
        for t, wanted, ready, in_flight in self.timeline:
            if t >= since and predicate(wanted, ready, in_flight):
                return t - since
        return None


def http_get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def wait_until(check, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.25)
    raise SystemExit(f"{what}: not within {timeout} s")


def ready_instances(api, name: str) -> int:
    d = api.call("GET", f"/deployments/{name}")
    return sum(1 for i in d["instances"] if i["state"] == "ready")


def part_c(api, args) -> None:
    name = "ramp"
    d = api.call(
        "POST",
        "/deployments",
        {
            "name": name,
            "model": "bench",
            "version": "1",
            "runtime": "local",
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 8,
                "target_in_flight": 8,
                "scale_down_window_s": args.scale_down_window,
            },
        },
    )
    port = int(d["endpoint"].rsplit(":", 1)[1])
    deploy_bench.wait_version(port, "1", timeout=300)
    clients = Clients(port)
    with Watcher(api, name, port) as watch:
        clients.set(1)
        time.sleep(args.low_seconds)
        high_at = time.monotonic()
        clients.set(args.high)
        time.sleep(args.high_seconds)
        low_at = time.monotonic()
        clients.set(1)
        wait_until(
            lambda: (
                watch.timeline
                and watch.timeline[-1][0] > low_at
                and watch.timeline[-1][1] == 1
                and watch.timeline[-1][2] == 1
            ),
            args.scale_down_window + 180,
            "scale down to 1",
        )
        end = time.monotonic()
        clients.set(0)
        time.sleep(1)
    up = clients.between(high_at, high_at + args.up_seconds)
    rest = clients.between(high_at + args.up_seconds, low_at)
    low = clients.between(0, high_at)
    failed = sum(1 for r in clients.records if r[2] != 200)
    first_up = watch.first(high_at, lambda w, r, f: w > 1)
    first_ready = watch.first(high_at, lambda w, r, f: r > 1)
    peak = max(w for t, w, r, f in watch.timeline)
    down = watch.first(low_at, lambda w, r, f: w == 1)
    down_ready = watch.first(low_at, lambda w, r, f: w == 1 and r == 1)
    print()
    print(
        f"### (c) load ramp 1 → {args.high} → 1 clients (local, target 8 in flight/replica, "
        f"scale-down window {args.scale_down_window} s)"
    )
    print()
    print("replicas over time (wanted/ready, in flight at the router), every 5 s from the ramp:")
    print()
    print("| t (s) | clients | wanted | ready | in flight |")
    print("|---|---|---|---|---|")
    next_t = 0.0
    for t, w, r, f in watch.timeline:
        rel = t - high_at
        if rel >= next_t - 0.25:
            n = 1 if rel < 0 or t >= low_at else args.high
            print(f"| {rel:.0f} | {n} | {w} | {r} | {f} |")
            next_t = rel + 5
        if t > end:
            break
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| p99 at 1 client (before the ramp) | {p([r[1] for r in low], 0.99) * 1000:.1f} ms |")
    print(
        f"| p99 during scale-up (first {args.up_seconds} s of {args.high} clients) | "
        f"{p([r[1] for r in up], 0.99) * 1000:.1f} ms |"
    )
    print(
        f"| p99 at {args.high} clients afterwards | {p([r[1] for r in rest], 0.99) * 1000:.1f} ms |"
    )
    print(
        f"| first scale-up decision after the ramp | {first_up:.1f} s |"
        if first_up is not None
        else "| first scale-up | none |"
    )
    print(
        f"| second replica ready after the ramp | {first_ready:.1f} s |"
        if first_ready is not None
        else "| second replica ready | never |"
    )
    print(f"| peak replicas wanted | {peak} |")
    print(
        f"| back to 1 replica wanted after the load drop | {down:.1f} s |"
        if down is not None
        else "| back to 1 | never |"
    )
    print(
        f"| back to 1 replica running after the load drop | {down_ready:.1f} s |"
        if down_ready is not None
        else "| back to 1 running | never |"
    )
    print(f"| requests / failed | {len(clients.records)} / {failed} |")
    api.call("DELETE", f"/deployments/{name}")


def part_d(api, args) -> None:
    name = "coldstart"
    d = api.call(
        "POST",
        "/deployments",
        {
            "name": name,
            "model": "bench",
            "version": "1",
            "runtime": "local",
            "autoscaling": {
                "min_replicas": 0,
                "max_replicas": 2,
                "target_in_flight": 8,
                "idle_before_zero_s": args.idle_before_zero,
            },
        },
    )
    port = int(d["endpoint"].rsplit(":", 1)[1])
    deploy_bench.wait_version(port, "1", timeout=300)
    latencies: list[float] = []
    failed = 0
    for round_ in range(args.rounds):
        idle = wait_until(
            lambda: not api.call("GET", f"/deployments/{name}")["instances"],
            args.idle_before_zero + 120,
            "scale to zero",
        )
        results: list[tuple[int, float]] = []

        def first_request(results: list = results) -> None:
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request(
                    "POST", "/invocations", body=ROW, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except OSError:
                status = 0
            results.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=first_request) for _ in range(args.burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        round_failed = sum(1 for s, _ in results if s != 200)
        failed += round_failed
        latencies += [s for _, s in results]
        stats = json.loads(http_get(port, "/__router/stats"))["hold"]
        print(
            f"round {round_}: scaled to zero after {idle:.1f} s idle wait; first requests "
            f"{', '.join(f'{s:.2f}' for _, s in results)} s; failed {round_failed}; "
            f"router cold starts {stats['cold_starts']}, held {stats['held_total']}, "
            f"timeouts {stats['timeouts']}",
            flush=True,
        )
    d = api.call("GET", f"/deployments/{name}")
    print()
    print(
        f"### (d) scale from zero (local, {args.rounds} rounds × {args.burst} concurrent first requests)"
    )
    print()
    print("| first-request latency p50 | max | failed requests | cold starts counted |")
    print("|---|---|---|---|")
    print(
        f"| {statistics.median(latencies):.2f} s | {max(latencies):.2f} s | {failed} | "
        f"{d['autoscaling']['cold_starts']} |"
    )
    api.call("DELETE", f"/deployments/{name}")


def part_router(args) -> None:
    """The router's primary path: this checkout's router against the baseline's."""
    work = Path(tempfile.mkdtemp(prefix="bench-router-"))
    model_dir = work / "model"
    import io
    import zipfile

    bench_serving = _bench_serving()

    with zipfile.ZipFile(io.BytesIO(deploy_bench.build_model_zip(work / "build"))) as zf:
        zf.extractall(model_dir)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--port", str(server_port),
         "--name", "bench", "--version", "1"],
        cwd=ROOT, env=env, stdout=open(work / "server.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    results: dict[str, list[dict]] = {"baseline": [], "this": []}
    try:
        wait_http(f"http://127.0.0.1:{server_port}/ping", timeout=120, proc=server)
        backends = work / "backends.json"
        backends.write_text(json.dumps({"backends": [f"127.0.0.1:{server_port}"]}))
        for _ in range(args.rounds):
            for label, cwd in (("baseline", Path(args.baseline)), ("this", ROOT)):
                port = free_port()
                router = subprocess.Popen(
                    [sys.executable, "-m", "serving.router", "--port", str(port),
                     "--backends-file", str(backends), "--log-level", "WARNING"],
                    cwd=cwd, env={**env, "PYTHONPATH": str(cwd)},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    wait_http(f"http://127.0.0.1:{port}/__router/health", timeout=30, proc=router)
                    results[label].append(
                        bench_serving.run_wrk(
                            f"http://127.0.0.1:{port}/invocations", ROW, 16, args.router_seconds
                        )
                    )
                finally:
                    router.terminate()
                    router.wait(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print()
    print(
        f"### router primary path (wrk -c16, {args.router_seconds:g} s × {args.rounds} alternations, medians)"
    )
    print()
    print("| router | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    for label, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99")}
        print(
            f"| {label} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | "
            f"{sum(r['errors'] for r in runs)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="both", choices=["c", "d", "both", "router"])
    parser.add_argument("--baseline", default="/work/main", help="checkout with the old router")
    parser.add_argument("--router-seconds", type=float, default=5)
    parser.add_argument("--high", type=int, default=32)
    parser.add_argument("--low-seconds", type=float, default=15)
    parser.add_argument("--high-seconds", type=float, default=60)
    parser.add_argument("--up-seconds", type=float, default=15)
    parser.add_argument("--scale-down-window", type=float, default=30)
    parser.add_argument("--idle-before-zero", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=4)
    args = parser.parse_args()
    if args.part == "router":
        part_router(args)
        return

    with control_plane("bench-autoscale-") as cp:
        api, work = cp.api, cp.work
        api.call("POST", "/models", {"name": "bench"})
        api.call("POST", "/models/bench/versions", files=deploy_bench.build_model_zip(work))
        print(f"control plane log: {work / 'controlplane.log'}", flush=True)
        if args.part in ("c", "both"):
            part_c(api, args)
        if args.part in ("d", "both"):
            part_d(api, args)


if __name__ == "__main__":
    main()
