"""The ray runtime's part that needs no cluster: what a deployment asks Ray for, the
validation of ``gpu`` and ``placement``, and GET /api/v1/cluster without a Ray cluster."""

from __future__ import annotations

import time

import pytest

from deployments.models import Deployment
from deployments.runtimes import InstanceSpec, instance_address
from deployments.runtimes.ray import _resources, address_of, split_runtime_id

pytestmark = pytest.mark.django_db


def spec(**kw) -> InstanceSpec:
    base = dict(
        deployment="d",
        revision=1,
        ordinal=0,
        model_name="m",
        model_version="1",
        model_dir="/nowhere",
        model_sha256="",
        port=34001,
    )
    return InstanceSpec(**{**base, **kw})


def test_resources_become_a_ray_request():
    assert _resources(spec()) == {"num_cpus": 1, "resources": {}}
    got = _resources(spec(cpu=0.5, memory_mb=512, gpu=0.25, placement={"zone": "b", "disk": "ssd"}))
    assert got == {
        "num_cpus": 0.5,
        "memory": 512 * 1024 * 1024,
        "num_gpus": 0.25,
        "resources": {"disk:ssd": 0.001, "zone:b": 0.001},
    }


def test_the_instance_address_is_its_nodes_ip():
    runtime_id = "d.r1.0.abc123@10.1.2.3/0123456789abcdef"
    assert split_runtime_id(runtime_id) == ("d.r1.0.abc123", "10.1.2.3", "0123456789abcdef")
    assert instance_address("ray", 34001, runtime_id) == "10.1.2.3:34001"
    assert address_of("x@fd00::1/ab", 34001) == "[fd00::1]:34001"
    assert instance_address("ray", 34001, "") == "127.0.0.1:34001"  # not started yet


def test_gpu_and_placement_are_validated_and_kept_in_the_revision(api, registered):
    name = registered(1)
    bad = [
        ({"runtime": "local", "placement": {"zone": "a"}}, "invalid_placement"),
        ({"runtime": "docker", "resources": {"gpu": 1}}, "invalid_placement"),
        ({"runtime": "ray", "resources": {"gpu": 0}}, "invalid_resources"),
        ({"runtime": "ray", "placement": {"zone": "a b"}}, "invalid_placement"),
        ({"runtime": "ray", "placement": {"bad key!": "a"}}, "invalid_placement"),
    ]
    for body, code in bad:
        resp = api.post("/api/v1/deployments", {"name": "g", "model": name, "version": "1", **body})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == code, (
            body,
            resp.content,
        )
    assert not Deployment.objects.exists()
    resp = api.post(
        "/api/v1/deployments",
        {
            "name": "g",
            "model": name,
            "version": "1",
            "runtime": "ray",
            "resources": {"cpu": 1, "gpu": 0.5},
            "placement": {"zone": "b"},
        },
    )
    assert resp.status_code == 202, resp.content
    body = resp.json()
    assert body["resources"] == {"cpu": 1.0, "memory_mb": None, "gpu": 0.5}
    assert body["placement"] == {"zone": "b"}
    d = Deployment.objects.get(name="g")
    assert d.desired_revision.spec["gpu"] == 0.5 and d.desired_revision.spec["placement"] == {
        "zone": "b"
    }
    # A changed placement is a new revision; the same one is not.
    assert api.patch("/api/v1/deployments/g", {"placement": {"zone": "b"}}).json()["revision"] == 1
    assert api.patch("/api/v1/deployments/g", {"placement": {"zone": "c"}}).json()["revision"] == 2


def test_the_cluster_lists_this_host_without_a_ray_cluster(api, settings):
    settings.CONTROLPLANE_RAY_ADDRESS = ""
    body = api.get("/api/v1/cluster").json()
    assert body["runtimes"]["ray"] == {"configured": False, "error": ""}
    (local,) = body["nodes"]
    assert local["runtime"] == "local" and local["alive"]
    total, free, used = (local["resources"][k] for k in ("total", "free", "used"))
    assert total["CPU"] >= 1 and total["memory"] > free["memory"] > 0
    assert used["memory"] == total["memory"] - free["memory"]


def test_ray_connects_from_a_celery_worker_whose_streams_have_no_descriptor(monkeypatch):
    """Celery's worker replaces sys.stderr by a LoggingProxy without fileno(), on which
    ray.init (faulthandler) fails: the runtime gives Ray the real streams while it connects."""
    import sys

    from deployments.runtimes.ray import _real_std_streams

    class LoggingProxy:
        def write(self, data):
            return len(data)

    proxy = LoggingProxy()
    monkeypatch.setattr(sys, "stderr", proxy)
    with _real_std_streams():
        assert sys.stderr.fileno() >= 0
    assert sys.stderr is proxy


def test_an_unreachable_cluster_is_reported_at_once(api, settings):
    from tests.support import free_port

    settings.CONTROLPLANE_RAY_ADDRESS = f"127.0.0.1:{free_port()}"  # nothing listens there
    from deployments import runtimes

    runtimes._build.cache_clear()
    try:
        started = time.monotonic()
        body = api.get("/api/v1/cluster").json()
        assert time.monotonic() - started < 10
    finally:
        runtimes._build.cache_clear()
    assert body["runtimes"]["ray"]["configured"] is True
    assert "does not answer" in body["runtimes"]["ray"]["error"]
    assert [n["runtime"] for n in body["nodes"]] == ["local"]
