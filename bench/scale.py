"""Beyond one host: the ray runtime on a real Ray cluster on loopback (ray.cluster_utils),
driven end to end through the REST API of a real control plane (`python -m controlplane.run`:
gunicorn, Celery worker and beat, MLflow), under a steady concurrent load.

Parts (run one or several with --part; more parts are added to PARTS):
  a  a 2-node, then a 3-node cluster (a node added): create → every replica ready, rolling
     update to v2 and rollback to v1, failed requests during both (one replica per node)
  b  a node holding one of 2 replicas killed under load: seconds until 2 replicas are ready
     again, failed requests until then and afterwards

Usage: CONTROLPLANE_PORT_RANGE=34000-34499 .venv/bin/python bench/scale.py --part a --part b
Prints a markdown table per part. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.deploy import Load, wait_version  # noqa: E402
from bench.harness import Api, build_model_zip, control_plane  # noqa: E402
from tests.ray_support import LoopbackCluster, start_cluster  # noqa: E402


@dataclass
class Bench:
    api: Api
    cluster: LoopbackCluster
    clients: int
    rows: dict[str, list[str]]


def wait_replicas(api: Api, name: str, count: int, *, avoid_node: str = "", timeout=300) -> float:
    """Seconds until ``count`` instances of the serving revision are ready (none on
    ``avoid_node``) and the deployment is ready."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        d = api.call("GET", f"/deployments/{name}")
        if d["status"] == "failed":
            raise SystemExit(f"{name} failed: {d['status_message']}")
        serving = [i for i in d["instances"] if i["revision"] == d["serving_revision"]]
        ready = [
            i
            for i in serving
            if i["state"] == "ready" and (not avoid_node or avoid_node not in i["runtime_id"])
        ]
        if d["status"] == "ready" and len(ready) == count == len(serving):
            return time.monotonic() - start
        time.sleep(0.1)
    raise SystemExit(f"{name}: {count} ready replicas not reached within {timeout}s")


def rollout(b: Bench, name: str, replicas: int) -> None:
    """create → ready; update → v2 served and ready; rollback → v1 served and ready."""
    t0 = time.monotonic()
    d = b.api.call(
        "POST",
        "/deployments",
        {
            "name": name,
            "model": "bench",
            "version": "1",
            "runtime": "ray",
            "replicas": replicas,
            "environment": "shared",
        },
    )
    port = int(d["endpoint"].rsplit(":", 1)[1])
    wait_replicas(b.api, name, replicas)
    create_s = time.monotonic() - t0
    nodes = {i["node"] for i in b.api.call("GET", f"/deployments/{name}")["instances"]}
    with Load(port, b.clients) as load:
        time.sleep(1)
        t0 = time.monotonic()
        b.api.call("PATCH", f"/deployments/{name}", {"version": "2"})
        wait_version(port, "2", timeout=300)
        wait_replicas(b.api, name, replicas)
        update_s = time.monotonic() - t0
        time.sleep(1)
        t0 = time.monotonic()
        b.api.call("POST", f"/deployments/{name}/rollback", {})
        wait_version(port, "1", timeout=300)
        wait_replicas(b.api, name, replicas)
        rollback_s = time.monotonic() - t0
        time.sleep(1)
    b.api.call("DELETE", f"/deployments/{name}")
    b.rows.setdefault("a", []).append(
        f"| {len(b.cluster.workers)} | {replicas} ({len(nodes)} nodes) | {create_s:.1f} s "
        f"| {update_s:.1f} s | {rollback_s:.1f} s | {load.ok} | {load.failed} |"
    )
    print(b.rows["a"][-1], flush=True)


def part_a(b: Bench) -> None:
    while len(b.cluster.workers) < 2:
        b.cluster.add_worker(f"w{len(b.cluster.workers)}")
    rollout(b, "scale-a2", replicas=2)
    b.cluster.add_worker(f"w{len(b.cluster.workers)}")
    rollout(b, "scale-a3", replicas=3)


