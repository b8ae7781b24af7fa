"""The jobs API contract: shapes, 4xx on bad input with nothing created, who sees what."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from audit.models import AuditEvent
from jobs import services
from jobs.models import Job
from tests.conftest import with_roles
from tests.jobs.conftest import csv_bytes, features

pytestmark = pytest.mark.django_db


def post_batch(api, **fields):
    return api.client.post("/api/v1/batch-jobs", data=fields, headers=api.headers)


def upload(payload: bytes, name: str = "in.csv") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, payload)


def staged_files() -> list[Path]:
    """Uploads received but not (yet) moved into a job's directory."""
    root = Path(settings.CONTROLPLANE_JOBS_DIR) / ".staging"
    return [p for p in root.iterdir()] if root.exists() else []


def assert_refused(resp, status: int, code: str | None = None) -> None:
    assert resp.status_code == status, resp.content
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    assert Job.objects.count() == 0
    assert not AuditEvent.objects.filter(object_type="job").exists()


def test_a_batch_job_answers_202_with_the_contract_shape(api, scoring_model):
    resp = post_batch(
        api,
        model=scoring_model,
        version="1",
        input=upload(csv_bytes(features(4))),
        keep_columns="id",
    )
    assert resp.status_code == 202, resp.content
    job = resp.json()
    for key in ("id", "kind", "state", "progress", "error", "result", "output_url"):
        assert key in job
    assert job["kind"] == "batch" and job["state"] == "queued" and job["error"] == ""
    assert job["progress"]["done"] == 0 and job["progress"]["total"] is None
    assert job["input"]["keep_columns"] == ["id"] and job["input"]["version"] == 1
    assert "files" not in job["input"] and "signature" not in job["input"]
    same = api.get(f"/api/v1/jobs/{job['id']}").json()
    assert same["id"] == job["id"] and same["state"] == "queued"
    listed = api.get("/api/v1/jobs").json()
    assert [j["id"] for j in listed["results"]] == [job["id"]]
    event = AuditEvent.objects.get(object_type="job", action="job.submit")
    assert event.actor.username == "alice" and event.after["state"] == "queued"


def test_an_alias_is_resolved_to_its_version_at_submit(api, scoring_model):
    assert api.post(
        f"/api/v1/models/{scoring_model}/aliases/champion", {"version": "1", "reason": "test"}
    ).status_code in (
        200,
        201,
    )
    resp = post_batch(
        api, model=scoring_model, alias="champion", input=upload(csv_bytes(features(3)))
    )
    assert resp.status_code == 202, resp.content
    assert resp.json()["input"]["version"] == 1 and resp.json()["input"]["alias"] == "champion"


BAD_BATCH = [
    ({}, 400, "invalid_input"),
    ({"alias": "champion"}, 400, "invalid_target"),  # both version and alias
    ({"format": "xlsx"}, 400, "invalid"),
    ({"on_error": "ignore"}, 400, "invalid"),
    ({"chunk_rows": "0"}, 400, "invalid"),
    ({"chunk_rows": "999999999"}, 400, "invalid_chunk_rows"),
    ({"keep_columns": "id,nope"}, 400, "invalid_keep_columns"),
    ({"input_uri": "file:///etc/passwd"}, 400, "invalid_input_uri"),
]


def test_bad_batch_input_is_a_4xx_and_creates_nothing(api, scoring_model):
    for fields, status, code in BAD_BATCH:
        data = {"model": scoring_model, "version": "1", **fields}
        if "input_uri" not in fields and fields != {}:
            data["input"] = upload(csv_bytes(features(3)))
        assert_refused(post_batch(api, **data), status, code)
    assert staged_files() == []


def test_a_bad_input_uri_scheme_is_refused_as_json(api, scoring_model):
    resp = api.post(
        "/api/v1/batch-jobs",
        {"model": scoring_model, "version": "1", "input_uri": "file:///etc/passwd"},
    )
    assert_refused(resp, 400, "invalid_input_uri")


def test_unreadable_files_and_missing_features_are_refused(api, scoring_model):
    garbage = b"PAR1 this is not parquet"
    assert_refused(
        post_batch(api, model=scoring_model, version="1", input=upload(garbage, "x.parquet")),
        400,
        "invalid_input",
    )
    no_f5 = features(3).drop(columns=["f5"])
    resp = post_batch(api, model=scoring_model, version="1", input=upload(csv_bytes(no_f5)))
    assert_refused(resp, 400, "invalid_input")
    assert "f5" in resp.json()["error"]["message"]
    assert_refused(
        post_batch(api, model="no-such-model", version="1", input=upload(csv_bytes(features(2)))),
        404,
    )
    assert_refused(
        post_batch(api, model=scoring_model, version="7", input=upload(csv_bytes(features(2)))),
        404,
    )
    assert staged_files() == []


