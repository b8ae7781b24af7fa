"""The ray runtime against a real multi-node Ray cluster on loopback (ray.cluster_utils):
placement by label, spread over nodes, node loss and rescheduling, adoption after a control
plane restart, the stray sweep, the router on an ingress node outliving the control plane,
the model's environment built on the node, what actors leave on a node swept, and no Ray
process bound outside 127.0.0.1.

One cluster for the whole module: three nodes, the head (zone a) and a worker (zone b) for
model servers, and a node without CPUs with an ``ingress`` resource, where the deployments'
routers run. The node-loss part of the end-to-end test removes the worker, so it runs after
the others but the ingress test, which pytest-django runs last (it uses transactional_db: its
Celery worker must see the rows) and which removes the ingress node. Without Ray these tests
skip, except under REQUIRE_RAY=1 (CI), where they fail."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from deployments import router, runtimes
from deployments.models import Deployment, Instance, Revision
from deployments.reconciler import sweep_strays
from deployments.runtimes import get_runtime, install_id, process
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
        cluster.add_worker("ingress", cpus=0, resources={"ingress": 1})
        cluster.cluster.wait_for_nodes()
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
    for name in runtime.routers_owned():
        runtime.router_stop(name, timeout=2)


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


def instances_addresses(d: Deployment) -> list[str]:
    return [i.address for i in Instance.objects.filter(deployment=d)]


def _ready(name: str) -> Deployment | None:
    d = Deployment.objects.filter(name=name).first()
    return d if d is not None and d.status == Deployment.Status.READY else None


def test_the_endpoint_runs_on_the_ingress_node_and_outlives_the_control_plane(
    transactional_db, api, client_logged_in, create, ray_cluster, tmp_path, monkeypatch
):
    """The control plane is real processes here: a Celery worker (the reconciler, a Ray
    driver) deploys; it is SIGKILLed with all the control plane runs on its host, the endpoint
    answers throughout, and a new worker adopts the router actor and the instances."""
    from deployments.tasks import reconcile_all
    from tests.faults.conftest import ControlPlane, wait_for
    from tests.ray_support import descendants, listeners, non_loopback_sockets

    monkeypatch.setenv("CONTROLPLANE_RAY_ADDRESS", ray_cluster.address)
    monkeypatch.setenv("CONTROLPLANE_RAY_NODE_IP", "127.0.0.1")
    cp = ControlPlane(tmp_path)
    try:
        cp.worker(concurrency=1)
        create("edge")  # the API enqueues its reconcile; the worker converges it
        d = wait_for(lambda: _ready("edge"), timeout=150, what="edge ready", detail=cp.logs)
        # The router is an actor on the ingress node; nothing of it runs on the control
        # plane's host.
        assert router.on_ray(d.router_pid), d.router_pid
        assert ray_cluster.node_of(d.router_pid.rpartition("/")[2]) == "ingress"
        assert router.owned_routers() == []
        assert api.get("/api/v1/deployments/edge").json()["endpoint"] == d.endpoint
        assert d.endpoint == f"http://127.0.0.1:{d.port}"  # the ingress node's address
        page = client_logged_in.get("/deployments/edge/").content.decode()
        assert "router on an ingress node of the Ray cluster" in page
        assert predict(d.endpoint)[1] == "1"
        runtime = get_runtime("ray")
        before = runtime.router_inspect("edge")
        assert before["running"] and before["starts"] == 1 and before["port"] == d.port
        instances = sorted(
            Instance.objects.filter(deployment=d).values_list("runtime_id", flat=True)
        )
        # The ingress router and the servers listen on loopback only, and talk to nothing else.
        pids = descendants(os.getpid())
        assert f"127.0.0.1:{d.port}" in [local for local, _ in listeners(pids)]
        assert non_loopback_sockets(pids) == []

        body = json.dumps(ROW).encode()
        with Load("127.0.0.1", d.port, "/invocations", body, clients=2) as load:
            time.sleep(1.0)
            # The control plane dies: its worker (a Ray driver) and whatever it runs on its
            # host (routers and servers under its install id: none for this deployment).
            cp.kill_all()
            for proc in process.find_labelled(install_id()):
                os.kill(proc.pid, signal.SIGKILL)
            down_from = load.ok
            time.sleep(3.0)
            answered_while_down = load.ok - down_from
            # A new control plane: a pass over every deployment, and the stray sweep.
            worker = cp.worker(concurrency=1)
            reconcile_all.delay()
            wait_for(
                lambda: worker.text().count("succeeded in") >= 2,
                timeout=60,
                what="the new worker's reconcile and sweep",
                detail=worker.tail,
            )
            time.sleep(1.0)
    finally:
        cp.kill_all()
    assert load.failures == [] and answered_while_down > 10, (load.failures, answered_while_down)
    after = get_runtime("ray").router_inspect("edge")
    assert (after["pid"], after["starts"]) == (before["pid"], 1)  # not restarted
    assert get_runtime("ray").routers_owned() == ["edge"] and router.owned_routers() == []
    assert Deployment.objects.get(pk=d.pk).router_pid == d.router_pid
    assert (
        sorted(Instance.objects.filter(deployment=d).values_list("runtime_id", flat=True))
        == instances
    )
    assert Instance.objects.get(deployment=d).restarts == 0
    # The router process dies: its actor starts it again on its node, no control plane needed.
    os.kill(after["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while (get_runtime("ray").router_inspect("edge") or {}).get("starts") != 2:
        assert time.monotonic() < deadline, get_runtime("ray").router_logs("edge")
        time.sleep(0.1)
    assert router.routes_to(d.port, instances_addresses(d), host=d.router_host, timeout=15)
    assert "the router exited" in get_runtime("ray").router_logs("edge")
    # Level-triggered: a router actor gone (its node lost, killed) is started again; the
    # backends it is sent are the current ones.
    get_runtime("ray").router_stop("edge", timeout=2)
    d = converge("edge", until=lambda x: router.is_running(x.router_pid, name=x.name))
    assert router.routes_to(d.port, instances_addresses(d), host=d.router_host, timeout=15)
    assert predict(d.endpoint)[1] == "1"
    assert router.owned_routers() == []
    # A router actor no deployment names is a stray; deleting the deployment stops its router.
    get_runtime("ray").router_start("ghost", allocate_port(), '{"backends": []}')
    assert get_runtime("ray").routers_owned() == ["edge", "ghost"]
    assert sweep_strays() == 1
    assert get_runtime("ray").routers_owned() == ["edge"]
    # Deleting the deployment stops its router actor.
    create("edge2")
    d2 = converge("edge2", timeout=90)
    assert router.on_ray(d2.router_pid)
    assert api.delete("/api/v1/deployments/edge2").status_code in (200, 202, 204)
    converge("edge2", until=lambda x: False)  # returns once the deployment is gone
    assert get_runtime("ray").routers_owned() == ["edge"]
    # The ingress node is lost: the router starts again where it can (no other ingress node
    # here: this host, an endpoint beats none), and the endpoint answers again.
    ray_cluster.remove_worker("ingress")
    d = converge(
        "edge",
        until=lambda x: bool(x.router_pid) and not router.on_ray(x.router_pid),
        timeout=60,
    )
    assert router.routes_to(d.port, instances_addresses(d), timeout=15)
    assert predict(d.endpoint)[1] == "1"
    assert [f"{p.pid}:{p.starttime}" for p in router.owned_routers()] == [d.router_pid]
    assert get_runtime("ray").routers_owned() == []


def test_without_ingress_the_router_stays_on_the_control_plane_host(
    client_logged_in, create, ray_cluster, settings
):
    settings.CONTROLPLANE_RAY_INGRESS = "off"
    create("homebound")
    d = converge("homebound", timeout=90)
    assert not router.on_ray(d.router_pid)
    assert [f"{p.pid}:{p.starttime}" for p in router.owned_routers()] == [d.router_pid]
    assert get_runtime("ray").routers_owned() == []
    assert d.endpoint == f"http://127.0.0.1:{d.port}" and predict(d.endpoint)[1] == "1"
    page = client_logged_in.get("/deployments/homebound/").content.decode()
    assert "router on the control plane's host" in page


def _leased_with(root: Path, path: Path) -> list[str]:
    """The paths of the live lease (an actor process on this host) that names ``path``."""
    from deployments.runtimes.ray_actor import _live_leases

    for lease in (root / "leases").glob("*.json"):
        paths = json.loads(lease.read_text())["paths"]
        if str(path) in paths and str(path) in _live_leases(root / "leases")[0]:
            return paths
    return []


def test_what_a_deleted_deployment_left_on_the_nodes_is_swept(api, create, ray_cluster):
    """With CONTROLPLANE_RAY_GC_AFTER_S=0, the next actor's start removes the instance log
    and router directory of a deleted deployment. What live actors hold stays: the new
    deployment's files and the router code they share."""
    before = settings.CONTROLPLANE_RAY_GC_AFTER_S
    settings.CONTROLPLANE_RAY_GC_AFTER_S = 0
    runtimes._build.cache_clear()
    try:
        root = Path(tempfile.gettempdir()) / "controlplane-ray" / install_id()
        create("gc-old")
        converge("gc-old", timeout=90)
        log, routes = root / "logs" / "gc-old-r1-0.log", root / "routers" / "gc-old"
        held = _leased_with(root, log)
        assert any("/bundles/" in p for p in held), held  # the model files, by digest
        assert log.exists() and _leased_with(root, routes)  # the router on the ingress node
        assert api.delete("/api/v1/deployments/gc-old").status_code in (200, 202, 204)
        converge("gc-old", until=lambda x: False)  # returns once the deployment is gone
        assert not _leased_with(root, log) and not _leased_with(root, routes)  # released
        assert log.exists() and routes.exists()  # left behind until a sweep

        create("gc-new")
        d = converge("gc-new", timeout=90)
        deadline = time.monotonic() + 30
        while (log.exists() or routes.exists()) and time.monotonic() < deadline:
            time.sleep(0.2)  # the sweep runs beside the new actors' start
        assert not log.exists() and not routes.exists()
        new_log = root / "logs" / "gc-new-r1-0.log"
        held = _leased_with(root, new_log) + _leased_with(root, root / "routers" / "gc-new")
        assert held and all(Path(p).exists() for p in held)
        assert predict(d.endpoint)[1] == "1"
    finally:
        settings.CONTROLPLANE_RAY_GC_AFTER_S = before
        runtimes._build.cache_clear()


