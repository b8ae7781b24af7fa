"""Router overhead with and without weighted groups, against main's router.

    CONTROLPLANE_PORT_RANGE=33000-33499 .venv/bin/python bench/router_groups.py \
        [--main /work/main] [--duration 10] [--concurrency 16] [--rounds 3]

One model server (the scikit-learn model of bench/serving.py), then routers in front of it,
one at a time, driven by wrk (one-row JSON, keep-alive): main's router (the tree at --main)
and this tree's, with a backends file holding only "backends" (the primary path) and with two
weighted groups of the same server (the canary path: group choice and per-group counters).
Rounds are interleaved so machine noise hits every variant alike; medians are printed.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.serving import FEATURES, build_model, free_port, run_wrk, stop, wait_ready  # noqa: E402


def start_router(tree: Path, backends: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.router", "--port", str(port), "--backends-file",
         str(backends), "--log-level", "WARNING"],
        cwd=tree, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/__router/health", proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--main", type=Path, default=Path("/work/main"))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    work = Path(tempfile.mkdtemp(prefix="bench-router-"))
    row, _ = build_model(work / "model")
    body = json.dumps({"dataframe_split": {"columns": FEATURES, "data": [row]}})
    server_port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model-dir", str(work / "model"), "--name", "bench",
         "--version", "1", "--port", str(server_port), "--log-level", "WARNING"],
        cwd=ROOT, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    backend = f"127.0.0.1:{server_port}"
    plain = work / "plain.json"
    plain.write_text(json.dumps({"backends": [backend]}))
    grouped = work / "grouped.json"
    grouped.write_text(
        json.dumps(
            {
                "backends": [backend],
                "groups": [
                    {"name": "r1", "revision": 1, "weight": 90, "backends": [backend]},
                    {"name": "r2", "revision": 2, "weight": 10, "backends": [backend]},
                ],
            }
        )
    )
    variants = {
        "main router, backends only": (args.main, plain),
        "this router, backends only": (ROOT, plain),
        "this router, 2 weighted groups": (ROOT, grouped),
    }
    results: dict[str, list[dict]] = {k: [] for k in variants}
    try:
        wait_ready(f"http://127.0.0.1:{server_port}/ping", server)
        run_wrk(f"http://127.0.0.1:{server_port}/invocations", body, 4, 1.0)
        direct = run_wrk(
            f"http://127.0.0.1:{server_port}/invocations", body, args.concurrency, args.duration
        )
        for _ in range(args.rounds):
            for name, (tree, backends) in variants.items():
                port = free_port()
                router = start_router(tree, backends, port, work / "router.log")
                try:
                    url = f"http://127.0.0.1:{port}/invocations"
                    run_wrk(url, body, 4, 1.0)
                    results[name].append(run_wrk(url, body, args.concurrency, args.duration))
                finally:
                    stop(router)
                time.sleep(0.5)
    finally:
        stop(server)
    print()
    print(
        f"c={args.concurrency}, {args.duration:g} s per run, {args.rounds} interleaved rounds, medians"
    )
    print("| path | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| direct to the server | {direct['rps']:.0f} | {direct['p50']:.2f} | {direct['p99']:.2f} "
        f"| {direct['errors']} |"
    )
    for name, runs in results.items():

        def med(key: str, runs=runs) -> float:
            return statistics.median(r[key] for r in runs)

        print(
            f"| {name} | {med('rps'):.0f} | {med('p50'):.2f} | {med('p99'):.2f} "
            f"| {sum(r['errors'] for r in runs)} |"
        )


if __name__ == "__main__":
    main()
