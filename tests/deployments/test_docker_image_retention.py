"""Serving images no container uses are removed after the retention period; images in use,
of another prefix, or inside the period stay. Real engine, tiny images built FROM the base
image (a label only: no layer to build)."""

from __future__ import annotations

import io
import time
import uuid

import pytest

from tests.deployments.docker_support import BASE_IMAGE, require_base_image, require_docker

pytestmark = pytest.mark.docker


@pytest.fixture
def engine(tmp_path):
    require_docker()
    require_base_image()
    import docker

    from deployments.runtimes.docker import LABEL_IMAGE_KEY, DockerRuntime

    client = docker.from_env()
    prefix = f"controlplane-retention-test-{uuid.uuid4().hex[:8]}"
    made: list[str] = []
    containers = []

    def image(suffix: str, *, labelled: bool = True, name: str | None = None) -> str:
        tag = f"{name or prefix}:{suffix}"
        label = f'LABEL {LABEL_IMAGE_KEY}="{suffix}"\n' if labelled else ""
        dockerfile = f"FROM {BASE_IMAGE}\n{label}LABEL test.unique={uuid.uuid4().hex}\n"
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        made.append(tag)
        return tag

    def container_on(tag: str) -> None:
        containers.append(client.containers.create(tag, command=["true"], network_mode="none"))

    runtime = DockerRuntime(
        owner="retention-test",
        cache_dir=tmp_path / "docker",
        admin_token=lambda _name: "unused",
        base_image=BASE_IMAGE,
        image_prefix=prefix,
    )
    yield runtime, client, image, container_on, prefix
    for c in containers:
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass  # the test removed it
    for tag in made:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.APIError:
            pass
    client.close()


def _exists(client, tag: str) -> bool:
    import docker

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def test_unused_images_are_pruned_after_the_retention_period_and_only_those(engine):
    runtime, client, image, container_on, prefix = engine
    unused, used, unlabelled = image("unused"), image("used"), image("plain", labelled=False)
    other = image("other", name=f"{prefix}-other")
    container_on(used)

    # Inside the period nothing goes, and the pass records when each image was last used.
    assert runtime.prune_unused_images(retention_seconds=3600) == []
    assert all(_exists(client, t) for t in (unused, used, unlabelled, other))

    # Past it, only the unused, labelled image of this prefix is removed.
    later = time.time() + 7200
    assert runtime.prune_unused_images(retention_seconds=3600, now=later) == [unused]
    assert not _exists(client, unused)
    assert all(_exists(client, t) for t in (used, unlabelled, other))


def test_an_image_seen_in_use_counts_from_its_last_use_not_its_build(engine):
    runtime, client, image, container_on, _prefix = engine
    tag = image("recent")
    container_on(tag)
    now = time.time() + 10 * 3600  # built long "ago", in use at this pass
    assert runtime.prune_unused_images(retention_seconds=3600, now=now) == []
    for c in client.containers.list(all=True, filters={"ancestor": tag}):
        c.remove(force=True)
    # No container any more: kept until an hour after the pass that last saw it in use.
    assert runtime.prune_unused_images(retention_seconds=3600, now=now + 1800) == []
    assert runtime.prune_unused_images(retention_seconds=3600, now=now + 3700) == [tag]
