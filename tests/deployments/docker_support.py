"""Shared helpers for the tests that run a real Docker engine.

Without an engine these tests skip, except where REQUIRE_DOCKER=1 (CI, after
.ci/docker-setup.sh), where a missing engine or base image fails them instead:
a green run must not hide Docker tests that never ran.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.runtimes.docker import DockerRuntime, docker_available

BASE_IMAGE = os.environ.get("SERVING_BASE_IMAGE", "controlplane-serving-base:bookworm")
IMAGE_PREFIX = "controlplane-serving-test"
# Images are keyed by their inputs, so this cache (build contexts, locks) may outlive runs.
CACHE_DIR = Path(os.environ.get("CONTROLPLANE_TEST_DOCKER_CACHE", "/tmp/controlplane-test-docker"))


def admin_token(deployment: str) -> str:
    """The admin token of the test runtimes' servers (the control plane derives its own)."""
    return f"test-admin-token-{deployment}"


def _unavailable(reason: str) -> None:
    if os.environ.get("REQUIRE_DOCKER") == "1":
        pytest.fail(f"REQUIRE_DOCKER=1 but {reason} (run .ci/docker-setup.sh)", pytrace=False)
    pytest.skip(reason)


def require_docker() -> None:
    """Skip the calling test (fail it under REQUIRE_DOCKER=1) when no engine answers."""
    ok, reason = docker_available()
    if not ok:
        _unavailable(f"Docker engine not reachable: {reason}")


def require_base_image() -> None:
    import docker

    client = docker.from_env()
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"base image {BASE_IMAGE} not found")
    finally:
        client.close()


def make_docker_runtime(**overrides) -> DockerRuntime:
    """A DockerRuntime on the local engine with a fresh owner id, so that each test run
    finds only its own containers."""
    settings = {
        "owner": f"test-{uuid.uuid4().hex[:12]}",
        "cache_dir": CACHE_DIR,
        "base_image": BASE_IMAGE,
        "image_prefix": IMAGE_PREFIX,
        "network_mode": "host",
        "admin_token": admin_token,
        **overrides,
    }
    return DockerRuntime(**settings)


def remove_owned(runtime: DockerRuntime) -> None:
    """Remove every container the runtime owns, stopped ones included."""
    for status in runtime.list_owned():
        runtime.stop(status.runtime_id, timeout=2)


def remove_other_test_images(keep: str) -> None:
    """Remove the test images other than ``keep``: each change of the serving code makes a
    new one, and only the newest is worth its disk space. Images in use stay."""
    import docker

    client = docker.from_env()
    try:
        for image in client.images.list(name=IMAGE_PREFIX):
            if keep in image.tags:
                continue
            for tag in image.tags:
                try:
                    client.images.remove(tag)
                except docker.errors.APIError:
                    pass  # in use by a container (another run), or already gone
    finally:
        client.close()


@pytest.fixture(scope="module", name="docker_runtime")
def docker_runtime_fixture() -> Iterator[DockerRuntime]:
    """``docker_runtime``: a DockerRuntime on the base image built by .ci/docker-setup.sh;
    its containers are removed after the module. Import it into a test module to use it."""
    require_docker()
    require_base_image()
    runtime = make_docker_runtime()
    yield runtime
    remove_owned(runtime)
