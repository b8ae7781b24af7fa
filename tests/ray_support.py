"""A real multi-node Ray cluster on loopback for tests and benchmarks (ray.cluster_utils).

Every node binds 127.0.0.1 only (``node_ip_address``), with no dashboard. The head runs
model servers too (each node is one more raylet to start on a 2-core machine); only worker
nodes are removed (a removed head takes the cluster with it). ``loopback_listeners`` reads what the cluster's
processes listen on and talk to, for the bind check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

LOOPBACK = ("127.", "[::1]:", "[::ffff:127.")
# Fast failure detection: a removed node is declared dead within ~2 s instead of ~30 s.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}


@dataclass
class LoopbackCluster:
    """The cluster, its worker nodes by name and its address (``host:port``)."""

    cluster: object
    workers: dict[str, object] = field(default_factory=dict)  # by name; "head" included
    temp_dir: str = ""

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(
        self,
        name: str,
        *,
        cpus: int = 2,
        labels: dict[str, str] | None = None,
        resources: dict[str, float] | None = None,
    ):
        """A node with ``labels`` (custom resources ``key:value``) and ``resources`` as they
        are (``{"ingress": 1}``: a node for routers)."""
        resources = {**{f"{k}:{v}": 100.0 for k, v in (labels or {}).items()}, **(resources or {})}
        node = self.cluster.add_node(
            node_ip_address="127.0.0.1",
            num_cpus=cpus,
            resources=resources,
            include_dashboard=False,
            temp_dir=self.temp_dir,
        )
        self.workers[name] = node
        return node

    def node_of(self, node_id: str) -> str | None:
        """The worker name of the node whose id starts with ``node_id``."""
        for name, node in self.workers.items():
            if node.node_id.startswith(node_id):
                return name
        return None

    def remove_worker(self, name: str) -> None:
        """Kill a worker node at once (no graceful shutdown: a lost machine)."""
        if name == "head":
            raise ValueError("the head node holds the cluster's GCS: remove a worker node")
        self.cluster.remove_node(self.workers.pop(name), allow_graceful=False)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # sessions: logs, sockets


def start_cluster(
    workers: Iterable[tuple[str, int, dict[str, str]]],
    *,
    head_cpus: int = 0,
    head_labels: dict[str, str] | None = None,
) -> LoopbackCluster:
    """A head (``head_cpus``, ``head_labels``, named "head" when it has CPUs) and ``workers``
    (name, cpus, labels), all on 127.0.0.1. Labels are custom resources ``key:value``."""
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    # Keep the driver's bootstrap address on loopback (see deployments/runtimes/ray.py).
    ray_constants.ENABLE_RAY_CLUSTER = False
    temp_dir = tempfile.mkdtemp(prefix="cpray-", dir="/tmp")
    # cluster_utils records the head's address in Ray's default temp dir whatever temp_dir
    # says, and fails on a host where no Ray ran yet (no /tmp/ray).
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": "127.0.0.1",
            "num_cpus": head_cpus,
            "resources": {f"{k}:{v}": 100.0 for k, v in (head_labels or {}).items()},
            "include_dashboard": False,
            "temp_dir": temp_dir,
            "_system_config": SYSTEM_CONFIG,
        },
    )
    out = LoopbackCluster(cluster=cluster, temp_dir=temp_dir)
    if head_cpus:
        out.workers["head"] = cluster.head_node
    try:
        for name, cpus, labels in workers:
            out.add_worker(name, cpus=cpus, labels=labels)
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return out


def descendants(pid: int) -> set[int]:
    """``pid`` and every process under it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        todo.extend(children.get(current, []))
    return found


def _socket_lines(args: list[str], pids: set[int]) -> list[tuple[str, str, str]]:
    """(local, peer, process) of the TCP sockets ``ss`` shows for ``pids``."""
    out = subprocess.run(["ss", "-Hnpt", *args], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines():
        if not any(f"pid={p}," in line for p in pids):
            continue
        parts = line.split()  # state recv-q send-q local peer process
        rows.append((parts[3], parts[4], parts[-1]))
    return rows


def _is_loopback(addr: str) -> bool:
    return addr.startswith(LOOPBACK)


def non_loopback_sockets(pids: set[int]) -> list[tuple[str, str, str]]:
    """TCP sockets of ``pids`` (listening or connected) bound to an address outside loopback
    (``0.0.0.0`` and ``*`` included) or connected to one."""
    bad = []
    for local, peer, proc in _socket_lines(["-a"], pids):
        listener_peer = peer.rsplit(":", 1)[0] in ("*", "0.0.0.0", "[::]")
        if not _is_loopback(local) or not (listener_peer or _is_loopback(peer)):
            bad.append((local, peer, proc))
    return bad


def listeners(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process) of every listening TCP socket of ``pids``."""
    return [(local, proc) for local, _, proc in _socket_lines(["-l"], pids)]