def test_the_models_environment_is_built_on_its_node(api, registered, ray_cluster, tmp_path):
    """A model needing a package the control plane's interpreter lacks (tabulate, from this
    host's wheelhouse and indexes, as the local runtime's builds): its actor builds the
    environment on the node, with the same resolution and index settings."""
    import importlib.util

    from deployments.environments import resolve
    from tests.conftest import zip_dir
    from tests.deployments.test_environments import TABULATE, TABULATE_MODEL, _pyfunc

    assert importlib.util.find_spec("tabulate") is None  # not in the control plane's venv
    model_dir = _pyfunc(tmp_path / "tabulate", TABULATE_MODEL, [TABULATE])
    name = registered(name="ray-tabulate", payload=zip_dir(model_dir))
    resp = api.post(
        "/api/v1/deployments",
        {"name": "ray-env", "model": name, "version": "1", "runtime": "ray"},
    )
    assert resp.status_code == 202 and resp.json()["environment"] == "auto", resp.content
    d = converge("ray-env", timeout=240)
    req = urllib.request.Request(
        f"{d.endpoint}/invocations",
        data=json.dumps({"dataframe_split": {"columns": ["x"], "data": [[1], [2]]}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as out:
        assert json.loads(out.read()) == {
            "predictions": ["tabulate 0.10.0: 1", "tabulate 0.10.0: 2"]
        }
    inst = Instance.objects.get(deployment=d)
    log = get_runtime("ray").logs(inst.runtime_id, tail=400)
    assert "environment built in" in log or "uv" in log, log
    # The server's interpreter is the environment's, under the node's directory, by its key.
    key = resolve(model_dir).key
    env_dir = Path(tempfile.gettempdir()) / "controlplane-ray" / install_id() / "environments" / key
    assert (env_dir / ".complete").exists()
    servers = [
        pid
        for pid in __import__("tests.ray_support", fromlist=["descendants"]).descendants(
            os.getpid()
        )
        if _cmdline(pid).startswith(str(env_dir / "bin" / "python"))
    ]
    assert len(servers) == 1


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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
    assert len(by_id) == 3 and all(
        n["alive"] and n["address"] == "127.0.0.1" for n in by_id.values()
    )
    ingress = by_id[ray_cluster.workers["ingress"].node_id]["resources"]
    assert ingress["total"]["ingress"] == 1 and ingress["used"]["ingress"] > 0  # the router
    for name, node in ray_cluster.workers.items():
        if name == "ingress":
            continue
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
