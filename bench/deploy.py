"""Deployment timings, measured end to end through the REST API of a real
control plane (`python -m controlplane.run`: gunicorn, Celery worker and beat,
MLflow server) on this machine:

  - create: from POST /api/v1/deployments to the first successful prediction
  - update: from PATCH (new version) to the first response from the new version
  - rollback: from POST .../rollback to the first response from the old version
  - failed requests during update and rollback, under a steady concurrent load

Usage: .venv/bin/python bench/deploy.py [--runtime local|docker] [--clients 4] [--rounds 3]
Prints a markdown table. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.harness import Api, build_model_zip, control_plane  # noqa: E402,F401

ROW = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}


def predict_version(port: int) -> str | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request(
            "POST",
            "/invocations",
            body=json.dumps(ROW),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.getheader("X-Model-Version") if resp.status == 200 else None
    except OSError:
        return None


def wait_version(port: int, version: str, timeout: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predict_version(port) == version:
            return time.monotonic() - start
        time.sleep(0.02)
    raise SystemExit(f"version {version} not served within {timeout}s")


class Load:
    def __init__(self, port: int, clients: int) -> None:
        self.port, self.stop, self.ok, self.failed = port, threading.Event(), 0, 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        conn = None
        body = json.dumps(ROW)
        while not self.stop.is_set():
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request(
                    "POST", "/invocations", body=body, headers={"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                resp.read()
                with self.lock:
                    if resp.status == 200:
                        self.ok += 1
                    else:
                        self.failed += 1
            except OSError:
                with self.lock:
                    self.failed += 1
                conn = None

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", default="local", choices=["local", "docker"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    extra = {}
    if args.runtime == "docker":
        extra["CONTROLPLANE_DOCKER_BASE_IMAGE"] = os.environ.get(
            "CONTROLPLANE_DOCKER_BASE_IMAGE", "controlplane-serving-base:bookworm"
        )
    with control_plane("bench-deploy-", env=extra) as cp:
        api, work = cp.api, cp.work
        payload = build_model_zip(work)
        api.call("POST", "/models", {"name": "bench"})
        for _ in range(2):
            api.call("POST", "/models/bench/versions", files=payload)

        rows = []
        for r in range(args.rounds):
            name = f"bench-{args.runtime}-{r}"
            t0 = time.monotonic()
            d = api.call(
                "POST",
                "/deployments",
                {
                    "name": name,
                    "model": "bench",
                    "version": "1",
                    "runtime": args.runtime,
                    "replicas": 1,
                },
            )
            ep_port = int(d["endpoint"].rsplit(":", 1)[1])
            wait_version(ep_port, "1")
            create_s = time.monotonic() - t0
            with Load(ep_port, args.clients) as load:
                time.sleep(1)
                t0 = time.monotonic()
                api.call("PATCH", f"/deployments/{name}", {"version": "2"})
                wait_version(ep_port, "2")
                update_s = time.monotonic() - t0
                while api.call("GET", f"/deployments/{name}")["status"] != "ready":
                    time.sleep(0.1)  # old revision drained
                time.sleep(1)
                t0 = time.monotonic()
                api.call("POST", f"/deployments/{name}/rollback", {})
                wait_version(ep_port, "1")
                rollback_s = time.monotonic() - t0
                while api.call("GET", f"/deployments/{name}")["status"] != "ready":
                    time.sleep(0.1)
                time.sleep(1)
            rows.append((create_s, update_s, rollback_s, load.ok, load.failed))
            api.call("DELETE", f"/deployments/{name}")
            print(
                f"round {r}: create {create_s:.2f}s update {update_s:.2f}s rollback {rollback_s:.2f}s "
                f"requests {load.ok} failed {load.failed}",
                flush=True,
            )

        def med(i):
            return statistics.median(row[i] for row in rows)

        print()
        print(
            f"runtime: {args.runtime}; {args.rounds} rounds, {args.clients} concurrent clients during update and "
            "rollback; medians"
        )
        print(
            "| runtime | create → first prediction | update → new version served | rollback → old version "
            "served | requests under load | failed |"
        )
        print("|---|---|---|---|---|---|")
        print(
            f"| {args.runtime} | {med(0):.2f} s | {med(1):.2f} s | {med(2):.2f} s | "
            f"{sum(r[3] for r in rows)} | {sum(r[4] for r in rows)} |"
        )


if __name__ == "__main__":
    main()
