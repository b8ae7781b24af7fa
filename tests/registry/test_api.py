"""The registry's REST API contract, against a real MLflow store."""

from __future__ import annotations

import pytest

from audit.models import AuditEvent
from registry.mlflow_store import get_store
from registry.models import AliasMove, ApprovalPolicy, ModelVersion

pytestmark = pytest.mark.django_db(transaction=False)


def create_model(api, name, **extra):
    resp = api.post("/api/v1/models", {"name": name, **extra})
    assert resp.status_code == 201, resp.content
    return resp.json()


def register(api, name, source):
    resp = api.post(
        f"/api/v1/models/{name}/versions", {"source": source, "description": "from a run"}
    )
    assert resp.status_code == 201, resp.content
    return resp.json()


def test_creating_a_model_writes_mlflow_and_the_audit_log(api, model_name):
    body = create_model(api, model_name, description="churn", tags={"team": "growth"})
    assert body["name"] == model_name
    assert body["aliases"] == {}
    assert body["tags"] == {"team": "growth"}
    assert get_store().client.get_registered_model(model_name).tags == {"team": "growth"}
    event = AuditEvent.objects.get(action="model.create", object_id=model_name)
    assert event.actor_label == "alice"
    assert event.request_id


def test_duplicate_model_is_a_409(api, model_name):
    create_model(api, model_name)
    resp = api.post("/api/v1/models", {"name": model_name})
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "model_exists"


@pytest.mark.parametrize("bad", ["", "../etc", "a b", "x" * 300, "/abs"])
def test_invalid_model_names_are_400_and_change_nothing(api, bad):
    before = AuditEvent.objects.count()
    resp = api.post("/api/v1/models", {"name": bad})
    assert resp.status_code == 400
    assert "error" in resp.json() and resp.json()["error"]["message"]
    assert AuditEvent.objects.count() == before


def test_registering_from_a_run_reads_metrics_params_and_signature(api, model_name, logged_run):
    create_model(api, model_name)
    body = register(api, model_name, logged_run["source"])
    assert body["version"] == "1"
    assert body["metrics"] == {"accuracy": 0.93, "f1": 0.91}
    assert body["params"] == {"C": "1.0", "penalty": "l2"}
    assert body["run_id"] == logged_run["run_id"]
    assert "sklearn" in body["flavors"] and "python_function" in body["flavors"]
    names = [col["name"] for col in body["signature"]["inputs"]]
    assert names == [f"f{i}" for i in range(20)]
    assert body["input_example"] is not None
    assert any(r.startswith("scikit-learn==") for r in body["requirements"])
    listing = api.get(f"/api/v1/models/{model_name}/versions").json()
    assert [v["version"] for v in listing["results"]] == ["1"]
    assert api.get(f"/api/v1/models/{model_name}").json()["latest_version"] == "1"


@pytest.mark.parametrize(
    "source",
    [
        "file:///etc/passwd",
        "/tmp/model",
        "runs:/abc/../../etc",
        "runs:/abc/%2e%2e/x",
        "runs:/abc/%252e%252e/x",
        "runs:/abc/..%2fetc",
        "models:/m/1/../../../etc/passwd",
        "runs:/abc/model?x=/../../",
        "runs:/abc\\..\\x",
        "models:/other/../../x",
        "http://127.0.0.1:1/model",
        "runs:/abc/model#frag",
    ],
)
def test_sources_outside_mlflow_uris_are_refused(api, model_name, source):
    create_model(api, model_name)
    resp = api.post(f"/api/v1/models/{model_name}/versions", {"source": source})
    assert resp.status_code == 400, resp.content
    assert ModelVersion.objects.filter(model__name=model_name).count() == 0


def test_a_missing_run_is_a_400_not_a_500(api, model_name):
    create_model(api, model_name)
    resp = api.post(
        f"/api/v1/models/{model_name}/versions", {"source": "runs:/0123456789abcdef/model"}
    )
    assert resp.status_code == 400
    assert ModelVersion.objects.filter(model__name=model_name).count() == 0


def test_versions_of_unknown_models_are_404(api):
    assert api.get("/api/v1/models/nope/versions").status_code == 404
    assert api.get("/api/v1/models/nope").json()["error"]["code"] == "not_found"


