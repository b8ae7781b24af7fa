"""The deployments API contract: bad input is a 4xx that changes nothing."""

from __future__ import annotations

import pytest

from audit.models import AuditEvent
from deployments.models import Deployment, Revision

pytestmark = pytest.mark.django_db


@pytest.fixture
def model(api, registered):
    return registered(2)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "Bad_Name", "version": "1"}, 400, "invalid_name"),
        ({"name": "-x", "version": "1"}, 400, "invalid_name"),
        ({"name": "ok"}, 400, "invalid_target"),
        ({"name": "ok", "version": "1", "alias": "prod"}, 400, "invalid_target"),
        ({"name": "ok", "version": "9"}, 404, "version_not_found"),
        ({"name": "ok", "version": "one"}, 400, "invalid_version"),
        ({"name": "ok", "alias": "nope"}, 404, "alias_not_found"),
        ({"name": "ok", "version": "1", "runtime": "k8s"}, 400, "invalid_runtime"),
        ({"name": "ok", "version": "1", "replicas": 0}, 400, "invalid_replicas"),
        ({"name": "ok", "version": "1", "replicas": 99}, 400, "invalid_replicas"),
        ({"name": "ok", "version": "1", "resources": {"cpu": -1}}, 400, "invalid_resources"),
        ({"name": "ok", "version": "1", "resources": {"memory_mb": 1}}, 400, "invalid_resources"),
        ({"name": "ok", "version": "1", "env": {"SERVING_PORT": "1"}}, 400, "invalid_env"),
        ({"name": "ok", "version": "1", "env": {"lower": "x"}}, 400, "invalid_env"),
        ({"name": "ok", "version": "1", "replicas": "many"}, 400, "invalid"),
    ],
)
def test_bad_deployment_requests_change_nothing(api, model, body, status, code):
    resp = api.post("/api/v1/deployments", {"model": model, **body})
    assert resp.status_code == status, resp.content
    assert resp.json()["error"]["code"] == code
    assert Deployment.objects.count() == 0
    assert not AuditEvent.objects.filter(action__startswith="deployment.").exists()


def test_deploying_an_unknown_model_is_404(api):
    resp = api.post("/api/v1/deployments", {"name": "x", "model": "nope", "version": "1"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_duplicate_names_are_409(api, model):
    assert (
        api.post("/api/v1/deployments", {"name": "dup", "model": model, "version": "1"}).status_code
        == 202
    )
    resp = api.post("/api/v1/deployments", {"name": "dup", "model": model, "version": "2"})
    assert resp.status_code == 409
    assert Revision.objects.count() == 1


def test_create_returns_the_contract_fields(api, model):
    body = api.post(
        "/api/v1/deployments",
        {
            "name": "shape",
            "model": model,
            "version": "2",
            "replicas": 2,
            "resources": {"cpu": 0.5, "memory_mb": 512},
        },
    ).json()
    assert body["status"] == "pending" and body["revision"] == 1 and body["version"] == "2"
    assert body["model_version"] == "2" and body["replicas"] == 2
    assert body["resources"] == {"cpu": 0.5, "memory_mb": 512, "gpu": None}
    assert body["endpoint"].startswith("http://127.0.0.1:")
    assert body["instances"] == []


def test_update_without_changes_makes_no_revision(api, model):
    api.post("/api/v1/deployments", {"name": "same", "model": model, "version": "1"})
    api.patch("/api/v1/deployments/same", {"version": "1"})
    assert Revision.objects.filter(deployment__name="same").count() == 1
    api.patch("/api/v1/deployments/same", {"replicas": 3})
    assert list(
        Revision.objects.filter(deployment__name="same").values_list("spec__replicas", flat=True)
    ) == [3, 1]


def test_rollback_without_a_good_earlier_revision_is_409(api, model):
    api.post("/api/v1/deployments", {"name": "young", "model": model, "version": "1"})
    resp = api.post("/api/v1/deployments/young/rollback", {})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "no_previous_revision"
    assert api.post("/api/v1/deployments/young/rollback", {"revision": 7}).status_code == 404
    assert api.post("/api/v1/deployments/young/rollback", {"revision": "x"}).status_code == 400


def test_deployed_versions_cannot_be_deleted(api, model):
    api.post("/api/v1/deployments", {"name": "pin", "model": model, "version": "1"})
    resp = api.delete(f"/api/v1/models/{model}/versions/1")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "version_deployed"
    assert api.delete(f"/api/v1/models/{model}/versions/2").status_code == 204


def test_deploy_scope_is_required(api_as, user, model):
    resp = api_as(user, ["read", "registry:write"]).post(
        "/api/v1/deployments", {"name": "noscope", "model": model, "version": "1"}
    )
    assert resp.status_code == 403
    assert api_as(user, ["read"]).get("/api/v1/deployments").status_code == 200


def test_wait_parameter_is_validated(api, model):
    resp = api.post(
        "/api/v1/deployments?wait=forever", {"name": "w", "model": model, "version": "1"}
    )
    assert resp.status_code == 400
    resp = api.post(
        "/api/v1/deployments?wait=ready&timeout=-1", {"name": "w", "model": model, "version": "1"}
    )
    assert resp.status_code == 400
    assert Deployment.objects.count() == 0
    assert api.get("/api/v1/deployments/w/logs?tail=0").status_code in (400, 404)


def test_list_queries_do_not_grow_with_rows(api, model, django_assert_max_num_queries):
    for i in range(5):
        api.post(
            "/api/v1/deployments", {"name": f"d{i}", "model": model, "version": "1", "replicas": 2}
        )
    with django_assert_max_num_queries(8):
        body = api.get("/api/v1/deployments").json()
    assert body["count"] == 5


def test_waiting_on_a_failed_deployment_is_a_409_with_the_failure(api, model):
    assert (
        api.post("/api/v1/deployments", {"name": "w", "model": model, "version": "1"}).status_code
        == 202
    )
    # What the reconciler records when the revision cannot start.
    Deployment.objects.filter(name="w").update(
        status=Deployment.Status.FAILED,
        status_message="revision 1 failed: ModuleNotFoundError: No module named 'xgboost'",
    )
    resp = api.patch("/api/v1/deployments/w?wait=ready&timeout=5", {})
    assert resp.status_code == 409, resp.content
    error = resp.json()["error"]
    assert error["code"] == "deployment_failed"
    assert "No module named 'xgboost'" in error["message"]
    assert error["details"]["status"] == "failed" and error["details"]["name"] == "w"
    # Without wait the answer stays the plain state, as before.
    assert api.patch("/api/v1/deployments/w", {}).status_code == 200
    Deployment.objects.filter(name="w").update(status=Deployment.Status.READY, status_message="")
    assert api.patch("/api/v1/deployments/w?wait=ready&timeout=5", {}).status_code == 200


def test_a_misspelt_field_in_a_deployment_patch_is_a_400(api, model):
    api.post("/api/v1/deployments", {"name": "p", "model": model, "version": "1"})
    resp = api.patch("/api/v1/deployments/p", {"replica": 3})
    assert resp.status_code == 400 and resp.json()["error"]["details"]["fields"] == ["replica"]
    assert Revision.objects.filter(deployment__name="p").count() == 1
