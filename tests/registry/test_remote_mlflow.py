"""The remote path: a real `mlflow server` on loopback, as in production."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import override_settings

from registry.mlflow_store import get_store
from tests.support import free_port, wait_http

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'db.sqlite'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_upload_promote_and_sync_against_a_real_mlflow_server(
    api, model_name, model_zip, mlflow_server
):
    with override_settings(MLFLOW_TRACKING_URI=mlflow_server):
        store = get_store()
        assert store.tracking_uri == mlflow_server
        assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
        resp = api.upload(f"/api/v1/models/{model_name}/versions", model_zip)
        assert resp.status_code == 201, resp.content
        assert resp.json()["source"].startswith("mlflow-artifacts:/")
        resp = api.post(
            f"/api/v1/models/{model_name}/aliases/production", {"version": "1", "reason": "remote"}
        )
        assert resp.status_code == 201
        aliases = store.client.get_registered_model(model_name).aliases
        assert {k: int(v) for k, v in aliases.items()} == {"production": 1}
        # The server holds the files: they download over HTTP.
        files = store.download_version(
            model_name, 1, Path(os.environ["CONTROLPLANE_DATA_DIR"]) / "dl-remote"
        )
        assert (files / "MLmodel").exists()
    assert get_store().tracking_uri != mlflow_server
