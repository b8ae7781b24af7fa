"""The alias sync: moves made with MLflow's own client are recorded as external."""

from __future__ import annotations

import pytest

from registry.mlflow_store import get_store
from registry.models import AliasMove, ModelVersion, RegisteredModel
from registry.services import registry_sync
from registry.tasks import registry_sync as registry_sync_task

pytestmark = pytest.mark.django_db


def test_moves_made_in_mlflow_are_recorded_as_external(api, model_name, logged_run):
    api.post("/api/v1/models", {"name": model_name})
    for _ in range(2):
        api.post(f"/api/v1/models/{model_name}/versions", {"source": logged_run["source"]})
    api.post(f"/api/v1/models/{model_name}/aliases/production", {"version": "1", "reason": "first"})

    get_store().client.set_registered_model_alias(model_name, "production", "2")
    assert registry_sync().external_moves >= 1
    move = AliasMove.objects.filter(model__name=model_name).first()
    assert (move.origin, move.from_version, move.to_version) == ("external", 1, 2)
    assert move.actor is None
    history = api.get(f"/api/v1/models/{model_name}/history").json()["results"]
    assert history[0]["origin"] == "external" and history[0]["to"] == "2"

    # Idempotent: a second pass records nothing new.
    registry_sync()
    assert AliasMove.objects.filter(model__name=model_name).count() == 2
    assert AliasMove.objects.filter(model__name=model_name, origin="external").count() == 1


def test_models_and_versions_created_in_mlflow_are_adopted(model_name, logged_run):
    import mlflow

    mlflow.register_model(logged_run["source"], model_name)
    get_store().client.set_registered_model_alias(model_name, "staging", "1")
    registry_sync_task.apply()  # the Celery task runs the same service
    model = RegisteredModel.objects.get(name=model_name)
    version = ModelVersion.objects.get(model=model, version=1)
    assert version.metrics["accuracy"] == 0.93
    assert model.aliases.get(name="staging").version == version


def test_alias_removed_in_mlflow_is_recorded(api, model_name, logged_run):
    api.post("/api/v1/models", {"name": model_name})
    api.post(f"/api/v1/models/{model_name}/versions", {"source": logged_run["source"]})
    api.post(f"/api/v1/models/{model_name}/aliases/staging", {"version": "1", "reason": "r"})
    get_store().client.delete_registered_model_alias(model_name, "staging")
    registry_sync()
    move = AliasMove.objects.filter(model__name=model_name).first()
    assert (move.from_version, move.to_version, move.origin) == (1, None, "external")