def test_promotion_moves_the_mlflow_alias_and_records_history(api, model_name, logged_run):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    register(api, model_name, logged_run["source"])
    resp = api.post(
        f"/api/v1/models/{model_name}/aliases/staging",
        {"version": "1", "reason": "passes offline eval"},
    )
    assert resp.status_code == 201, resp.content
    resp = api.post(
        f"/api/v1/models/{model_name}/aliases/staging", {"version": "2", "reason": "better recall"}
    )
    assert resp.status_code == 201
    assert resp.json()["from"] == "1" and resp.json()["to"] == "2"
    assert get_store().client.get_registered_model(model_name).aliases == {"staging": 2}
    assert api.get(f"/api/v1/models/{model_name}").json()["aliases"] == {"staging": "2"}
    history = api.get(f"/api/v1/models/{model_name}/history").json()["results"]
    assert [(h["alias"], h["from"], h["to"], h["reason"], h["actor"]) for h in history] == [
        ("staging", "1", "2", "better recall", "alice"),
        ("staging", None, "1", "passes offline eval", "alice"),
    ]
    assert (
        AuditEvent.objects.filter(action="alias.set", object_id=f"{model_name}@staging").count()
        == 2
    )


def test_promotion_requires_a_reason(api, model_name, logged_run):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    resp = api.post(
        f"/api/v1/models/{model_name}/aliases/production", {"version": "1", "reason": "  "}
    )
    assert resp.status_code == 400
    assert AliasMove.objects.count() == 0
    assert get_store().client.get_registered_model(model_name).aliases == {}


@pytest.mark.parametrize("alias", ["latest", "v3", "has space", "-x"])
def test_invalid_alias_names_are_400(api, model_name, logged_run, alias):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    resp = api.post(f"/api/v1/models/{model_name}/aliases/{alias}", {"version": "1", "reason": "r"})
    assert resp.status_code in (400, 404)
    assert AliasMove.objects.count() == 0


def test_promoting_an_unknown_version_is_404(api, model_name):
    create_model(api, model_name)
    resp = api.post(f"/api/v1/models/{model_name}/aliases/staging", {"version": "7", "reason": "r"})
    assert resp.status_code == 404


def test_approval_gate_turns_a_promotion_into_a_request(
    api, api_as, model_name, logged_run, approver, user
):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    ApprovalPolicy.objects.create(alias="production")
    resp = api.post(
        f"/api/v1/models/{model_name}/aliases/production", {"version": "1", "reason": "ship it"}
    )
    assert resp.status_code == 202
    request_id = resp.json()["id"]
    assert get_store().client.get_registered_model(model_name).aliases == {}

    # The requester cannot approve, even with the approver role.
    from django.contrib.auth.models import Permission

    user.user_permissions.add(Permission.objects.get(codename="approve_promotion"))
    resp = api.post(f"/api/v1/promotion-requests/{request_id}/approve", {})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "self_approval"

    as_approver = api_as(approver)
    resp = as_approver.post(f"/api/v1/promotion-requests/{request_id}/approve", {"comment": "ok"})
    assert resp.status_code == 200, resp.content
    assert resp.json()["status"] == "approved" and resp.json()["decided_by"] == "bob"
    assert get_store().client.get_registered_model(model_name).aliases == {"production": 1}
    history = api.get(f"/api/v1/models/{model_name}/history").json()["results"]
    assert history[0]["approved_by"] == "bob" and history[0]["actor"] == "alice"
    assert AuditEvent.objects.filter(action="promotion.approve").count() == 1
    # Deciding twice is a conflict.
    assert (
        as_approver.post(f"/api/v1/promotion-requests/{request_id}/reject", {}).status_code == 409
    )


def test_non_approvers_cannot_decide(api, api_as, model_name, logged_run, other_user):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    ApprovalPolicy.objects.create(alias="production")
    request_id = api.post(
        f"/api/v1/models/{model_name}/aliases/production", {"version": "1", "reason": "r"}
    ).json()["id"]
    resp = api_as(other_user).post(f"/api/v1/promotion-requests/{request_id}/reject", {})
    assert resp.status_code == 403
    assert api.get("/api/v1/promotion-requests?status=pending").json()["count"] == 1


