"""The stable endpoint of each deployment: a `python -m serving.router` process on
<host>:<deployment port>. The control plane tells it where to send traffic by rewriting a
small JSON file atomically; the router picks changes up within ~50 ms.

Where it runs: on the control plane's host (127.0.0.1), whatever the runtime; or, for a
``ray`` deployment when the cluster has a node with an ``ingress`` resource (and
CONTROLPLANE_RAY_INGRESS is ``auto``), as a detached Ray actor on that node
(runtimes/ray.py, ray_actor.RouterActor), which is sent the same file's contents and
writes it there. Such a router outlives the control plane's host; its id is
``ray:<node ip>/<node id prefix>`` and the endpoint is that node's address. A router that
runs stays where it is (its endpoint does not move); where a new one starts is decided when
none runs."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from django.conf import settings

from controlplane.lib import http
from deployments.runtimes import RuntimeError_, get_runtime, install_id, process

logger = logging.getLogger(__name__)

RAY_PREFIX = "ray:"
LOOPBACK = "127.0.0.1"


def on_ray(runtime_id: str) -> bool:
    """Whether ``runtime_id`` names a router actor on an ingress node."""
    return runtime_id.startswith(RAY_PREFIX)


def host_of(runtime_id: str) -> str:
    """The address the router of ``runtime_id`` answers on: its ingress node's, else
    the control plane host's loopback."""
    if on_ray(runtime_id):
        return runtime_id[len(RAY_PREFIX) :].partition("/")[0] or LOOPBACK
    return LOOPBACK


def address(runtime_id: str, port: int) -> str:
    """``host:port`` of the router of ``runtime_id`` (``[v6]:port`` for an IPv6 node)."""
    host = host_of(runtime_id)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _dir(name: str) -> Path:
    return Path(settings.DATA_DIR) / "routers" / name


def backends_file(name: str) -> Path:
    return _dir(name) / "backends.json"


def write_backends(
    name: str,
    addresses: list[str],
    *,
    groups: list[dict] | None = None,
    sticky: dict | None = None,
    hold: dict | None = None,
    mirror: dict | None = None,
) -> bool:
    """Atomically replace the backend set and the optional keys of the router contract;
    True if it changed. ``groups`` (canary/split: ``[{"name", "revision", "weight",
    "backends"}]``) and ``sticky`` (``{"header": H}``); ``hold`` (``{"queue": N,
    "timeout_s": S}``: hold requests while there is no backend, scale from zero); ``mirror``
    (shadow traffic, serving/mirror.py). None leaves the key out. The file is rewritten whole:
    use ``write_deployment``, which adds the keys in force."""
    return _write(name, document(addresses, groups=groups, sticky=sticky, hold=hold, mirror=mirror))


def document(
    addresses: list[str],
    *,
    groups: list[dict] | None = None,
    sticky: dict | None = None,
    hold: dict | None = None,
    mirror: dict | None = None,
) -> str:
    """The router file's contents (see ``write_backends``)."""
    data: dict = {"backends": sorted(addresses)}
    if groups is not None:
        data["groups"] = [{**g, "backends": sorted(g["backends"])} for g in groups]
    if sticky is not None:
        data["sticky"] = sticky
    if hold is not None:
        data["hold"] = hold
    if mirror is not None:
        data["mirror"] = mirror
    return json.dumps(data)


def _write(name: str, body: str) -> bool:
    path = backends_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == body:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body)
    os.replace(tmp, path)
    return True


def write_deployment(
    d, addresses: list[str], *, groups: list[dict] | None = None, sticky: dict | None = None
) -> bool:
    """The one writer of a deployment's router file: ``addresses`` (and canary/split groups)
    plus every other key of the router contract in force for ``d`` (hold while scaled to
    zero, the shadow's mirror)."""
    from . import scaling, shadow

    body = document(
        addresses,
        groups=groups,
        sticky=sticky,
        hold=scaling.hold_for(d),
        mirror=shadow.shadow_mirror_key(d),
    )
    changed = _write(d.name, body)
    if on_ray(d.router_pid):
        # Every write is sent: the actor compares, so a recreated or adopted router (and one
        # that missed a push while the control plane was away) converges on the next pass.
        try:
            changed = get_runtime("ray").router_push(d.name, body) or changed
        except RuntimeError_ as exc:
            logger.info("sending the backends of %s to its router: %s", d.name, exc)
    return changed


def is_running(runtime_id: str, *, name: str = "") -> bool:
    """Whether the router of ``runtime_id`` runs (``name``: its deployment, for a router on
    an ingress node, whose actor is found by name)."""
    if on_ray(runtime_id):
        try:
            info = get_runtime("ray").router_inspect(name, runtime_id)
        except RuntimeError_ as exc:
            # Ray cannot be asked (its GCS restarting): the router does not depend on this
            # control plane, so it is left alone rather than started a second time elsewhere.
            logger.warning("inspecting the router of %s: %s; left as it is", name, exc)
            return True
        return bool(info and info["running"] and info["router_id"] == runtime_id)
    info = process.inspect(runtime_id) if runtime_id else None
    return bool(info and info.alive)


