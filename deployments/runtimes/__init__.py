"""Runtimes by name. A new runtime is one module with the shape of local.py."""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

from django.conf import settings

from ..serving_token import serving_admin_token
from .base import InstanceSpec, InstanceStatus, Runtime, RuntimeError_

__all__ = [
    "InstanceSpec",
    "InstanceStatus",
    "Runtime",
    "RuntimeError_",
    "get_runtime",
    "install_id",
    "instance_address",
    "isolation_warning",
    "RUNTIMES",
]

RUNTIMES = ("local", "docker", "ray")


def install_id() -> str:
    """Names what this control plane owns (process labels, container labels)."""
    if settings.CONTROLPLANE_INSTALL_ID:
        return settings.CONTROLPLANE_INSTALL_ID
    path = Path(settings.DATA_DIR) / "install_id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x") as fh:
                fh.write(f"cp-{secrets.token_hex(6)}")
        except FileExistsError:
            pass
    return path.read_text().strip()


def index_options():
    """The package indexes every build uses (settings, else the host's pip configuration)."""
    from ..environments import index_options as options

    return options(
        index_url=settings.CONTROLPLANE_PIP_INDEX_URL,
        extra_index_url=settings.CONTROLPLANE_PIP_EXTRA_INDEX_URL,
        cert=settings.CONTROLPLANE_PIP_CERT,
        find_links=settings.CONTROLPLANE_PIP_FIND_LINKS,
        constraint=settings.CONTROLPLANE_PIP_CONSTRAINT,
    )


@functools.cache
def environment_builder(data_dir: str):
    from ..environments import EnvironmentBuilder

    return EnvironmentBuilder(
        Path(data_dir) / "environments",
        index=functools.cache(index_options),
        timeout=settings.CONTROLPLANE_ENV_BUILD_TIMEOUT,
        # "background" (default), "build" or "off": see EnvironmentBuilder
        bytecode=getattr(settings, "CONTROLPLANE_ENV_BYTECODE", "background"),
    )


@functools.cache
def _build(name: str, owner: str, data_dir: str) -> Runtime:
    if name == "local":
        from .local import LocalRuntime

        return LocalRuntime(
            state_dir=Path(data_dir) / "instances",
            owner=owner,
            code_root=settings.BASE_DIR,
            admin_token=serving_admin_token,
            environments=environment_builder(data_dir),
            data_dir=Path(data_dir),
            refuse_pickle=settings.CONTROLPLANE_LOCAL_REFUSE_PICKLE,
        )
    if name == "docker":
        from .docker import DockerRuntime

        return DockerRuntime(
            base_image=settings.CONTROLPLANE_DOCKER_BASE_IMAGE,
            image_prefix="controlplane-serving",
            network_mode=settings.CONTROLPLANE_DOCKER_NETWORK,
            cache_dir=Path(data_dir) / "docker",
            sockets_dir=Path(data_dir) / "sockets",
            owner=owner,
            admin_token=serving_admin_token,
            index=functools.cache(index_options),
        )
    if name == "ray":
        from .ray import RayRuntime

        return RayRuntime(
            address=settings.CONTROLPLANE_RAY_ADDRESS,
            owner=owner,
            code_root=settings.BASE_DIR,
            admin_token=serving_admin_token,
            index=functools.cache(index_options),
            node_ip=settings.CONTROLPLANE_RAY_NODE_IP or None,
            gc_after_s=settings.CONTROLPLANE_RAY_GC_AFTER_S,
        )
    raise RuntimeError_(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")


def instance_address(runtime: str, port: int, runtime_id: str = "") -> str:
    """Where the instance of ``runtime`` given ``port`` answers: ``127.0.0.1:PORT``, or
    ``unix:/path`` for a sandboxed local server or a docker container without a network;
    on ray, the ip of the node its runtime id names."""
    if runtime == "ray":
        from .ray import address_of

        return address_of(runtime_id, port)
    try:
        return get_runtime(runtime).address(port)
    except RuntimeError_:
        return f"127.0.0.1:{port}"


def isolation_warning(runtime: str) -> str:
    """Why model servers of ``runtime`` are not isolated from the control plane, or ""."""
    from . import sandbox

    if runtime == "local" and not sandbox.available():
        return sandbox.status()
    return ""


def get_runtime(name: str) -> Runtime:
    return _build(name, install_id(), str(settings.DATA_DIR))
