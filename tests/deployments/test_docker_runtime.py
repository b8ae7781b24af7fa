"""DockerRuntime against the real Docker engine and the real model server.

The serving image is built once for the test model's requirements and reused across runs
(its tag is a hash of its inputs); the first build takes a couple of minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import docker
import numpy as np
import pandas as pd
import pytest

from deployments.runtimes.base import InstanceSpec, RuntimeError_
from deployments.runtimes.docker import DockerRuntime, docker_available
from tests.deployments.docker_support import (  # noqa: F401 (docker_runtime_fixture)
    admin_token,
    docker_runtime_fixture,
    make_docker_runtime,
    remove_other_test_images,
)
from tests.support import free_port, wait_http

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

FEATURES = [f"f{i}" for i in range(6)]
READY_TIMEOUT = 120.0


def save_model(path: Path, *, seed: int) -> object:
    """A LogisticRegression saved with signature and input example, readable by the
    container's non-root user. The requirements are the same for every seed."""
    import mlflow
    import mlflow.sklearn
    import sklearn
    import skops
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(300, len(FEATURES))), columns=FEATURES)
    y = (X["f0"] - X["f1"] + rng.normal(scale=0.3, size=len(X)) > 0).astype(np.int64)
    estimator = LogisticRegression(max_iter=300).fit(X, y)
    mlflow.sklearn.save_model(
        estimator,
        str(path),
        signature=infer_signature(X, estimator.predict(X)),
        input_example=X.head(3),
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"scikit-learn=={sklearn.__version__}",
            f"skops=={skops.__version__}",
        ],
    )
    for entry in [path, *path.rglob("*")]:
        entry.chmod(0o755 if entry.is_dir() else 0o644)
    return estimator


def spec_for(model_dir: Path, *, revision: int, port: int, **extra) -> InstanceSpec:
    return InstanceSpec(
        deployment="churn",
        revision=revision,
        ordinal=0,
        model_name="churn",
        model_version=str(revision),
        model_dir=str(model_dir),
        model_sha256=f"sha-{revision}",
        port=port,
        cpu=1.0,
        memory_mb=768,
        **extra,
    )


