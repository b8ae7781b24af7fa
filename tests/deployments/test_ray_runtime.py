"""The ray runtime against a real multi-node Ray cluster on loopback (ray.cluster_utils):
placement by label, spread over nodes, node loss and rescheduling, adoption after a control
plane restart, the stray sweep, and no Ray process bound outside 127.0.0.1.

One cluster for the whole module: two nodes, the head (zone a) and a worker (zone b). The
node-loss part of the end-to-end test removes the worker, so that test runs last. Without
Ray these tests skip, except under REQUIRE_RAY=1 (CI), where they fail."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from deployments import runtimes
from deployments.models import Deployment, Instance, Revision
from deployments.reconciler import sweep_strays
from deployments.runtimes import get_runtime, install_id
from deployments.runtimes.ray import split_runtime_id
from deployments.services import allocate_port
from tests.deployments.conftest import converge, instance_spec
from tests.support import Load

pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.timeout(300)]

ROW = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}


def predict(endpoint: str) -> tuple[dict, str]:
    req = urllib.request.Request(
        f"{endpoint}/invocations",
        data=json.dumps(ROW).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read()), resp.headers["X-Model-Version"]


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        from tests.ray_support import start_cluster

        cluster = start_cluster([("b", 2, {"zone": "b"})], head_cpus=2, head_labels={"zone": "a"})
    except Exception as exc:
        if os.environ.get("REQUIRE_RAY") == "1":
            pytest.fail(f"REQUIRE_RAY=1 but a Ray cluster cannot start: {exc}", pytrace=False)
        pytest.skip(f"a Ray cluster cannot start: {exc}")
    before = settings.CONTROLPLANE_RAY_ADDRESS
    settings.CONTROLPLANE_RAY_ADDRESS = cluster.address
    runtimes._build.cache_clear()
    try:
        yield cluster
    finally:
        settings.CONTROLPLANE_RAY_ADDRESS = before
        runtimes._build.cache_clear()
        cluster.shutdown()
        # What the actors unpacked on their nodes (all on this host here).
        shutil.rmtree(
            Path(tempfile.gettempdir()) / "controlplane-ray" / install_id(), ignore_errors=True
        )


@pytest.fixture(autouse=True)
def _stop_actors(ray_cluster):
    """What a test started on the cluster is gone after it (the database rolls back)."""
    yield
    runtime = get_runtime("ray")
    for status in runtime.list_owned():
        runtime.stop(status.runtime_id, timeout=2)


@pytest.fixture
def create(api, registered):
    def make(name: str, **body):
        model = registered(body.pop("versions", 1))
        body = {"runtime": "ray", "environment": "shared", **body}
        resp = api.post(
            "/api/v1/deployments", {"name": name, "model": model, "version": "1", **body}
        )
        assert resp.status_code in (201, 202), resp.content
        return resp.json()

    return make


def nodes_of(d: Deployment, cluster) -> list[str]:
    return sorted(
        cluster.node_of(split_runtime_id(i.runtime_id)[2]) or "?"
        for i in Instance.objects.filter(deployment=d, revision=d.serving_revision)
    )


def test_placement_labels_choose_the_nodes(api, create, ray_cluster):
    create("zoned", replicas=2, placement={"zone": "b"})
    d = converge("zoned", timeout=90)
    assert nodes_of(d, ray_cluster) == ["b", "b"]  # spread gives way to the label
    assert d.desired_revision.spec["placement"] == {"zone": "b"}
    # A label no node has: the revision fails before anything starts, saying why.
    create("nowhere", placement={"zone": "c"})
    d = converge("nowhere", until=lambda x: x.status == "failed", timeout=30)
    assert "zone:c" in d.status_message
    assert not Instance.objects.filter(deployment=d).exists()
    # Placement and GPUs are the ray runtime's: refused elsewhere, nothing created.
    resp = api.post(
        "/api/v1/deployments",
        {"name": "gpu-local", "model": "x", "runtime": "local", "placement": {"zone": "a"}},
    )
    assert resp.status_code in (400, 404)


def test_actors_are_adopted_after_a_restart_and_strays_are_swept(create, ray_cluster):
    create("adopt")
    d = converge("adopt", timeout=90)
    inst = Instance.objects.select_related("revision__model_version__model").get(deployment=d)
    runtimes._build.cache_clear()  # a new control plane: a new runtime object, no memory
    d = converge("adopt")
    assert list(Instance.objects.filter(deployment=d).values_list("runtime_id", flat=True)) == [
        inst.runtime_id
    ]
    runtime = get_runtime("ray")
    assert [s.runtime_id for s in runtime.list_owned()] == [inst.runtime_id]
    # The server's log, read from its node through the actor.
    log = runtime.logs(inst.runtime_id, tail=200)
    assert f"listening on http://127.0.0.1:{inst.port}" in log
    # A second actor under the same labels (a start repeated around a worker crash): swept.
    twin = runtime.start(instance_spec(inst, port=allocate_port()))
    assert sweep_strays() == 1
    assert runtime.inspect(twin.runtime_id) is None
    assert runtime.inspect(inst.runtime_id).running
    assert predict(d.endpoint)[1] == "1"
    # The record lost (a deployment deleted while the worker was down): the actor is swept.
    Instance.objects.filter(pk=inst.pk).delete()
    assert sweep_strays() == 1
    assert runtime.inspect(inst.runtime_id) is None
    assert runtime.list_owned() == []


def test_ray_processes_bind_loopback_only(ray_cluster):
    from tests.ray_support import descendants, listeners, non_loopback_sockets

    pids = descendants(os.getpid())
    bound = listeners(pids)
    names = " ".join(proc for _, proc in bound)
    assert "gcs_server" in names and "raylet" in names  # the check sees the cluster
    assert non_loopback_sockets(pids) == []


def test_a_deployment_on_ray_spreads_serves_and_outlives_a_lost_node(
    api, client_logged_in, create, ray_cluster
):
    """One end-to-end test (each deployment costs tens of seconds): it removes a node, so it
    runs last."""
    create("spread", replicas=2)
    d = converge("spread", timeout=120)
    assert nodes_of(d, ray_cluster) == ["b", "head"]  # SPREAD: one replica per node
    out, version = predict(d.endpoint)
    assert version == "1" and len(out["predictions"]) == 1
    got = api.get("/api/v1/deployments/spread").json()
    assert [i["state"] for i in got["instances"]] == ["ready", "ready"]
    assert all(
        i["runtime"] == "ray" and i["address"].startswith("127.0.0.1:") for i in got["instances"]
    )
    nodes = {i["node"] for i in got["instances"]}
    assert len(nodes) == 2
    page = client_logged_in.get("/deployments/spread/").content.decode()
    assert all(node in page for node in nodes)
    # GET /api/v1/cluster: this host and the two Ray nodes, each running one replica.
    cluster = api.get("/api/v1/cluster").json()
    assert cluster["runtimes"]["ray"] == {"configured": True, "error": ""}
    by_id = {n["node_id"]: n for n in cluster["nodes"] if n["runtime"] == "ray"}
    assert len(by_id) == 2 and all(
        n["alive"] and n["address"] == "127.0.0.1" for n in by_id.values()
    )
    for name, node in ray_cluster.workers.items():
        resources = by_id[node.node_id]["resources"]
        zone = "a" if name == "head" else name
        assert resources["total"]["CPU"] == 2 and resources["total"][f"zone:{zone}"] == 100
        assert resources["used"]["CPU"] == 1 and resources["free"]["CPU"] == 1
    local = next(n for n in cluster["nodes"] if n["runtime"] == "local")
    assert local["resources"]["total"]["CPU"] >= 1 and local["resources"]["total"]["memory"] > 0
    # The servers and the Ray processes serving them stay on loopback.
    from tests.ray_support import descendants, non_loopback_sockets

    assert non_loopback_sockets(descendants(os.getpid())) == []
    # Node loss under load: the replica on the lost node is replaced on the remaining one.
    body = json.dumps(ROW).encode()
    with Load("127.0.0.1", d.port, "/invocations", body, clients=4) as load:
        time.sleep(1.0)
        ray_cluster.remove_worker("b")
        lost_at = time.monotonic()
        d = converge(
            "spread",
            until=lambda x: x.status == "ready" and nodes_of(x, ray_cluster) == ["head", "head"],
            timeout=90,
        )
        recovered = time.monotonic() - lost_at
        during = (load.ok, list(load.failures))
        time.sleep(1.0)
    # Only requests in flight on the lost node may fail; afterwards every one is answered.
    assert len(during[1]) <= 4, during[1]
    assert load.failures == during[1] and load.ok > during[0]
    assert predict(d.endpoint)[1] == "1"
    revision = Revision.objects.get(deployment=d, number=1)
    assert Instance.objects.filter(revision=revision).count() == 2
    assert recovered < 90
