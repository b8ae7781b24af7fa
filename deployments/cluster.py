"""Reads about where model servers run: the nodes of each runtime (``GET /api/v1/cluster``)
and the node of one instance. The runtimes answer; nothing here is stored."""

from __future__ import annotations

import logging
import os
import socket

from django.conf import settings

from .runtimes import RuntimeError_, get_runtime

logger = logging.getLogger(__name__)


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def local_node() -> dict:
    """This host, where the local runtime's servers (and every router) run."""
    cpus = len(os.sched_getaffinity(0))
    mem = _meminfo()
    total, free = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
    load = os.getloadavg()[0]
    return {
        "runtime": "local",
        "node_id": "local",
        "address": "127.0.0.1",
        "hostname": socket.gethostname(),
        "alive": True,
        "labels": {},
        "resources": {
            "total": {"CPU": float(cpus), "memory": float(total)},
            "free": {"CPU": max(0.0, round(cpus - load, 2)), "memory": float(free)},
            "used": {"CPU": round(min(load, cpus), 2), "memory": float(total - free)},
        },
    }


def cluster_nodes() -> dict:
    """Every node a deployment can run on: this host, and the Ray cluster's nodes when one
    is configured (``ray.error`` says why they are missing when it cannot be reached)."""
    runtimes: dict[str, dict] = {"local": {"configured": True, "error": ""}}
    nodes = [local_node()]
    ray_info = {"configured": bool(settings.CONTROLPLANE_RAY_ADDRESS), "error": ""}
    if ray_info["configured"]:
        try:
            nodes += get_runtime("ray").nodes()
        except RuntimeError_ as exc:
            logger.warning("listing the Ray cluster's nodes: %s", exc)
            ray_info["error"] = str(exc)
    runtimes["ray"] = ray_info
    return {"runtimes": runtimes, "nodes": nodes}


def instance_node(runtime: str, runtime_id: str) -> str:
    """Where an instance runs, for people: ``<node ip>/<node id prefix>`` on ray, else the
    host of the control plane."""
    if runtime == "ray":
        from .runtimes.ray import split_runtime_id

        _, ip, node = split_runtime_id(runtime_id)
        return f"{ip} ({node[:8]})" if ip else "—"
    return "this host"
