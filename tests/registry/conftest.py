"""Helpers for the registry tests: MLflow runs to register from, and a real MLflow server
with basic-auth configured as `make run` configures it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from django.test import override_settings

from controlplane.run import MLFLOW_USER, mlflow_answers_as_ours, mlflow_auth_setup
from tests.controlplane.test_run_supervisor import free_port
from tests.support import wait_http


@pytest.fixture
def run_with(sklearn_model_dir):
    """run_with(metrics={...}, params={...}) -> ``runs:/<id>/model`` of a new
    MLflow run that logged those metrics and params and the sklearn model."""
    from registry.mlflow_store import get_store

    def make(*, metrics: dict | None = None, params: dict | None = None) -> str:
        store = get_store()
        client = store.client
        experiment = client.get_experiment_by_name("tests-ui")
        if experiment is None:
            root = Path(store.artifact_root) / "tests-ui"
            root.mkdir(parents=True, exist_ok=True)
            experiment_id = client.create_experiment("tests-ui", artifact_location=root.as_uri())
        else:
            experiment_id = experiment.experiment_id
        run_id = client.create_run(experiment_id).info.run_id
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, value)
        for key, value in (params or {}).items():
            client.log_param(run_id, key, value)
        client.log_artifacts(run_id, str(sklearn_model_dir), "model")
        client.set_terminated(run_id)
        return f"runs:/{run_id}/model"

    return make


@dataclass(frozen=True)
class AuthServer:
    uri: str
    password: str  # the control plane's (the server's admin)

    def settings(self, **overrides):
        values = dict(
            MLFLOW_TRACKING_URI=self.uri,
            MLFLOW_TRACKING_USERNAME=MLFLOW_USER,
            MLFLOW_TRACKING_PASSWORD=self.password,
        )
        values.update(overrides)
        return override_settings(**values)

    def call(self, method: str, path: str, *, auth=None, **kwargs) -> requests.Response:
        session = requests.Session()
        session.trust_env = False
        return session.request(method, self.uri + path, auth=auth, timeout=30, **kwargs)


def start_auth_server(root: Path):
    auth = mlflow_auth_setup(root)
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--app-name",
            "basic-auth",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, **auth.server_env, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_http(f"{uri}/health", timeout=150, proc=proc)
    assert mlflow_answers_as_ours(uri, auth.password)
    return proc, AuthServer(uri, auth.password)


@pytest.fixture(scope="session")
def auth_mlflow(tmp_path_factory):
    """One server for every test that needs it (tests/registry/test_mlflow_auth.py and
    test_sync_gated.py): its start costs seconds."""
    proc, server = start_auth_server(tmp_path_factory.mktemp("mlflow-auth"))
    try:
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
