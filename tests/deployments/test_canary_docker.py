"""A canary on the docker runtime: real containers behind the real router; the candidate
(the same model as a new version) takes its step's share, passes the analysis and is
promoted with no failed request. Skips without an engine, fails under REQUIRE_DOCKER=1."""

from __future__ import annotations

import json

import pytest

from deployments.models import Deployment, Rollout
from deployments.runtimes import InstanceSpec, get_runtime
from tests.deployments.conftest import converge
from tests.support import Load

pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.timeout(300)]

ROW = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}


@pytest.fixture
def docker_ready(sklearn_model_dir):
    from tests.deployments.docker_support import require_base_image, require_docker

    require_docker()
    require_base_image()
    # The image for this model (shared with the lifecycle tests: keyed by its inputs).
    get_runtime("docker").prepare(
        InstanceSpec(
            deployment="prebuild",
            revision=0,
            ordinal=0,
            model_name="m",
            model_version="1",
            model_dir=str(sklearn_model_dir),
            model_sha256="",
            port=0,
        )
    )


def test_a_canary_on_docker_shifts_a_share_then_promotes_without_a_failed_request(
    api, registered, docker_ready
):
    name = registered(2)
    resp = api.post(
        "/api/v1/deployments", {"name": "dcnry", "model": name, "version": "1", "runtime": "docker"}
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("dcnry", timeout=120)
    strategy = {
        "type": "canary",
        "steps": [{"weight": 50, "seconds": 2}],
        "analysis": {"min_samples": 20},
        "inconclusive_deadline_s": 30,
    }
    with Load("127.0.0.1", d.port, "/invocations", json.dumps(ROW).encode(), clients=4) as load:
        resp = api.patch("/api/v1/deployments/dcnry", {"version": "2", "strategy": strategy})
        assert resp.status_code in (200, 202), resp.content
        d = converge(
            "dcnry",
            until=lambda dep: (
                dep.status == Deployment.Status.READY and dep.serving_revision.number == 2
            ),
            timeout=120,
        )
    assert load.failures == []
    assert {"1", "2"} <= set(load.versions)
    ro = Rollout.objects.get(revision__deployment=d, revision__number=2)
    assert ro.state == Rollout.State.PROMOTED
    assert [(e["step"], e["decision"]) for e in ro.decisions] == [(0, "promote")]
    assert ro.decisions[0]["variants"]["candidate"]["requests"] >= 20
