"""Batch scoring end to end: real model servers in the model's environment, real files."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from audit.models import AuditEvent
from jobs import services
from jobs.models import Job
from tests.jobs.conftest import csv_bytes, expected_labels, features, parquet_bytes

# Committed rows: the runner's heartbeat writes from its own thread and connection.
pytestmark = pytest.mark.django_db(transaction=True)


def submit(api, name: str, payload: bytes, filename: str = "input.csv", **fields):
    data = {"model": name, "input": SimpleUploadedFile(filename, payload), **fields}
    return api.client.post("/api/v1/batch-jobs", data=data, headers=api.headers)


def download(api, url: str) -> bytes:
    resp = api.client.get(url, headers=api.headers)
    assert resp.status_code == 200, resp.content
    return b"".join(resp.streaming_content)


def test_a_csv_is_scored_in_chunks_keeping_the_id_column(api, scoring_model, sklearn_model_dir):
    frame = features(25)
    resp = submit(
        api, scoring_model, csv_bytes(frame), version="1", keep_columns="id", chunk_rows="10"
    )
    assert resp.status_code == 202, resp.content
    body = resp.json()
    assert body["kind"] == "batch" and body["state"] == "queued"
    assert body["progress"]["done"] == 0 and body["output_url"] is None

    assert services.job_run(job_id=body["id"]) == "succeeded"

    job = api.get(f"/api/v1/jobs/{body['id']}").json()
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"]["done"] == 25 and job["progress"]["total"] == 25
    assert job["result"]["rows"] == 25 and job["result"]["errors"] == 0
    assert job["result"]["rows_per_second"] > 0
    out = pd.read_csv(io.BytesIO(download(api, job["output_url"])))
    assert list(out.columns) == ["id", "prediction"]
    assert list(out["id"]) == list(frame["id"])
    assert list(out["prediction"]) == expected_labels(sklearn_model_dir, frame)
    actions = list(
        AuditEvent.objects.filter(object_type="job", object_id=str(body["id"]))
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["job.submit", "job.start", "job.succeeded"]


def test_parquet_in_and_out_with_skipped_bad_rows_in_an_errors_file(
    api, scoring_model, sklearn_model_dir
):
    frame = features(30, seed=2)
    frame.loc[6, "f3"] = None  # row 7: the model refuses a missing value
    frame.loc[21, "f0"] = None  # row 22
    resp = submit(
        api,
        scoring_model,
        parquet_bytes(frame),
        filename="input.parquet",
        alias="",
        version="1",
        keep_columns='["id", "f1"]',
        format="parquet",
        chunk_rows="8",
        on_error="skip",
    )
    assert resp.status_code == 202, resp.content
    job_id = resp.json()["id"]
    assert services.job_run(job_id=job_id) == "succeeded", Job.objects.get(pk=job_id).error
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["result"]["scored"] == 28 and job["result"]["errors"] == 2
    out = pd.read_parquet(io.BytesIO(download(api, job["output_url"])))
    assert list(out.columns) == ["id", "f1", "prediction"]
    good = frame.drop(index=[6, 21])
    assert list(out["id"]) == list(good["id"])
    assert list(out["prediction"]) == expected_labels(sklearn_model_dir, good)
    errors = pd.read_csv(io.BytesIO(download(api, job["files"]["errors"])))
    assert list(errors["row"]) == [7, 22]
    assert list(errors["id"]) == ["row-7", "row-22"]
    assert errors["error"].str.len().min() > 0


def test_a_bad_row_fails_the_job_with_its_row_number(api, scoring_model):
    frame = features(40, seed=3)
    frame.loc[32, "f5"] = None  # row 33
    resp = submit(api, scoring_model, csv_bytes(frame), version="1", chunk_rows="16")
    assert resp.status_code == 202, resp.content
    job_id = resp.json()["id"]
    assert services.job_run(job_id=job_id) == "failed"
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "failed"
    assert job["error"].startswith("row 33: "), job["error"]
    assert job["output_url"] is None and job["result"] is None
    assert api.get(f"/api/v1/jobs/{job_id}/files/output").status_code == 404