def part_b(b: Bench) -> None:
    while len(b.cluster.workers) < 2:
        b.cluster.add_worker(f"w{len(b.cluster.workers)}")
    name = "scale-b"
    d = b.api.call(
        "POST",
        "/deployments",
        {
            "name": name,
            "model": "bench",
            "version": "1",
            "runtime": "ray",
            "replicas": 2,
            "environment": "shared",
        },
    )
    port = int(d["endpoint"].rsplit(":", 1)[1])
    wait_replicas(b.api, name, 2)
    instances = b.api.call("GET", f"/deployments/{name}")["instances"]
    victim = None
    for inst in instances:
        node = inst["runtime_id"].rsplit("/", 1)[-1]
        victim = b.cluster.node_of(node)
        if victim and victim != "head":
            break
    if not victim or victim == "head":
        raise SystemExit(f"no worker node holds a replica: {[i['node'] for i in instances]}")
    node_prefix = b.cluster.workers[victim].node_id[:16]
    with Load(port, b.clients) as load:
        time.sleep(2)
        before_ok, before_failed = load.ok, load.failed
        b.cluster.remove_worker(victim)
        back_s = wait_replicas(b.api, name, 2, avoid_node=node_prefix)
        during_ok, during_failed = load.ok - before_ok, load.failed - before_failed
        time.sleep(5)
        after_ok, after_failed = (
            load.ok - before_ok - during_ok,
            load.failed - before_failed - during_failed,
        )
    b.api.call("DELETE", f"/deployments/{name}")
    b.rows.setdefault("b", []).append(
        f"| {len(b.cluster.workers) + 1} → {len(b.cluster.workers)} | {back_s:.1f} s "
        f"| {during_ok} | {during_failed} | {after_ok} | {after_failed} |"
    )
    print(b.rows["b"][-1], flush=True)


PARTS: dict[str, tuple[Callable[[Bench], None], str]] = {
    "a": (
        part_a,
        "| nodes | replicas | create → ready | update → v2 ready | rollback → v1 ready "
        "| requests | failed |\n|---|---|---|---|---|---|---|",
    ),
    "b": (
        part_b,
        "| nodes | node killed → 2 replicas ready | requests until then | failed until then "
        "| requests in the 5 s after | failed after |\n|---|---|---|---|---|---|",
    ),
}


# Parts (c) load ramp and (d) scale from zero run on the local runtime: bench/autoscale.py.
LOCAL_PARTS = ("c", "d")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--part", action="append", choices=sorted([*PARTS, *LOCAL_PARTS]), default=None
    )
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    chosen = args.part or sorted([*PARTS, *LOCAL_PARTS])
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for part in [p for p in chosen if p in LOCAL_PARTS]:
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "autoscale.py"), "--part", part],
            cwd=ROOT,
            check=True,
        )
    parts = [p for p in chosen if p in PARTS]
    if not parts:
        return

    cluster = start_cluster([("w1", 2, {})], head_cpus=2)
    extra = {
        "CONTROLPLANE_RAY_ADDRESS": cluster.address,
        "CONTROLPLANE_RAY_NODE_IP": "127.0.0.1",
        "CONTROLPLANE_RECONCILE_INTERVAL": "1",
    }
    owners: list[Path] = []
    try:
        with control_plane("bench-scale-", env=extra, startup_timeout=300) as cp:
            owners.append(cp.work / "var" / "install_id")
            api = cp.api
            payload = build_model_zip(cp.work)
            api.call("POST", "/models", {"name": "bench"})
            for _ in range(2):
                api.call("POST", "/models/bench/versions", files=payload)
            bench = Bench(api=api, cluster=cluster, clients=args.clients, rows={})
            for part in parts:
                PARTS[part][0](bench)
            print(
                f"\nray runtime on a loopback Ray cluster; {args.clients} concurrent clients; "
                f"log {cp.log}"
            )
            for part in parts:
                print(f"\npart {part}\n{PARTS[part][1]}")
                print("\n".join(bench.rows.get(part, [])))
    finally:
        # The model servers die with their actors, the actors with the cluster.
        cluster.shutdown()
        for owner in owners:  # what the actors unpacked on their nodes (all on this host)
            if owner.exists():
                shutil.rmtree(
                    Path(tempfile.gettempdir()) / "controlplane-ray" / owner.read_text().strip(),
                    ignore_errors=True,
                )


if __name__ == "__main__":
    main()
