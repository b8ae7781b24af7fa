"""A non-sklearn framework on the `docker` runtime, with the real engine: the session's XGBoost
model (tests/frameworks/conftest.py's `trained`, the same one the local-runtime matrix serves)
in an image built from its requirements, answering every protocol exactly as XGBoost's own
predict and predict_proba did.

XGBoost because its Linux wheels carry their own OpenMP runtime (``xgboost.libs``), where
LightGBM's need the system's ``libgomp.so.1``, which the slim base image does not have. The
model's ``xgboost==V`` requirement is served as ``xgboost-cpu==V``: the same release and
import package without the CUDA kernels, so the image's wheelhouse holds a 6 MB wheel instead
of xgboost's 230 MB one plus nvidia-nccl-cu12's 470 MB (the requirement is rewritten in a
copy of the model, as an operator would pin it for a CPU-only fleet).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time

import pytest

from deployments.runtimes.base import InstanceSpec
from tests.deployments.docker_support import (
    make_docker_runtime,
    remove_owned,
    require_base_image,
    require_docker,
)
from tests.frameworks.test_frameworks import call, check, requests_for
from tests.support import free_port, wait_http

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

# Its own image repository: the other docker tests prune the images of theirs.
IMAGE_PREFIX = "controlplane-serving-test-xgboost"


@pytest.fixture(scope="module")
def docker_runtime():
    require_docker()
    require_base_image()
    runtime = make_docker_runtime(image_prefix=IMAGE_PREFIX)
    yield runtime
    remove_owned(runtime)


@pytest.fixture(scope="module")
def cpu_model(trained, tmp_path_factory):
    t = trained["xgboost"]
    if isinstance(t, BaseException):
        raise t
    model_dir = tmp_path_factory.mktemp("docker-xgboost") / "model"
    shutil.copytree(t.model_dir, model_dir)
    requirements = model_dir / "requirements.txt"
    text = requirements.read_text()
    assert re.search(r"^xgboost==", text, re.M), text
    requirements.write_text(re.sub(r"^xgboost==", "xgboost-cpu==", text, flags=re.M))
    for entry in [model_dir.parent, model_dir, *model_dir.rglob("*")]:
        entry.chmod(0o755 if entry.is_dir() else 0o644)  # the container's user reads it
    return t, model_dir


def test_an_xgboost_model_on_docker_answers_like_xgboost(docker_runtime, cpu_model):
    t, model_dir = cpu_model
    port = free_port()
    spec = InstanceSpec(
        deployment="fw-docker-xgb",
        revision=1,
        ordinal=0,
        model_name="xgb",
        model_version="1",
        model_dir=str(model_dir),
        model_sha256="sha-xgb",
        port=port,
        cpu=1.0,
        memory_mb=768,
    )
    started = time.monotonic()
    events: list[str] = []
    docker_runtime.prepare(spec, progress=events.append)
    built = time.monotonic() - started
    status = docker_runtime.start(spec)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=180)
        print(f"\nxgboost on docker: image ready in {built:.1f}s (builds: "
              f"{docker_runtime.builds}), serving {time.monotonic() - started:.1f}s after prepare")  # fmt: skip
        endpoint = f"http://127.0.0.1:{port}"
        failed = {}
        for method in [None, *t.expected]:
            expected = t.expected[method or "predict"]
            for protocol, (path, body) in requests_for(t, "xgb", method).items():
                code, answer = call(endpoint + path, body)
                problem = check(protocol, code, answer, expected)
                if problem is not None:
                    failed[f"{protocol}:{method or 'default'}"] = problem
        assert not failed, failed
        assert set(t.expected) >= {"predict", "predict_proba"}
    finally:
        docker_runtime.stop(status.runtime_id, timeout=5)
        _remove_older_images(keep=docker_runtime.ensure_image(spec))


def _remove_older_images(keep: str) -> None:
    """Each change of the serving code makes a new image: only the newest is worth its disk."""
    import docker

    client = docker.from_env()
    try:
        for image in client.images.list(name=IMAGE_PREFIX):
            for tag in image.tags:
                if tag != keep:
                    with contextlib.suppress(docker.errors.APIError):  # in use, or gone
                        client.images.remove(tag)
    finally:
        client.close()