def placement(d) -> str:
    """Where a new router of ``d`` starts: "ray" (an ingress node) or "host"."""
    if d.runtime != "ray" or settings.CONTROLPLANE_RAY_INGRESS == "off":
        return "host"
    try:
        return "ray" if get_runtime("ray").ingress_nodes() else "host"
    except RuntimeError_ as exc:
        logger.info("no ingress node for %s: %s", d.name, exc)
        return "host"


def start_for(d) -> str:
    """Start (or adopt) ``d``'s router where ``placement`` says; its runtime id. An ingress
    node that cannot take it leaves the router on this host: an endpoint beats none."""
    if placement(d) == "ray":
        if not backends_file(d.name).exists():
            write_backends(d.name, [])
        try:
            return get_runtime("ray").router_start(
                d.name, d.port, backends_file(d.name).read_text()
            )
        except RuntimeError_ as exc:
            logger.warning("router of %s on an ingress node: %s; on this host", d.name, exc)
    return start(d.name, d.port)


def start(name: str, port: int) -> str:
    """A router on this host's loopback."""
    if not backends_file(name).exists():
        write_backends(name, [])
    env = {k: os.environ[k] for k in ("PATH", "LANG", "HOME") if k in os.environ}
    env.update(
        PYTHONPATH=str(settings.BASE_DIR),
        PYTHONUNBUFFERED="1",
        CONTROLPLANE_OWNER=install_id(),
        CONTROLPLANE_ROUTER=name,
    )
    argv = [
        sys.executable,
        "-m",
        "serving.router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backends-file",
        str(backends_file(name)),
    ]
    return process.spawn(
        argv, env=env, log_path=_dir(name) / "router.log", cwd=Path(settings.BASE_DIR)
    )


def stop(runtime_id: str, *, name: str = "") -> None:
    """Stop the router of ``runtime_id`` (``name``: its deployment's, for one on Ray)."""
    if on_ray(runtime_id):
        stop_actor(name)
    elif runtime_id:
        process.terminate(runtime_id, timeout=10)


def stop_actor(name: str) -> None:
    """Stop the router actor of deployment ``name``, wherever it runs."""
    try:
        get_runtime("ray").router_stop(name, timeout=10)
    except RuntimeError_ as exc:
        logger.warning("stopping the router actor of %s: %s", name, exc)


def ray_routers() -> list[str]:
    """The deployments with a router actor on an ingress node ([] without a Ray cluster)."""
    try:
        return get_runtime("ray").routers_owned()
    except RuntimeError_:
        return []


def routes_to(
    port: int, addresses: list[str], *, timeout: float = 3.0, host: str = LOOPBACK
) -> bool:
    """Wait until the router on ``host:port`` reports exactly ``addresses``."""
    deadline = time.monotonic() + timeout
    wanted = sorted(addresses)
    base = _base(host, port)
    while time.monotonic() < deadline:
        try:
            resp = http.request("GET", f"{base}/__router/health", timeout=1.0)
            if sorted(resp.json().get("backends", [])) == wanted:
                return True
        except (http.HttpError, ValueError):
            pass
        time.sleep(0.05)
    return False


def read_backends(name: str) -> dict:
    """What the backends file says now ({} when there is none or it is unreadable)."""
    try:
        return json.loads(backends_file(name).read_text())
    except (OSError, ValueError):
        return {}


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def stats(port: int, *, timeout: float = 1.0, host: str = LOOPBACK) -> dict | None:
    """GET /__router/stats of the router on ``host:port`` (None when it does not answer)."""
    try:
        return http.request("GET", f"{_base(host, port)}/__router/stats", timeout=timeout).json()
    except (http.HttpError, ValueError):
        return None


def routes_groups(
    port: int, groups: list[dict], *, timeout: float = 3.0, host: str = LOOPBACK
) -> bool:
    """Wait until the router on ``host:port`` reports exactly ``groups`` (names, weights and
    backends); ``[]`` waits for a router without groups."""
    deadline = time.monotonic() + timeout
    wanted = {g["name"]: (g["weight"], sorted(g["backends"])) for g in groups}
    while time.monotonic() < deadline:
        got = stats(port, host=host)
        if got is not None:
            seen = {
                name: (g.get("weight"), sorted(g.get("backends", [])))
                for name, g in (got.get("groups") or {}).items()
            }
            if seen == wanted:
                return True
        time.sleep(0.02)
    return False


def owned_routers() -> list[process.ProcInfo]:
    return [p for p in process.find_labelled(install_id()) if "CONTROLPLANE_ROUTER" in p.labels]


def ping(address: str, *, timeout: float = 1.0) -> bool:
    """Is the model server at ``address`` (``127.0.0.1:PORT`` or ``unix:/path``) ready?"""
    try:
        return (
            http.request(
                "GET", http.address_url(address, "/ping"), timeout=timeout, raise_for_status=False
            ).status
            == 200
        )
    except http.HttpError:
        return False
