"""The ray runtime: model servers on the nodes of an existing Ray cluster.

Each instance is a detached, named Ray actor (ray_actor.ModelServerActor) in the namespace
``controlplane-<install id>``; the actor starts and supervises ``python -m serving`` on its
node. Ray's scheduler places it by the instance's resources: ``cpu`` as num_cpus, ``memory_mb``
as memory, ``gpu`` as (fractional) num_gpus, and each ``placement`` label ``key=value`` as a
custom resource ``key:value`` that the nodes meant for it declare (``ray start --resources
'{"zone:a": 100}'``). Replicas spread over the nodes (the SPREAD strategy).

Nodes share nothing with the control plane's disk: the model files and the model server's
code go to the actor through Ray's object store, and the model's environment (the
resolution of deployments/environments.py) is built on the node. The actors are found again
by name (``ray.util.list_named_actors``) and asked their labels, so a restarted control plane
adopts them, and the stray sweep stops those no record names. Ray types stay in this module.

The runtime id is ``<actor name>@<node ip>/<node id prefix>``: the router reaches the server
at the node's ip and the instance's port, and the deployment page shows the node.

Where the deployment's router (its stable endpoint) runs: when the cluster has a live node
with an ``ingress`` custom resource (``ray start --resources '{"ingress": 1}'``) and
CONTROLPLANE_RAY_INGRESS is ``auto``, as a detached named actor (ray_actor.RouterActor,
``router.<deployment>``) on such a node, which runs ``python -m serving.router`` there on the
node's address and the deployment's port and is sent the backends document by the control
plane (``router_push``). Why there: the endpoint then depends on nothing on the control
plane's host, so it keeps answering while that host restarts, and the endpoint's address is
one a client can be given on the cluster's network. Without an ingress node the router stays on
the control plane's host (deployments/router.py), as for every runtime: a cluster with no
node set aside for traffic gets no router placed on a node meant for model servers, and the
router is still restarted with the host by the reconciler. The router id of an ingress router is
``ray:<node ip>/<node id prefix>`` (deployments/router.py reads the endpoint's host from it).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import os
import secrets
import socket
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

from .. import environments
from .base import InstanceSpec, InstanceStatus, Progress, RuntimeError_

logger = logging.getLogger(__name__)

INGRESS_RESOURCE = "ingress"  # the custom resource of the nodes where routers run
ROUTER_PREFIX = "router."  # + the deployment's name: one router actor per deployment
CALL_TIMEOUT = 5.0  # one call to an actor; a dead node's actors answer with an error sooner
START_TIMEOUT = 120.0  # from creating the actor until it runs on a node (scheduling + worker)
_CODE_DIRS = ("serving",)
_lock = threading.Lock()


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _real_std_streams():
    """sys.stdout/sys.stderr with file descriptors while Ray connects: ray.init enables
    faulthandler on sys.stderr, which Celery's worker replaces by a LoggingProxy without one."""
    saved = sys.stdout, sys.stderr
    for name in ("stdout", "stderr"):
        try:
            getattr(sys, name).fileno()
        except (AttributeError, OSError, ValueError):
            setattr(sys, name, getattr(sys, f"__{name}__") or open(os.devnull, "w"))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _reachable(address: str, timeout: float = 3.0) -> None:
    """Fail at once when nothing answers at the cluster's address: ray.init retries a dead
    GCS for minutes, which would hold an API request or a reconcile pass that long."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise RuntimeError_(f"the Ray cluster at {address} does not answer: {exc}") from exc


def split_runtime_id(runtime_id: str) -> tuple[str, str, str]:
    """(actor name, node ip, node id prefix) of a ray runtime id."""
    name, _, where = runtime_id.partition("@")
    ip, _, node = where.partition("/")
    return name, ip, node


def address_of(runtime_id: str, port: int) -> str:
    """Where the instance answers: its node's ip and its port."""
    ip = split_runtime_id(runtime_id)[1] or "127.0.0.1"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def router_id(info: dict) -> str:
    """``ray:<node ip>/<node id prefix>``: an ingress router's id (its node, where it answers)."""
    return f"ray:{info['node_ip']}/{info['node_id'][:16]}"


