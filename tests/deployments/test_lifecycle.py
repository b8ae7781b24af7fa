"""Deployments end to end on both runtimes: real model servers (processes or
Docker containers), the real router, real MLflow. The reconciler runs as the
Celery task would. Docker cases skip without an engine (fail under REQUIRE_DOCKER=1)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
from django.test import override_settings

from audit.models import AuditEvent
from deployments.models import Deployment, DeploymentEvent, Instance, Revision
from deployments.reconciler import reconcile, sweep_strays
from deployments.runtimes import InstanceSpec, get_runtime, install_id, process
from deployments.services import allocate_port
from tests.deployments.conftest import converge, instance_spec
from tests.support import Load

pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.timeout(900)]

ROW = {"dataframe_split": {"columns": [f"f{i}" for i in range(20)], "data": [[0.5] * 20]}}


def predict(endpoint: str, payload=ROW) -> tuple[dict, str]:
    req = urllib.request.Request(
        f"{endpoint}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read()), resp.headers["X-Model-Version"]


@pytest.fixture(scope="session")
def serving_image(sklearn_model_dir):
    """Build (or find) the serving image for the test model once, up front, so a
    first build (minutes on a new machine) does not eat into rollout deadlines."""

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


@pytest.fixture(params=["local", "docker"])
def runtime_name(request):
    if request.param == "docker":
        from tests.deployments.docker_support import require_base_image, require_docker

        require_docker()
        require_base_image()
        request.getfixturevalue("serving_image")
    return request.param


@pytest.fixture
def create(api, runtime_name):
    def make(**body):
        resp = api.post("/api/v1/deployments", {"runtime": runtime_name, **body})
        assert resp.status_code in (201, 202), resp.content
        return resp.json()

    return make


def owned(runtime_name: str) -> list:
    return get_runtime(runtime_name).list_owned()


def test_create_serves_the_model_at_a_stable_endpoint(
    api, create, runtime_name, registered, sklearn_model_dir
):
    import mlflow.pyfunc
    import pandas as pd

    name = registered(1)
    body = create(name="churn", model=name, version="1")
    assert body["status"] == "pending" and body["revision"] == 1
    d = converge("churn")
    out, version = predict(d.endpoint)
    expected = mlflow.pyfunc.load_model(str(sklearn_model_dir)).predict(
        pd.DataFrame(ROW["dataframe_split"]["data"], columns=ROW["dataframe_split"]["columns"])
    )
    assert out["predictions"] == [int(x) for x in expected]
    assert version == "1"
    got = api.get("/api/v1/deployments/churn").json()
    assert (
        got["status"] == "ready" and got["model_version"] == "1" and got["endpoint"] == d.endpoint
    )
    assert [i["state"] for i in got["instances"]] == ["ready"]
    revision = Revision.objects.get(deployment=d, number=1)
    assert revision.state == "live" and len(revision.model_sha256) == 64
    assert AuditEvent.objects.filter(action="deployment.create", object_id="churn").exists()


def admin_get(address: str, token: str | None) -> tuple[int, dict]:
    """GET /predictions of one instance, with the token as a bearer token if given."""
    from controlplane.lib import http

    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    # the address is 127.0.0.1:PORT, or unix:/path for a sandboxed server
    url = http.address_url(address, "/predictions")
    resp = http.request("GET", url, headers=headers, timeout=10, raise_for_status=False)
    return resp.status, resp.json() if resp.status == 200 else {}


def test_instances_open_their_prediction_log_to_the_deployments_token_only(
    api, create, runtime_name, registered, settings, caplog
):
    from deployments import runtimes
    from deployments.serving_token import serving_admin_token
    from monitoring.models import Prediction, PullState
    from monitoring.services import deployment_pull

    caplog.set_level(logging.DEBUG)
    settings.CONTROLPLANE_SERVING_ADMIN_TOKEN = None  # the default: a token derived per deployment
    name = registered(1)
    create(name="guarded", model=name, version="1")
    d = converge("guarded")
    predict(d.endpoint)
    inst = Instance.objects.get(deployment=d)
    token = serving_admin_token("guarded")

    assert admin_get(inst.address, None)[0] == 401
    assert admin_get(inst.address, "")[0] == 401
    assert admin_get(inst.address, serving_admin_token("another"))[0] == 401
    status, page = admin_get(inst.address, token)
    assert status == 200 and len(page["records"]) == 1
    # The monitoring pull sends it, also from a restarted control plane (nothing is stored).
    runtimes._build.cache_clear()
    assert deployment_pull(deployment_id=d.pk) == 1
    assert Prediction.objects.filter(deployment=d).count() == 1
    assert PullState.objects.get(instance=inst).last_error == ""
    # SECRET_KEY rotated with the old key among the fallbacks: the pull still opens the
    # servers started before (with the old key's token) until they are replaced.
    settings.SECRET_KEY_FALLBACKS = [settings.SECRET_KEY]
    settings.SECRET_KEY = "a-rotated-secret-key-that-is-long-enough-0123456789"
    assert serving_admin_token("guarded") != token
    assert deployment_pull(deployment_id=d.pk) == 1
    assert PullState.objects.get(instance=inst).last_error == ""
    # Another token (an operator sets one, running servers keep theirs) is refused: the
    # pull failed, and says why without the token it sent.
    settings.CONTROLPLANE_SERVING_ADMIN_TOKEN = "operator-chosen-admin-token-0123456789"
    assert deployment_pull(deployment_id=d.pk) == 0
    error = PullState.objects.get(instance=inst).last_error
    assert "401" in error and "operator-chosen" not in error
    # Never on a command line (readable by every user), in logs or in events.
    assert token not in caplog.text and "operator-chosen" not in caplog.text
    if runtime_name == "local":
        pid = int(inst.runtime_id.split(":")[0])
        assert token not in open(f"/proc/{pid}/cmdline").read()
    assert token not in get_runtime(runtime_name).logs(inst.runtime_id, tail=1000)
    assert not DeploymentEvent.objects.filter(deployment=d, message__contains=token).exists()


def test_update_and_rollback_fail_no_request_under_load(api, create, runtime_name, registered):
    name = registered(2)
    create(name="svc", model=name, version="1", replicas=2)
    d = converge("svc")
    port = d.port
    body = json.dumps(ROW).encode()
    with Load("127.0.0.1", port, "/invocations", body, clients=4) as load:
        time.sleep(0.5)
        resp = api.patch("/api/v1/deployments/svc", {"version": "2"})
        assert resp.status_code == 202 and resp.json()["revision"] == 2
        converge(
            "svc",
            until=lambda x: (
                x.serving_revision and x.serving_revision.number == 2 and x.status == "ready"
            ),
        )
        time.sleep(0.5)
        resp = api.post("/api/v1/deployments/svc/rollback", {})
        assert resp.status_code == 202 and resp.json()["revision"] == 1
        converge(
            "svc",
            until=lambda x: (
                x.serving_revision and x.serving_revision.number == 1 and x.status == "ready"
            ),
        )
        time.sleep(0.5)
    assert load.failures == []
    assert load.ok > 50
    # Each client, sending one request after another, sees v1, then v2, then v1 again:
    # once traffic moves, it never goes back to the old revision.
    assert list(load.sequences.values()) == [["1", "2", "1"]] * 4
    # The endpoint never moved; r1 serves, r2 stays warm (no traffic) for a quick rollback.
    d = Deployment.objects.get(name="svc")
    assert d.port == port
    by_revision = {}
    for inst in Instance.objects.filter(deployment=d).select_related("revision"):
        by_revision.setdefault(inst.revision.number, []).append(inst.address)
    assert sorted(by_revision) == [1, 2]
    routed = json.loads(urllib.request.urlopen(f"{d.endpoint}/__router/health", timeout=5).read())[
        "backends"
    ]
    assert sorted(routed) == sorted(by_revision[1])
    kinds = list(DeploymentEvent.objects.filter(deployment=d).values_list("kind", flat=True))
    assert "rollback" in kinds and kinds.count("traffic") == 3
    assert AuditEvent.objects.filter(action="deployment.rollback", object_id="svc").exists()


def test_a_crashed_instance_is_restarted_by_the_reconciler(api, create, runtime_name, registered):
    name = registered(1)
    create(name="crashy", model=name, version="1")
    d = converge("crashy")
    inst = Instance.objects.get(deployment=d)
    if runtime_name == "local":
        os.kill(int(inst.runtime_id.split(":")[0]), signal.SIGKILL)
    else:
        import docker

        docker.from_env().containers.get(inst.runtime_id).kill()  # stays down: a manual kill
    time.sleep(0.2)
    d = converge(
        "crashy",
        until=lambda x: x.status == "ready" and Instance.objects.get(deployment=x).restarts == 1,
    )
    again = Instance.objects.get(deployment=d)
    assert again.runtime_id != inst.runtime_id
    assert predict(d.endpoint)[1] == "1"
    assert DeploymentEvent.objects.filter(deployment=d, kind="crash").exists()


def test_instances_are_adopted_after_a_control_plane_restart(api, create, runtime_name, registered):
    from deployments import runtimes

    name = registered(1)
    create(name="adopt", model=name, version="1")
    d = converge("adopt")
    before = (
        d.router_pid,
        list(Instance.objects.filter(deployment=d).values_list("runtime_id", flat=True)),
    )
    runtimes._build.cache_clear()  # a new control plane process: no memory of what it started
    d = converge("adopt")
    after = (
        d.router_pid,
        list(Instance.objects.filter(deployment=d).values_list("runtime_id", flat=True)),
    )
    assert after == before
    assert len(owned(runtime_name)) == 1  # one server: nothing duplicated
    assert len(process.find_labelled(install_id())) == (
        2 if runtime_name == "local" else 1
    )  # + one router


def test_a_broken_revision_is_rolled_back_automatically(
    api, create, runtime_name, registered, tmp_path, sklearn_model_dir
):
    from tests.conftest import zip_dir

    broken = tmp_path / "broken"
    broken.mkdir()
    mlmodel = (sklearn_model_dir / "MLmodel").read_text()
    (broken / "MLmodel").write_text(mlmodel)  # MLmodel without the model file: cannot load
    name = registered(1)
    registered(1, name=name, payload=zip_dir(broken))
    create(name="fragile", model=name, version="1")
    converge("fragile")
    Deployment.objects.filter(name="fragile").update(progress_deadline_s=8)
    api.patch("/api/v1/deployments/fragile", {"version": "2"})
    d = converge(
        "fragile",
        until=lambda x: x.desired_revision.number == 1 and x.status == "ready",
        timeout=90,
    )
    failed = Revision.objects.get(deployment=d, number=2)
    assert failed.state == "failed" and failed.failure
    assert predict(d.endpoint)[1] == "1"
    assert DeploymentEvent.objects.filter(deployment=d, kind="auto_rollback").exists()
    event = AuditEvent.objects.get(action="deployment.auto_rollback", object_id="fragile")
    assert event.actor_label == "system:reconciler" and failed.failure in event.after["reason"]


def test_a_deployment_follows_its_alias(api, create, runtime_name, registered):
    name = registered(2)
    api.post(f"/api/v1/models/{name}/aliases/production", {"version": "1", "reason": "first"})
    create(name="follower", model=name, alias="production")
    d = converge("follower")
    assert predict(d.endpoint)[1] == "1"
    api.post(f"/api/v1/models/{name}/aliases/production", {"version": "2", "reason": "better"})
    d = converge(
        "follower",
        until=lambda x: x.serving_revision.model_version.version == 2 and x.status == "ready",
    )
    assert predict(d.endpoint)[1] == "2"
    api.post(f"/api/v1/models/{name}/aliases/production", {"version": "1", "reason": "regression"})
    d = converge(
        "follower",
        until=lambda x: x.serving_revision.model_version.version == 1 and x.status == "ready",
    )
    assert predict(d.endpoint)[1] == "1"
    reasons = list(
        Revision.objects.filter(deployment=d).order_by("number").values_list("reason", flat=True)
    )
    assert reasons[1:] == ["alias production moved to v2", "alias production moved to v1"]


def test_delete_stops_everything(api, create, runtime_name, registered):
    name = registered(1)
    create(name="gone", model=name, version="1")
    d = converge("gone")
    endpoint = d.endpoint
    assert api.delete("/api/v1/deployments/gone").status_code == 202
    reconcile(d.pk)
    assert not Deployment.objects.filter(name="gone").exists()
    assert process.find_labelled(install_id()) == []
    assert owned(runtime_name) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{endpoint}/ping", timeout=2)
    assert api.get("/api/v1/deployments/gone").status_code == 404


def test_strays_are_swept(api, create, runtime_name, registered):
    name = registered(1)
    create(name="stray", model=name, version="1")
    d = converge("stray")
    inst = Instance.objects.get(deployment=d)
    Instance.objects.filter(pk=inst.pk).delete()  # the record is lost; the process is not
    assert sweep_strays() >= 1
    status = get_runtime(runtime_name).inspect(inst.runtime_id)
    assert status is None or not status.running


def test_a_second_copy_of_a_recorded_instance_is_swept(api, create, runtime_name, registered):
    name = registered(1)
    create(name="twice", model=name, version="1")
    d = converge("twice")
    inst = Instance.objects.select_related("revision__model_version__model").get(deployment=d)
    runtime = get_runtime(runtime_name)
    # The same instance started a second time (around a worker crash): the same labels,
    # another port, and not the process its record names.
    twin = runtime.start(instance_spec(inst, port=allocate_port()))
    assert sweep_strays() == 1
    gone = runtime.inspect(twin.runtime_id)
    assert gone is None or not gone.running
    assert runtime.inspect(inst.runtime_id).running  # the recorded one is kept
    assert predict(d.endpoint)[1] == "1"
    # A record without an id (its worker died before saving it) is left to the next pass,
    # which adopts what runs under its labels.
    Instance.objects.filter(pk=inst.pk).update(runtime_id="")
    assert sweep_strays() == 0
    assert runtime.inspect(inst.runtime_id).running


@override_settings(CONTROLPLANE_ROLLBACK_WINDOW=0)
def test_logs_and_revisions_are_listed(api, create, runtime_name, registered):
    name = registered(2)
    create(name="logged", model=name, version="1")
    converge("logged")
    api.patch("/api/v1/deployments/logged", {"version": "2"})
    converge("logged", until=lambda x: x.serving_revision.number == 2 and x.status == "ready")
    revisions = api.get("/api/v1/deployments/logged/revisions").json()["results"]
    assert [(r["number"], r["model_version"], r["state"]) for r in revisions] == [
        (2, "2", "live"),
        (1, "1", "superseded"),
    ]
    logs = api.get("/api/v1/deployments/logged/logs?tail=20").json()["instances"]
    assert len(logs) == 1 and "ready" in logs[0]["logs"]  # no rollback window: r1 was stopped
