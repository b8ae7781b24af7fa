"""Build leftovers: the untagged build-stage image each serving-image build leaves is
pruned by the runtime that built it, and only that one (the engine is shared)."""

from __future__ import annotations

import uuid

import pytest

from tests.deployments.docker_support import (
    BASE_IMAGE,
    make_docker_runtime,
    require_base_image,
    require_docker,
)

pytestmark = pytest.mark.docker

# The shape of serving/Dockerfile: a labelled build stage whose result only the final
# stage copies from, so the build leaves the stage as a dangling image.
DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE} AS build
ARG CONTROLPLANE_OWNER=
LABEL controlplane.stage=build controlplane.owner=${CONTROLPLANE_OWNER}
RUN echo %(marker)s > /built
FROM ${BASE_IMAGE}
COPY --from=build /built /built
"""


def _dangling(client, owner: str) -> list:
    return client.images.list(filters={"dangling": True, "label": [f"controlplane.owner={owner}"]})


def test_a_build_prunes_its_own_build_stage_and_no_one_elses(tmp_path):
    require_docker()
    require_base_image()
    import docker

    client = docker.from_env()
    mine, theirs = make_docker_runtime(), make_docker_runtime()
    tags = []
    try:
        for runtime in (mine, theirs):
            context = tmp_path / runtime.owner
            context.mkdir()
            (context / "Dockerfile").write_text(DOCKERFILE % {"marker": uuid.uuid4().hex})
            tag = f"controlplane-prune-test:{runtime.owner}"
            client.images.build(
                path=str(context),
                tag=tag,
                buildargs={"BASE_IMAGE": BASE_IMAGE, "CONTROLPLANE_OWNER": runtime.owner},
                network_mode="none",
                pull=False,
                rm=True,
                forcerm=True,
            )
            tags.append(tag)
            assert len(_dangling(client, runtime.owner)) == 1  # the waste, before the fix
        assert mine.prune_build_leftovers() >= 1
        assert _dangling(client, mine.owner) == []
        assert len(_dangling(client, theirs.owner)) == 1  # another owner's: untouched
        for tag in tags:
            client.images.get(tag)  # tagged images stay
    finally:
        theirs.prune_build_leftovers()
        for tag in tags:
            client.images.remove(tag, force=True)
        client.close()