def _tar(members: list[tuple[Path, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, arcname in members:
            tar.add(
                path,
                arcname=arcname,
                filter=lambda info: None if "__pycache__" in info.name else info,
            )
    return buf.getvalue()


class RayRuntime:
    name = "ray"

    def __init__(
        self,
        *,
        address: str,
        owner: str,
        code_root: Path,
        admin_token: Callable[[str], str],
        index: Callable[[], environments.IndexOptions] | None = None,
        node_ip: str | None = None,
        gc_after_s: float = 86400.0,
    ) -> None:
        """``address``: the cluster's GCS address (RAY_ADDRESS, ``host:6379``), or "" when no
        cluster is configured (every call then raises RuntimeError_). ``node_ip``: the address
        this control plane's Ray driver listens on (127.0.0.1 for a cluster on loopback).
        ``gc_after_s``: what the actors leave on a node (model files, environments, logs,
        router directories) is removed once no actor uses it and none did for that long."""
        self.cluster_address = address
        self.owner = owner
        self.namespace = f"controlplane-{owner}"
        self.code_root = Path(code_root)
        self.admin_token = admin_token
        self.index = index
        self.node_ip = node_ip or ("127.0.0.1" if address and _is_loopback(address) else None)
        self.gc_after_s = float(gc_after_s)
        self._bundles: dict[str, object] = {}

    # --- connection -------------------------------------------------------------------------

    def _ray(self):
        """The ``ray`` module, connected to the cluster (once per process)."""
        if not self.cluster_address:
            raise RuntimeError_("no Ray cluster configured: set CONTROLPLANE_RAY_ADDRESS")
        try:
            import ray
            import ray._private.ray_constants as ray_constants
        except ImportError as exc:
            raise RuntimeError_(f"the ray package is not installed: {exc}") from exc
        with _lock:
            if ray.is_initialized():
                return ray
            if self.node_ip and _is_loopback(self.node_ip):
                # Ray replaces a loopback bootstrap address by this host's "reachable" address
                # unless it thinks multi-node clusters are off: a cluster on loopback must
                # stay on loopback (the driver would otherwise dial the host's public IP).
                ray_constants.ENABLE_RAY_CLUSTER = False
            _reachable(self.cluster_address)
            try:
                with _real_std_streams():
                    ray.init(
                        address=self.cluster_address,
                        namespace=self.namespace,
                        _node_ip_address=self.node_ip,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                        configure_logging=False,
                    )
            except Exception as exc:
                raise RuntimeError_(
                    f"cannot connect to the Ray cluster at {self.cluster_address}: {exc}"
                ) from exc
            return ray

    def _actor_class(self, ray, name: str = "ModelServerActor"):
        import cloudpickle

        from . import ray_actor

        # By value: the nodes need not have this repository.
        cloudpickle.register_pickle_by_value(ray_actor)
        return ray.remote(getattr(ray_actor, name))

    # --- the Runtime interface --------------------------------------------------------------

    def address(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def prepare(self, spec: InstanceSpec, *, progress: Progress | None = None) -> None:
        if not Path(spec.model_dir, "MLmodel").exists():
            raise RuntimeError_(f"no MLflow model at {spec.model_dir}")
        self._environment_plan(spec)  # a model whose requirements cannot be read fails now
        ray = self._ray()
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if not alive:
            raise RuntimeError_("the Ray cluster has no live node")
        wanted = _resources(spec)
        fits = [
            n
            for n in alive
            if all(n.get("Resources", {}).get(k, 0) >= v for k, v in wanted["resources"].items())
        ]
        if not fits:
            raise RuntimeError_(
                "no node of the Ray cluster has the custom resources "
                + ", ".join(sorted(wanted["resources"]))
                + " (placement labels)"
            )
        if progress:
            progress(f"Ray cluster: {len(fits)} of {len(alive)} live node(s) fit the placement")

    def _environment_plan(self, spec: InstanceSpec) -> dict | None:
        if spec.environment == "shared":
            return None
        resolved = environments.resolve(spec.model_dir)
        plan = {
            "mode": spec.environment,
            "key": resolved.key,
            "requirements": list(resolved.install_requirements),
            "python": resolved.python,
        }
        if self.index is not None:
            options = self.index()
            plan.update(uv_args=options.uv_args(), uv_env=options.uv_env())
            plan["pip_args"] = options.pip_args()
        return plan

    def _bundle(self, ray, spec: InstanceSpec):
        """The model files and the server's code, in the object store (once per model)."""
        key = f"{spec.model_sha256}:{spec.model_dir}"
        ref = self._bundles.get(key)
        if ref is None:
            members = [(Path(spec.model_dir), "model")]
            members += [(self.code_root / d, f"code/{d}") for d in _CODE_DIRS]
            ref = ray.put(_tar(members))
            if len(self._bundles) > 16:
                self._bundles.clear()
            self._bundles[key] = ref
        return ref

    def start(self, spec: InstanceSpec) -> InstanceStatus:
        if not Path(spec.model_dir, "MLmodel").exists():
            raise RuntimeError_(f"no MLflow model at {spec.model_dir}")
        ray = self._ray()
        from ray.exceptions import GetTimeoutError, RayActorError

        name = f"{spec.deployment}.r{spec.revision}.{spec.ordinal}.{secrets.token_hex(3)}"
        labels = {
            "owner": self.owner,
            "deployment": spec.deployment,
            "revision": spec.revision,
            "ordinal": spec.ordinal,
            "instance": spec.instance_name,
            "port": spec.port,
        }
        # No CONTROLPLANE_OWNER: on a node that is also the control plane's host, the local
        # runtime would take the server for one of its own processes (and sweep it).
        server_env = {
            "CONTROLPLANE_RAY_OWNER": self.owner,
            "CONTROLPLANE_DEPLOYMENT": spec.deployment,
            "CONTROLPLANE_REVISION": str(spec.revision),
            "CONTROLPLANE_ORDINAL": str(spec.ordinal),
            "CONTROLPLANE_INSTANCE": spec.instance_name,
            "SERVING_ADMIN_TOKEN": self.admin_token(spec.deployment),
        }
        if spec.predict_method:
            server_env["SERVING_PREDICT_METHOD"] = spec.predict_method
        server = {
            "model_name": spec.model_name,
            "model_version": spec.model_version,
            "port": spec.port,
            "max_batch_size": spec.max_batch_size,
            "max_batch_delay_ms": spec.max_batch_delay_ms,
            "env": dict(spec.env),
            "server_env": server_env,
            "gc_after_s": self.gc_after_s,
        }
        plan = self._environment_plan(spec)
        wanted = _resources(spec)
        actor_class = self._actor_class(ray)
        try:
            actor = actor_class.options(
                name=name,
                namespace=self.namespace,
                lifetime="detached",
                max_restarts=0,
                max_concurrency=4,
                scheduling_strategy="SPREAD",
                **wanted,
            ).remote(labels, server, self._bundle(ray, spec), plan)
            info = ray.get(actor.status.remote(), timeout=START_TIMEOUT)
        except (GetTimeoutError, RayActorError) as exc:
            self._kill(ray, name)
            raise RuntimeError_(
                f"the Ray actor for {spec.instance_name} did not start: {exc}"
            ) from exc
        except Exception as exc:
            self._kill(ray, name)
            raise RuntimeError_(f"cannot create the Ray actor: {exc}") from exc
        runtime_id = f"{name}@{info['node_ip']}/{info['node_id'][:16]}"
        return self._status(runtime_id, info)

    def _kill(self, ray, name: str) -> None:
        try:
            ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True)
        except Exception:
            pass

    def _status(self, runtime_id: str, info: dict) -> InstanceStatus:
        labels = info.get("labels", {})
        return InstanceStatus(
            runtime_id=runtime_id,
            deployment=str(labels.get("deployment", "")),
            revision=int(labels.get("revision", 0)),
            ordinal=int(labels.get("ordinal", 0)),
            address=address_of(runtime_id, int(labels.get("port", 0))),
            running=bool(info.get("running")),
            exit_code=info.get("exit_code"),
        )

    def _handle(self, ray, name: str):
        try:
            return ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            return None  # no live actor by that name: dead (its node too, maybe) or stopped

    def stop(self, runtime_id: str, *, timeout: float = 10.0) -> None:
        ray = self._ray()
        name = split_runtime_id(runtime_id)[0]
        actor = self._handle(ray, name)
        if actor is None:
            return
        try:
            ray.get(actor.stop.remote(timeout), timeout=timeout + CALL_TIMEOUT)
        except Exception as exc:  # dead node, or a server that would not stop
            logger.info("stopping %s gracefully: %s", name, exc)
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:
            logger.info("killing actor %s: %s", name, exc)

    def inspect(self, runtime_id: str) -> InstanceStatus | None:
        ray = self._ray()
        name, ip, node = split_runtime_id(runtime_id)
        actor = self._handle(ray, name)
        if actor is None:
            return None
        info = self._ask(ray, [actor])[0]
        if info is None:
            # No answer in time: not alive if Ray says its node is dead (the actor follows
            # soon); else a slow worker on a loaded node, left to the readiness probe rather
            # than restarted for it.
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            return InstanceStatus(
                runtime_id=runtime_id,
                deployment="",
                revision=0,
                ordinal=0,
                address=address_of(runtime_id, 0),
                running=bool(node) and any(n.startswith(node) for n in alive),
            )
        return self._status(runtime_id, info)

    def _ask(self, ray, actors: list) -> list[dict | None]:
        """Every actor's status, None for those that did not answer within CALL_TIMEOUT."""
        refs = [a.status.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=CALL_TIMEOUT)
        done = set(ready)
        out: list[dict | None] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=0) if ref in done else None)
            except Exception:
                out.append(None)
        return out

    def list_owned(self) -> list[InstanceStatus]:
        ray = self._ray()
        names = [n for n in ray.util.list_named_actors() if n.count(".") >= 3]
        handles = [(n, self._handle(ray, n)) for n in names]
        handles = [(n, h) for n, h in handles if h is not None]
        found = []
        for (name, _), info in zip(handles, self._ask(ray, [h for _, h in handles]), strict=True):
            if info is None:
                # Not answering (a dying node, a busy worker): left out rather than reported
                # under a runtime id no record has, which the sweep would take for a stray.
                # A dead one is gone from Ray soon; a slow one is listed on the next call.
                continue
            if info.get("labels", {}).get("owner") != self.owner:
                continue
            found.append(self._status(f"{name}@{info['node_ip']}/{info['node_id'][:16]}", info))
        return found

    def logs(self, runtime_id: str, *, tail: int = 100) -> str:
        ray = self._ray()
        actor = self._handle(ray, split_runtime_id(runtime_id)[0])
        if actor is None:
            return ""
        try:
            return ray.get(actor.logs.remote(tail), timeout=CALL_TIMEOUT)
        except Exception as exc:
            return f"[controlplane] the instance's node did not answer: {type(exc).__name__}"

    # --- routers on ingress nodes -------------------------------------------------------------

    def ingress_nodes(self) -> list[str]:
        """Ids of the live nodes with an ``ingress`` resource (where routers may run)."""
        ray = self._ray()
        return [
            n["NodeID"]
            for n in ray.nodes()
            if n.get("Alive") and n.get("Resources", {}).get(INGRESS_RESOURCE, 0) > 0
        ]

    def _code(self, ray):
        """The router's code (``serving/``) in the object store, once per process."""
        ref = self._bundles.get("code")
        if ref is None:
            ref = ray.put(_tar([(self.code_root / d, f"code/{d}") for d in _CODE_DIRS]))
            self._bundles["code"] = ref
        return ref

    def router_start(self, deployment: str, port: int, document: str) -> str:
        """Run ``deployment``'s router on an ingress node (or adopt the one that runs, by its
        name) with ``document`` as its backends file; its router id."""
        ray = self._ray()
        if not self.ingress_nodes():
            raise RuntimeError_(
                f"no live node of the Ray cluster has an {INGRESS_RESOURCE!r} resource"
            )
        labels = {"owner": self.owner, "deployment": deployment, "port": port}
        for _ in range(2):
            info = self._router_actor(ray, labels, document)
            if info["running"]:
                break
            # Adopted, but its router gave up (a port taken on its node): a new actor,
            # which Ray may place on another ingress node.
            logger.warning("router actor of %s failed: %s", deployment, info.get("error"))
            self.router_stop(deployment, timeout=2)
        else:
            raise RuntimeError_(f"the router actor of {deployment} failed: {info.get('error')}")
        if int(info["labels"].get("port", 0)) != port:
            # Someone else's port: not this deployment's endpoint (a name reused after a crash).
            self.router_stop(deployment, timeout=2)
            raise RuntimeError_(f"the router actor of {deployment} listened on another port")
        self.router_push(deployment, document)  # an adopted one is brought up to date
        return router_id(info)

    def _router_actor(self, ray, labels: dict, document: str) -> dict:
        """The status of the router actor of ``labels["deployment"]``, created if none."""
        from ray.exceptions import GetTimeoutError, RayActorError

        deployment = labels["deployment"]
        try:
            actor = (
                self._actor_class(ray, "RouterActor")
                .options(
                    name=ROUTER_PREFIX + deployment,
                    namespace=self.namespace,
                    get_if_exists=True,  # a router that runs is adopted, never started twice
                    lifetime="detached",
                    max_restarts=0,
                    max_concurrency=4,
                    num_cpus=0,
                    resources={INGRESS_RESOURCE: 0.001},
                    scheduling_strategy="SPREAD",
                )
                .remote(labels, self._code(ray), document, self.gc_after_s)
            )
            info = ray.get(actor.status.remote(), timeout=START_TIMEOUT)
        except (GetTimeoutError, RayActorError) as exc:
            self._kill(ray, ROUTER_PREFIX + deployment)
            raise RuntimeError_(f"the router actor of {deployment} did not start: {exc}") from exc
        except Exception as exc:
            raise RuntimeError_(f"cannot create the router actor of {deployment}: {exc}") from exc
        return info

    def router_inspect(self, deployment: str, known_id: str = "") -> dict | None:
        """The router actor's status (``running``, ``router_id``, ``port``), None when gone.
        One that does not answer in time counts as running while the node of ``known_id``
        (its router id as last recorded) is alive: a slow node is not a reason to move the
        endpoint."""
        ray = self._ray()
        try:
            actor = self._handle(ray, ROUTER_PREFIX + deployment)
            if actor is None:
                return None
            info = self._ask(ray, [actor])[0]
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")} if info is None else set()
        except Exception as exc:  # the cluster's GCS does not answer
            raise RuntimeError_(f"cannot ask the Ray cluster about {deployment}: {exc}") from exc
        if info is None:
            node = known_id.rpartition("/")[2]
            if node and any(n.startswith(node) for n in alive):
                return {"running": True, "router_id": known_id, "port": 0, "pid": None}
            return None
        return {
            "running": bool(info.get("running")),
            "router_id": router_id(info),
            "port": int(info["labels"].get("port", 0)),
            "pid": info.get("pid"),
            "starts": info.get("starts", 0),
            "error": info.get("error", ""),
        }

    def router_push(self, deployment: str, document: str) -> bool:
        """Send the backends document; True if the router's changed."""
        ray = self._ray()
        actor = self._handle(ray, ROUTER_PREFIX + deployment)
        if actor is None:
            raise RuntimeError_(f"the router actor of {deployment} is gone")
        try:
            return bool(ray.get(actor.push.remote(document), timeout=CALL_TIMEOUT))
        except Exception as exc:
            raise RuntimeError_(f"the router actor of {deployment} did not answer: {exc}") from exc

    def router_stop(self, deployment: str, *, timeout: float = 10.0) -> None:
        ray = self._ray()
        actor = self._handle(ray, ROUTER_PREFIX + deployment)
        if actor is None:
            return
        try:
            ray.get(actor.stop.remote(timeout), timeout=timeout + CALL_TIMEOUT)
        except Exception as exc:
            logger.info("stopping the router of %s gracefully: %s", deployment, exc)
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:
            logger.info("killing the router actor of %s: %s", deployment, exc)

    def router_logs(self, deployment: str, *, tail: int = 100) -> str:
        ray = self._ray()
        actor = self._handle(ray, ROUTER_PREFIX + deployment)
        if actor is None:
            return ""
        try:
            return ray.get(actor.logs.remote(tail), timeout=CALL_TIMEOUT)
        except Exception as exc:
            return f"[controlplane] the router's node did not answer: {type(exc).__name__}"

    def routers_owned(self) -> list[str]:
        """The deployments that have a router actor in this control plane's namespace."""
        ray = self._ray()
        return sorted(
            n[len(ROUTER_PREFIX) :]
            for n in ray.util.list_named_actors()
            if n.startswith(ROUTER_PREFIX) and n.count(".") == 1
        )

    # --- the cluster -------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """The cluster's nodes: id, address, alive, labels, resources total / free / used."""
        ray = self._ray()
        try:
            free_by_node = _available_by_node(ray)
        except Exception as exc:  # an older Ray without per-node availability
            logger.info("per-node available resources: %s", exc)
            free_by_node = {}
        out = []
        for node in ray.nodes():
            total = {
                k: v for k, v in node.get("Resources", {}).items() if not k.startswith("node:")
            }
            free = free_by_node.get(node["NodeID"], total if node.get("Alive") else {})
            free = {k: free.get(k, 0.0) for k in total}
            out.append(
                {
                    "runtime": "ray",
                    "node_id": node["NodeID"],
                    "address": node.get("NodeManagerAddress", ""),
                    "alive": bool(node.get("Alive")),
                    "labels": dict(node.get("Labels") or {}),
                    "resources": {
                        "total": total,
                        "free": free,
                        "used": {k: round(total[k] - free[k], 6) for k in total},
                    },
                }
            )
        return out


def _available_by_node(ray) -> dict[str, dict[str, float]]:
    from ray._private.state import state

    return {
        node_id: dict(resources)
        for node_id, resources in state.available_resources_per_node().items()
    }


def _resources(spec: InstanceSpec) -> dict:
    """The actor's Ray resource request for ``spec``."""
    wanted: dict = {"num_cpus": spec.cpu if spec.cpu is not None else 1}
    if spec.memory_mb:
        wanted["memory"] = spec.memory_mb * 1024 * 1024
    if spec.gpu:
        wanted["num_gpus"] = spec.gpu
    # A label asks for a sliver of the node's custom resource "key:value": any number of
    # instances fit on a node that declares it, none on one that does not.
    wanted["resources"] = {f"{k}:{v}": 0.001 for k, v in sorted(spec.placement.items())}
    return wanted
