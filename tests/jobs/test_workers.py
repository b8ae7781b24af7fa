"""Real worker processes: one SIGKILLed mid-job (another resumes from the checkpoint, no row
scored twice), and a running job cancelled through the API."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading

import pandas as pd
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from deployments.model_files import ensure_model_files
from deployments.runtimes import process
from jobs import services
from jobs.models import Job
from jobs.server import owner_label
from tests.faults.conftest import ROOT, process_env, wait_for
from tests.jobs.conftest import csv_bytes, expected_labels, features

pytestmark = pytest.mark.django_db(transaction=True)
LEASE = 3


def worker(job_id: int, log) -> subprocess.Popen:
    """``services.job_run`` in a process of its own, as the Celery task runs it."""
    code = (
        "import django; django.setup(); from jobs.services import job_run; "
        f"print('ended', job_run(job_id={job_id}), flush=True)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=process_env(CONTROLPLANE_JOB_LEASE_SECONDS=str(LEASE)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def submit(api, name: str, frame: pd.DataFrame, **fields) -> int:
    data = {
        "model": name,
        "version": "1",
        "input": SimpleUploadedFile("big.csv", csv_bytes(frame)),
        **fields,
    }
    resp = api.client.post("/api/v1/batch-jobs", data=data, headers=api.headers)
    assert resp.status_code == 202, resp.content
    return resp.json()["id"]


def job_servers(job_id: int) -> list[str]:
    return [
        p.labels.get("CONTROLPLANE_REVISION", "")
        for p in process.find_labelled(owner_label())
        if p.labels.get("CONTROLPLANE_DEPLOYMENT") == f"job-{job_id}"
    ]


def test_a_worker_killed_mid_job_is_resumed_from_its_checkpoint_without_scoring_a_row_twice(
    api, scoring_model, sklearn_model_dir, settings, tmp_path
):
    settings.CONTROLPLANE_JOB_LEASE_SECONDS = LEASE
    frame = features(3000, seed=4)
    job_id = submit(api, scoring_model, frame, keep_columns="id", chunk_rows="50")
    ensure_model_files(scoring_model, 1)  # the files are shared: the worker only starts a server
    with open(tmp_path / "worker-a.log", "w+") as log:
        first = worker(job_id, log)
        try:
            wait_for(
                lambda: Job.objects.get(pk=job_id).checkpoint.get("next_chunk", 0) >= 3,
                timeout=90,
                what="the first worker to checkpoint three chunks",
                interval=0.02,
                detail=lambda: (tmp_path / "worker-a.log").read_text()[-2000:],
            )
            os.kill(first.pid, signal.SIGKILL)
        finally:
            first.wait(10)
    killed_at = Job.objects.get(pk=job_id)
    assert killed_at.state == "running" and killed_at.attempts == 1
    done_before = killed_at.checkpoint["next_chunk"]
    assert done_before < 60, "the worker finished before it was killed"
    assert job_servers(job_id) == ["1"]  # its model server outlived it

    # Nobody renews the lease now; once it has run out the sweep hands the job on.
    wait_for(
        lambda: Job.objects.get(pk=job_id).lease_until < timezone.now(),
        timeout=LEASE + 5,
        what="the dead worker's lease to run out",
    )
    assert services.job_sweep()["resumed"] == 1
    assert services.job_run(job_id=job_id) == "succeeded"

    job = Job.objects.get(pk=job_id)
    assert job.attempts == 2
    assert job_servers(job_id) == []  # the stray of attempt 1 was stopped, attempt 2's too
    body = api.get(f"/api/v1/jobs/{job_id}").json()
    resp = api.client.get(body["output_url"], headers=api.headers)
    out = pd.read_csv(io.BytesIO(b"".join(resp.streaming_content)))
    assert len(out) == 3000
    assert out["id"].is_unique and list(out["id"]) == list(frame["id"])
    assert list(out["prediction"]) == expected_labels(sklearn_model_dir, frame)
    logs = [line["message"] for line in body["logs"]]
    assert any(m.startswith(f"resuming at chunk {done_before + 1}") for m in logs), logs


def test_a_running_job_is_cancelled_through_the_api(api, scoring_model):
    # Enough chunks that the job is still running when the cancel lands, on a loaded machine
    # too (3,000 rows were sometimes all scored between the poll and the cancel's POST).
    job_id = submit(api, scoring_model, features(30000, seed=5), chunk_rows="50")
    ended = []
    runner = threading.Thread(target=lambda: ended.append(services.job_run(job_id=job_id)))
    runner.start()  # the runner as a worker runs it, on its own connection
    try:
        wait_for(
            lambda: Job.objects.get(pk=job_id).progress_done >= 100,
            timeout=90,
            what="the runner to score two chunks",
            interval=0.02,
        )
        resp = api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 202, resp.content
        assert resp.json()["cancel_requested"] is True
    finally:
        runner.join(60)
    assert ended == ["cancelled"]
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled"
    assert 100 <= job["progress"]["done"] < 30000
    assert job["output_url"] is None
    assert job_servers(job_id) == []
    assert api.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 409


def test_a_queued_job_is_cancelled_at_once(api, scoring_model):
    job_id = submit(api, scoring_model, features(5))
    resp = api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 202 and resp.json()["state"] == "cancelled"
    assert services.job_run(job_id=job_id) is None  # a late delivery does nothing
    assert Job.objects.get(pk=job_id).attempts == 0