def invoke(port: int, rows: np.ndarray) -> list:
    body = json.dumps({"dataframe_split": {"columns": FEATURES, "data": rows.tolist()}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["predictions"]


def wait_for(predicate, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def engine_attrs(runtime_id: str) -> dict:
    client = docker.from_env()
    try:
        return client.containers.get(runtime_id).attrs
    finally:
        client.close()


def engine_exec(runtime_id: str, command: list[str]) -> tuple[int, str]:
    client = docker.from_env()
    try:
        result = client.containers.get(runtime_id).exec_run(command)
        return result.exit_code, result.output.decode()
    finally:
        client.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("docker-models")
    return {seed: (root / f"m{seed}", save_model(root / f"m{seed}", seed=seed)) for seed in (1, 2)}


@pytest.fixture(scope="module")
def instance(docker_runtime, models):
    """Revision 1 of model 1, started and answering /ping."""
    model_dir, _ = models[1]
    port = free_port()
    spec = spec_for(model_dir, revision=1, port=port)
    status = docker_runtime.start(spec)
    started = time.monotonic()
    wait_http(f"http://127.0.0.1:{port}/ping", timeout=READY_TIMEOUT)
    print(f"\nstart-to-ready: {time.monotonic() - started:.1f}s (builds: {docker_runtime.builds})")
    yield spec, status
    docker_runtime.stop(status.runtime_id, timeout=5)
    remove_other_test_images(keep=docker_runtime.ensure_image(spec))


def test_served_predictions_match_the_models_own(instance, models):
    spec, _ = instance
    _, estimator = models[1]
    rows = np.random.default_rng(7).normal(size=(25, len(FEATURES)))
    expected = estimator.predict(pd.DataFrame(rows, columns=FEATURES)).tolist()
    assert invoke(spec.port, rows) == expected


def test_the_container_is_hardened(instance):
    spec, status = instance
    attrs = engine_attrs(status.runtime_id)
    host = attrs["HostConfig"]

    assert attrs["Config"]["User"].split(":")[0] not in ("", "0", "root")
    assert engine_exec(status.runtime_id, ["id", "-u"]) == (0, "10001\n")
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True
    code, _ = engine_exec(status.runtime_id, ["touch", "/opt/serving/written"])
    assert code != 0
    assert set(host["Tmpfs"]) == {"/tmp"}
    assert host["Memory"] == 768 * 1024 * 1024
    assert host["NanoCpus"] == 1_000_000_000
    assert host.get("CpuShares") in (0, None)  # normal priority: the engine's default weight
    assert 0 < host["PidsLimit"] <= 256
    assert host["RestartPolicy"]["Name"] == "on-failure"
    assert host["RestartPolicy"]["MaximumRetryCount"] > 0
    assert attrs["Config"]["Healthcheck"]["Test"][0] == "CMD"
    # The model directory is the only host path inside, read-only.
    assert [(m["Type"], m["Source"], m["Destination"], m["RW"]) for m in attrs["Mounts"]] == [
        ("bind", spec.model_dir, "/model", False)
    ]
    # Effective capabilities of the server process: none.
    code, proc_status = engine_exec(status.runtime_id, ["cat", "/proc/1/status"])
    assert "CapEff:\t0000000000000000" in proc_status


def test_instances_are_found_again_by_their_labels(instance, docker_runtime):
    spec, status = instance
    owned = {s.runtime_id: s for s in docker_runtime.list_owned()}

    assert status.runtime_id in owned
    found = owned[status.runtime_id]
    assert (found.deployment, found.revision, found.ordinal) == ("churn", 1, 0)
    assert found.address == f"127.0.0.1:{spec.port}"
    assert found.running and found.exit_code is None and found.restarts == 0
    labels = engine_attrs(status.runtime_id)["Config"]["Labels"]
    assert labels["controlplane.owner"] == docker_runtime.owner
    assert labels["controlplane.port"] == str(spec.port)
    # Another install's runtime does not see (or touch) them.
    stranger = make_docker_runtime()
    assert stranger.list_owned() == []
    assert stranger.inspect(status.runtime_id) is None
    stranger.stop(status.runtime_id)
    assert docker_runtime.inspect(status.runtime_id).running


def test_logs_return_the_servers_output(instance, docker_runtime):
    _, status = instance
    text = docker_runtime.logs(status.runtime_id, tail=50)

    assert "ready: churn version 1" in text
    assert len(docker_runtime.logs(status.runtime_id, tail=1).strip().splitlines()) == 1


def get_predictions(port: int, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predictions", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            assert isinstance(json.loads(response.read())["records"], list)
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_prediction_log_needs_the_deployments_admin_token(instance, docker_runtime):
    spec, status = instance

    assert get_predictions(spec.port, None) == 401
    assert get_predictions(spec.port, admin_token("another")) == 401
    assert get_predictions(spec.port, admin_token("churn")) == 200
    env = engine_attrs(status.runtime_id)["Config"]["Env"]
    assert f"SERVING_ADMIN_TOKEN={admin_token('churn')}" in env
    assert admin_token("churn") not in docker_runtime.logs(status.runtime_id, tail=1000)


def test_a_new_revision_with_the_same_requirements_builds_nothing(
    instance, docker_runtime, models, tmp_path
):
    spec_1, _ = instance
    model_dir, estimator = models[2]
    builds = docker_runtime.builds
    port = free_port()
    log_dir = tmp_path / "predictions"
    spec = spec_for(model_dir, revision=2, port=port, prediction_log_dir=str(log_dir))

    started = time.monotonic()
    assert docker_runtime.ensure_image(spec) == docker_runtime.ensure_image(spec_1)
    status = docker_runtime.start(spec)
    try:
        assert time.monotonic() - started < 15
        assert docker_runtime.builds == builds
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=READY_TIMEOUT)
        rows = np.random.default_rng(8).normal(size=(10, len(FEATURES)))
        assert (
            invoke(port, rows) == estimator.predict(pd.DataFrame(rows, columns=FEATURES)).tolist()
        )
        # The prediction log is the one writable host directory it gets.
        records = wait_for(
            lambda: [line for f in log_dir.glob("*.jsonl") for line in f.read_text().splitlines()],
            timeout=10,
            what="prediction log records",
        )
        assert json.loads(records[0])["model"] == "churn"
    finally:
        docker_runtime.stop(status.runtime_id, timeout=5)


def test_a_crash_is_restarted_but_a_docker_kill_is_final(docker_runtime, models):
    model_dir, _ = models[1]
    port = free_port()
    status = docker_runtime.start(spec_for(model_dir, revision=3, port=port))
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=READY_TIMEOUT)

        # The main process dies (not through the engine): on-failure restarts it.
        os.kill(engine_attrs(status.runtime_id)["State"]["Pid"], signal.SIGKILL)
        restarted = wait_for(
            lambda: (
                (s := docker_runtime.inspect(status.runtime_id)).restarts >= 1 and s.running and s
            ),
            timeout=30,
            what="a restart",
        )
        assert restarted.exit_code is None
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=READY_TIMEOUT)

        # A kill through the engine counts as stopped by hand: no restart.
        docker.from_env().containers.get(status.runtime_id).kill()
        stopped = wait_for(
            lambda: not (s := docker_runtime.inspect(status.runtime_id)).running and s,
            timeout=30,
            what="the container to stop",
        )
        assert stopped.exit_code == 137
        time.sleep(3)
        after = docker_runtime.inspect(status.runtime_id)
        assert not after.running and after.restarts == restarted.restarts
    finally:
        docker_runtime.stop(status.runtime_id, timeout=5)


def test_an_idle_priority_container_gets_the_lowest_cpu_weight(docker_runtime, models):
    model_dir, _ = models[1]
    spec = spec_for(model_dir, revision=17, port=free_port(), priority="idle")
    status = docker_runtime.start(spec)
    try:
        assert engine_attrs(status.runtime_id)["HostConfig"]["CpuShares"] == 2
    finally:
        docker_runtime.stop(status.runtime_id, timeout=5)


def test_stop_removes_the_container_and_is_idempotent(docker_runtime, models):
    model_dir, _ = models[1]
    status = docker_runtime.start(spec_for(model_dir, revision=4, port=free_port()))

    docker_runtime.stop(status.runtime_id, timeout=5)

    assert docker_runtime.inspect(status.runtime_id) is None
    assert status.runtime_id not in {s.runtime_id for s in docker_runtime.list_owned()}
    with pytest.raises(docker.errors.NotFound):
        engine_attrs(status.runtime_id)
    docker_runtime.stop(status.runtime_id)  # again: nothing to do, no error
    assert docker_runtime.logs(status.runtime_id) == ""


def test_a_missing_base_image_is_a_runtime_error(docker_runtime, models):
    runtime = make_docker_runtime(base_image="controlplane-no-such-base:never")
    model_dir, _ = models[1]

    with pytest.raises(RuntimeError_, match="base image controlplane-no-such-base:never not found"):
        runtime.start(spec_for(model_dir, revision=5, port=free_port()))
    assert runtime.list_owned() == []


def test_bridge_mode_on_an_engine_without_a_bridge_network_is_refused(docker_runtime, models):
    client = docker.from_env()
    try:
        if client.networks.list(names=["bridge"]):
            pytest.skip("this engine has a bridge network")
    finally:
        client.close()
    runtime = make_docker_runtime(network_mode="bridge")
    model_dir, _ = models[1]

    with pytest.raises(RuntimeError_, match="needs the engine's default bridge network"):
        runtime.start(spec_for(model_dir, revision=8, port=free_port()))
    assert runtime.list_owned() == []


def test_a_model_the_container_user_cannot_read_is_refused(models, tmp_path):
    model_dir, _ = models[1]
    private = tmp_path / "private-model"
    shutil.copytree(model_dir, private)
    (private / "MLmodel").chmod(0o600)
    runtime = make_docker_runtime()

    with pytest.raises(RuntimeError_, match="not readable by the container's user"):
        runtime.start(spec_for(private, revision=6, port=free_port()))


def test_an_unreachable_engine_is_a_runtime_error(models, tmp_path):
    base_url = f"unix://{tmp_path}/no-engine.sock"
    runtime = DockerRuntime(
        owner="nobody", cache_dir=tmp_path / "cache", base_url=base_url, admin_token=admin_token
    )
    model_dir, _ = models[1]

    ok, reason = docker_available(base_url)
    assert not ok and reason
    with pytest.raises(RuntimeError_, match="not reachable"):
        runtime.start(spec_for(model_dir, revision=7, port=free_port()))
    with pytest.raises(RuntimeError_, match="not reachable"):
        runtime.list_owned()


def test_building_leaves_no_build_stage_image_of_ours(instance, docker_runtime):
    """The serving image's build stage (hundreds of MB, untagged) is pruned after the build."""
    client = docker.from_env()
    try:
        left = client.images.list(
            filters={"dangling": True, "label": [f"controlplane.owner={docker_runtime.owner}"]}
        )
    finally:
        client.close()
    assert left == []
