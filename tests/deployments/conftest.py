"""Fixtures for deployment tests: real model servers and routers on loopback."""

from __future__ import annotations

import os
import signal
import time

import pytest

from deployments.models import Deployment, Instance
from deployments.reconciler import reconcile
from deployments.runtimes import InstanceSpec, install_id, process


def instance_spec(inst: Instance, *, port: int) -> InstanceSpec:
    """What the runtime was given to start ``inst``, on another port: to start a second copy
    under the same labels, as a worker that crashed between start and save would."""
    revision = inst.revision
    return InstanceSpec(
        deployment=inst.deployment.name,
        revision=revision.number,
        ordinal=inst.ordinal,
        model_name=revision.model_version.model.name,
        model_version=str(revision.model_version.version),
        model_dir=revision.model_dir,
        model_sha256=revision.model_sha256,
        port=port,
    )


@pytest.fixture(autouse=True)
def _kill_owned_processes():
    """Whatever a test started (servers, routers, containers) is gone after it."""
    yield
    for proc in process.find_labelled(install_id()):
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    from deployments.runtimes.docker import docker_available

    if docker_available()[0]:
        from deployments.runtimes import get_runtime

        runtime = get_runtime("docker")
        for status in runtime.list_owned():
            runtime.stop(status.runtime_id, timeout=1)


@pytest.fixture
def registered(api, model_name, model_zip):
    """register(n=1) -> model name with n versions uploaded (same files, distinct versions)."""

    def make(n: int = 1, *, name: str | None = None, payload: bytes | None = None) -> str:
        name = name or model_name
        if api.get(f"/api/v1/models/{name}").status_code == 404:
            assert api.post("/api/v1/models", {"name": name}).status_code == 201
        for _ in range(n):
            resp = api.upload(f"/api/v1/models/{name}/versions", payload or model_zip)
            assert resp.status_code == 201, resp.content
        return name

    return make


def converge(name: str, *, until=None, timeout: float = 60.0) -> Deployment:
    """Run reconciler passes (as the Celery task would) until ``until(deployment)``."""
    until = until or (lambda d: d.status == Deployment.Status.READY)
    deadline = time.monotonic() + timeout
    d = Deployment.objects.get(name=name)
    while time.monotonic() < deadline:
        reconcile(d.pk, budget=5)
        if not Deployment.objects.filter(pk=d.pk).exists():
            return d
        d = Deployment.objects.select_related("serving_revision", "desired_revision").get(pk=d.pk)
        if until(d):
            return d
        time.sleep(0.1)
    raise AssertionError(
        f"{name} did not converge: status={d.status} phase={d.phase} msg={d.status_message}"
    )