def test_rejection_leaves_the_alias_alone(api, api_as, model_name, logged_run, approver):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    ApprovalPolicy.objects.create(alias="production")
    request_id = api.post(
        f"/api/v1/models/{model_name}/aliases/production", {"version": "1", "reason": "r"}
    ).json()["id"]
    resp = api_as(approver).post(
        f"/api/v1/promotion-requests/{request_id}/reject", {"comment": "no"}
    )
    assert resp.json()["status"] == "rejected"
    assert get_store().client.get_registered_model(model_name).aliases == {}
    assert AliasMove.objects.count() == 0


def test_version_with_an_alias_cannot_be_deleted_or_archived(api, model_name, logged_run):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    api.post(f"/api/v1/models/{model_name}/aliases/staging", {"version": "1", "reason": "r"})
    assert api.delete(f"/api/v1/models/{model_name}/versions/1").status_code == 409
    assert (
        api.patch(f"/api/v1/models/{model_name}/versions/1", {"status": "archived"}).status_code
        == 409
    )
    api.delete(f"/api/v1/models/{model_name}/aliases/staging", {"reason": "retire"})
    assert (
        api.patch(f"/api/v1/models/{model_name}/versions/1", {"status": "archived"}).json()[
            "status"
        ]
        == "archived"
    )
    resp = api.post(f"/api/v1/models/{model_name}/aliases/staging", {"version": "1", "reason": "r"})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "version_archived"
    assert api.delete(f"/api/v1/models/{model_name}/versions/1").status_code == 204
    assert get_store().client.search_model_versions(f"name='{model_name}'") == []


def test_compare_shows_what_differs(api, model_name, logged_run):
    create_model(api, model_name)
    register(api, model_name, logged_run["source"])
    register(api, model_name, logged_run["source"])
    ModelVersion.objects.filter(model__name=model_name, version=2).update(
        metrics={"accuracy": 0.95, "f1": 0.91}
    )
    body = api.get(f"/api/v1/models/{model_name}/compare?versions=1,2").json()
    rows = {r["key"]: r for r in body["metrics"]}
    assert rows["accuracy"] == {"key": "accuracy", "values": [0.93, 0.95], "differs": True}
    assert rows["f1"]["differs"] is False
    assert all(not r["differs"] for r in body["signature"])
    assert api.get(f"/api/v1/models/{model_name}/compare?versions=1").status_code == 400
    assert api.get(f"/api/v1/models/{model_name}/compare?versions=1,9").status_code == 404


def test_model_list_searches_and_paginates_with_constant_queries(
    api, django_assert_max_num_queries, logged_run
):
    for i in range(6):
        create_model(
            api, f"search-{i}-{logged_run['run_id'][:6]}", tags={"team": "a" if i % 2 else "b"}
        )
    with django_assert_max_num_queries(6):
        body = api.get("/api/v1/models?search=search-&page_size=4").json()
    assert body["count"] == 6 and len(body["results"]) == 4 and body["next"]
    assert api.get("/api/v1/models?tag=team=a").json()["count"] == 3


def test_malformed_json_is_a_400(api):
    resp = api.post("/api/v1/models", "{not json", content_type="application/json")
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "parse_error"


def test_non_json_bodies_are_415(api):
    resp = api.post("/api/v1/models", "name=x", content_type="text/plain")
    assert resp.status_code == 415


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/api/v1/models/{m}", {"aliases": {"production": 1}}, ["aliases"]),
        ("/api/v1/models/{m}", {"description": "x", "nmae": "y"}, ["nmae"]),
        ("/api/v1/models/{m}/versions/1", {"status": "archived", "version": 7}, ["version"]),
    ],
)
def test_unknown_or_read_only_fields_in_a_patch_are_a_400_naming_them(
    api, model_name, model_zip, path, body, named
):
    api.post("/api/v1/models", {"name": model_name, "description": "before"})
    assert api.upload(f"/api/v1/models/{model_name}/versions", model_zip).status_code == 201
    audit_before = AuditEvent.objects.count()
    resp = api.patch(path.format(m=model_name), body)
    assert resp.status_code == 400, resp.content
    error = resp.json()["error"]
    assert error["code"] == "unknown_fields" and error["details"]["fields"] == named
    assert all(name in error["message"] for name in named)
    assert AuditEvent.objects.count() == audit_before
    model = api.get(f"/api/v1/models/{model_name}").json()
    assert model["description"] == "before" and not model["aliases"]
    assert api.get(f"/api/v1/models/{model_name}/versions/1").json()["status"] == "ready"
