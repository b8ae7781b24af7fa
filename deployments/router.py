"""The stable endpoint of each deployment: a `python -m serving.router`
process on 127.0.0.1:<deployment port>, whatever the runtime. The control
plane tells it where to send traffic by rewriting a small JSON file
atomically; the router picks changes up within ~50 ms."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from django.conf import settings

from controlplane.lib import http
from deployments.runtimes import install_id, process


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
    path = backends_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict = {"backends": sorted(addresses)}
    if groups is not None:
        data["groups"] = [{**g, "backends": sorted(g["backends"])} for g in groups]
    if sticky is not None:
        data["sticky"] = sticky
    if hold is not None:
        data["hold"] = hold
    if mirror is not None:
        data["mirror"] = mirror
    body = json.dumps(data)
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

    return write_backends(
        d.name,
        addresses,
        groups=groups,
        sticky=sticky,
        hold=scaling.hold_for(d),
        mirror=shadow.shadow_mirror_key(d),
    )


def is_running(runtime_id: str) -> bool:
    info = process.inspect(runtime_id) if runtime_id else None
    return bool(info and info.alive)


def start(name: str, port: int) -> str:
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


def stop(runtime_id: str) -> None:
    if runtime_id:
        process.terminate(runtime_id, timeout=10)


def routes_to(port: int, addresses: list[str], *, timeout: float = 3.0) -> bool:
    """Wait until the router on ``port`` reports exactly ``addresses``."""
    deadline = time.monotonic() + timeout
    wanted = sorted(addresses)
    while time.monotonic() < deadline:
        try:
            resp = http.request("GET", f"http://127.0.0.1:{port}/__router/health", timeout=1.0)
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


def stats(port: int, *, timeout: float = 1.0) -> dict | None:
    """GET /__router/stats of the router on ``port`` (None when it does not answer)."""
    try:
        return http.request(
            "GET", f"http://127.0.0.1:{port}/__router/stats", timeout=timeout
        ).json()
    except (http.HttpError, ValueError):
        return None


def routes_groups(port: int, groups: list[dict], *, timeout: float = 3.0) -> bool:
    """Wait until the router on ``port`` reports exactly ``groups`` (names, weights and
    backends); ``[]`` waits for a router without groups."""
    deadline = time.monotonic() + timeout
    wanted = {g["name"]: (g["weight"], sorted(g["backends"])) for g in groups}
    while time.monotonic() < deadline:
        got = stats(port)
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