def test_the_upload_size_and_row_limits_are_413(api, scoring_model, settings):
    payload = csv_bytes(features(20))
    settings.CONTROLPLANE_BATCH_MAX_ROWS = 10
    assert_refused(
        post_batch(api, model=scoring_model, version="1", input=upload(payload)),
        413,
        "too_many_rows",
    )
    settings.CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES = len(payload) - 1
    assert_refused(
        post_batch(api, model=scoring_model, version="1", input=upload(payload)),
        413,
        "payload_too_large",
    )
    assert staged_files() == []


def test_a_json_batch_job_with_an_artifact_uri_fails_clearly_when_it_cannot_be_fetched(
    api, scoring_model
):
    resp = api.post(
        "/api/v1/jobs",
        {
            "kind": "batch",
            "input": {
                "model": scoring_model,
                "version": "1",
                "input_uri": "runs:/0123456789abcdef0123456789abcdef/data/in.csv",
            },
        },
    )
    assert resp.status_code == 202, resp.content
    job_id = resp.json()["id"]
    assert services.job_run(job_id=job_id) == "failed"
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["error"].startswith("cannot download runs:/0123456789abcdef"), job["error"]


def test_the_generic_submit_refuses_what_it_cannot_run(api, scoring_model):
    assert_refused(api.post("/api/v1/jobs", {"kind": "train", "input": {}}), 400)
    assert_refused(
        api.post(
            "/api/v1/jobs", {"kind": "batch", "input": {"model": scoring_model, "version": "1"}}
        ),
        400,
        "invalid_input",
    )


def test_convert_answers_202_with_a_convert_job(api, scoring_model):
    url = f"/api/v1/models/{scoring_model}/versions/1/convert"
    resp = api.post(url, {"target": "onnx", "quantize": None, "opset": None})
    assert resp.status_code == 202, resp.content
    job = resp.json()
    assert job["kind"] == "convert" and job["state"] == "queued"
    assert job["input"] == {
        "model": scoring_model,
        "version": 1,
        "target": "onnx",
        "quantize": None,
        "opset": None,
    }
    if importlib.util.find_spec("registry.conversion") is None:
        # The engine is another module (registry/conversion); without it the job says so.
        assert services.job_run(job_id=job["id"]) == "failed"
        error = api.get(f"/api/v1/jobs/{job['id']}").json()["error"]
        assert "job kind 'convert' is not available" in error and "registry.conversion" in error


def test_bad_convert_requests_are_400(api, scoring_model):
    url = f"/api/v1/models/{scoring_model}/versions/1/convert"
    for body in ({"target": "tflite"}, {"quantize": "int4"}, {"opset": 3}, {"opset": "x"}):
        assert_refused(api.post(url, body), 400)


def test_converting_an_unknown_version_is_404(api, scoring_model):
    assert_refused(api.post(f"/api/v1/models/{scoring_model}/versions/9/convert", {}), 404)


def test_batch_needs_deploy_and_convert_needs_registry_write(
    api_as, scoring_model, django_user_model
):
    developer = with_roles(
        django_user_model.objects.create_user("md", password="pw-x-12345"), "model-developer"
    )
    deployer = with_roles(
        django_user_model.objects.create_user("dp", password="pw-x-12345"), "deployer"
    )
    as_developer, as_deployer = api_as(developer), api_as(deployer)
    resp = post_batch(
        as_developer, model=scoring_model, version="1", input=upload(csv_bytes(features(2)))
    )
    assert_refused(resp, 403)
    resp = as_deployer.post(f"/api/v1/models/{scoring_model}/versions/1/convert", {})
    assert_refused(resp, 403)
    resp = as_deployer.post(
        "/api/v1/jobs", {"kind": "convert", "input": {"model": scoring_model, "version": "1"}}
    )
    assert_refused(resp, 403)
    assert (
        as_developer.post(f"/api/v1/models/{scoring_model}/versions/1/convert", {}).status_code
        == 202
    )


def test_owners_see_their_jobs_and_admins_every_job(
    api, api_as, scoring_model, other_user, role_admin, django_assert_num_queries
):
    mine = post_batch(api, model=scoring_model, version="1", input=upload(csv_bytes(features(2))))
    job_id = mine.json()["id"]
    for _ in range(3):
        post_batch(api, model=scoring_model, version="1", input=upload(csv_bytes(features(2))))
    other = api_as(other_user)
    assert other.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert other.get("/api/v1/jobs").json()["results"] == []
    assert other.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 404
    admin = api_as(role_admin)
    assert admin.get(f"/api/v1/jobs/{job_id}").status_code == 200
    with django_assert_num_queries(5):  # auth (token, user, rights) + count + page, any rows
        listed = admin.get("/api/v1/jobs").json()
    assert len(listed["results"]) == 4
    resp = admin.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202 and resp.json()["state"] == "cancelled"
    event = AuditEvent.objects.filter(object_type="job", action="job.cancel").get()
    assert event.actor.username == role_admin.username
