"""Helpers for the registry UI tests."""

from __future__ import annotations

from pathlib import Path

import pytest


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
