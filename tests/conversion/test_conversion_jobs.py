"""Conversion jobs through the jobs framework, with real processes: a Keras model converted
through the API; a running conversion cancelled (its subprocess stopped, nothing registered);
a cancel at the commit point (before it: nothing registered; after it: refused, the version
registered); a worker SIGKILLed mid-conversion (the conversion process it orphaned is
stopped, the next worker resumes the job and registers one version)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from django.utils import timezone

from audit.models import AuditEvent
from deployments.runtimes import process
from jobs import services
from jobs.models import Job, JobLog
from jobs.server import owner_label
from registry import conversion
from registry.conversion import runner
from registry.models import ModelVersion
from tests.conftest import zip_dir
from tests.faults.conftest import ROOT, process_env, wait_for
from tests.support import run_job_in_thread

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    # a loaded 2-core machine takes minutes to import TensorFlow in a fresh environment
    pytest.mark.timeout(900),
]
LEASE = 3


def upload(api, model_dir: Path) -> str:
    name = f"convjob-{uuid.uuid4().hex[:10]}"
    assert api.post("/api/v1/models", {"name": name}).status_code == 201
    resp = api.upload(f"/api/v1/models/{name}/versions", zip_dir(Path(model_dir)))
    assert resp.status_code == 201, resp.content
    return name


def convert(api, name: str, **body) -> int:
    resp = api.post(f"/api/v1/models/{name}/versions/1/convert", {"target": "onnx", **body})
    assert resp.status_code == 202, resp.content
    assert resp.json()["kind"] == "convert"
    return resp.json()["id"]


def conversion_processes(job_id: int) -> list[process.ProcInfo]:
    """The live conversion processes of the job (its worker's child, or an orphan of it)."""
    found = []
    for proc in process.find_labelled(owner_label()):
        if proc.labels.get("CONTROLPLANE_DEPLOYMENT") != f"job-{job_id}":
            continue
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        except OSError:
            continue
        if runner.WORKER.name.encode() in cmdline:
            found.append(proc)
    return found


def gone(proc: process.ProcInfo) -> bool:
    info = process.inspect(f"{proc.pid}:{proc.starttime}")
    return info is None or not info.alive


def versions(name: str) -> int:
    return ModelVersion.objects.filter(model__name=name).count()


def test_a_keras_model_converts_through_the_api_to_a_verified_onnx_version(framework_model, api):
    trained = framework_model("tensorflow")  # keras.Sequential saved with mlflow.tensorflow
    name = upload(api, trained.model_dir)
    job_id = convert(api, name)

    started = time.monotonic()
    assert services.job_run(job_id=job_id) == "succeeded", Job.objects.get(pk=job_id).error
    seconds = time.monotonic() - started

    job = api.get(f"/api/v1/jobs/{job_id}").json()
    print(
        f"\n[keras] conversion job: {seconds:.1f} s; "
        + " | ".join(line["message"] for line in job["logs"])
    )
    assert job["state"] == "succeeded" and job["error"] in ("", None)
    result = job["result"]
    assert result["version"] == "2"
    assert result["converter"].startswith("tf2onnx ")
    verification = result["verification"]
    assert verification["passed"] is True and verification["kind"] == "tensor"
    assert verification["max_abs_error"] < 1e-4
    assert verification["argmax_agreement"] == 1.0
    assert result["benchmark"]["converted"]["latency_p50_ms_1_row"] > 0
    assert result["benchmark"]["original"]["rows_per_second_1000_rows"] > 0

    new = ModelVersion.objects.get(model__name=name, version=2)
    assert "onnx" in new.flavors
    lineage = conversion.lineage(new)
    assert lineage["source_version"] == "1"
    assert lineage["flavor"] == "tensorflow"
    assert lineage["converter"] == result["converter"]
    assert lineage["job"] == str(job_id)
    assert lineage["verification"]["max_abs_error"] == pytest.approx(
        verification["max_abs_error"], abs=1e-8
    )
    assert AuditEvent.objects.filter(action="version.convert", object_id=f"{name}/2").exists()
    # The registered file, run here, answers what Keras answered in its own venv.
    import onnxruntime

    from deployments.model_files import ensure_model_files

    model_dir, _ = ensure_model_files(name, 2)
    session = onnxruntime.InferenceSession(str(Path(model_dir) / "model.onnx"))
    assert [o.name for o in session.get_outputs()] == ["output"]
    (out,) = session.run(None, {"input": np.asarray(trained.rows, dtype=np.float32)})
    np.testing.assert_allclose(out, np.asarray(trained.expected["predict"]["value"]), atol=1e-5)


def test_a_model_of_mlflows_keras_flavor_converts_too(keras_flavor_model, api):
    model_dir, rows, expected = keras_flavor_model
    name = upload(api, model_dir)
    job_id = convert(api, name)
    assert services.job_run(job_id=job_id) == "succeeded", Job.objects.get(pk=job_id).error

    result = api.get(f"/api/v1/jobs/{job_id}").json()["result"]
    assert result["version"] == "2" and result["verification"]["passed"] is True
    new = ModelVersion.objects.get(model__name=name, version=2)
    assert conversion.lineage(new)["flavor"] == "keras"
    import onnxruntime

    from deployments.model_files import ensure_model_files

    onnx_dir, _ = ensure_model_files(name, 2)
    session = onnxruntime.InferenceSession(str(Path(onnx_dir) / "model.onnx"))
    (out,) = session.run(None, {"input": np.asarray(rows, dtype=np.float32)})
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-5)


def test_cancelling_a_running_conversion_stops_its_process_and_registers_nothing(
    sklearn_models, api
):
    name = upload(api, sklearn_models["forest"][0])
    job_id = convert(api, name)
    worker, ended = run_job_in_thread(job_id)
    try:
        (proc,) = wait_for(
            lambda: conversion_processes(job_id),
            timeout=600,  # the first run of a session may build the environment
            what="the conversion process to start",
            interval=0.05,
            detail=lambda: str(Job.objects.get(pk=job_id).error),
        )
        resp = api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 202, resp.content
        assert resp.json()["cancel_requested"] is True
    finally:
        worker.join(120)
    assert ended == ["cancelled"]
    assert gone(proc), "the conversion process outlived the cancel"
    assert conversion_processes(job_id) == []
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "cancelled" and job["result"] is None
    assert versions(name) == 1  # nothing registered
    actions = set(
        AuditEvent.objects.filter(object_type="job", object_id=str(job_id)).values_list(
            "action", flat=True
        )
    )
    assert {"job.submit", "job.start", "job.cancel_requested", "job.cancelled"} <= actions


def test_a_cancel_just_before_the_commit_point_registers_nothing(sklearn_models, api, monkeypatch):
    """Converted and verified, the job is about to register when the cancel lands: the cancel
    wins, whether or not the handler's poll of the cancel flag has seen it yet (here: never,
    polled at most once an hour), because the commit point decides on the row itself."""
    from jobs import context

    monkeypatch.setattr(context, "CANCEL_POLL_SECONDS", 3600.0)
    about_to_commit, release = threading.Event(), threading.Event()
    lookup = conversion._already_registered

    def held(mv, job_id):  # the conversion's last step before its commit point
        found = lookup(mv, job_id)
        about_to_commit.set()
        assert release.wait(120)
        return found

    monkeypatch.setattr(conversion, "_already_registered", held)
    name = upload(api, sklearn_models["forest"][0])
    job_id = convert(api, name)
    worker, ended = run_job_in_thread(job_id)
    try:
        assert about_to_commit.wait(600), Job.objects.get(pk=job_id).error
        resp = api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 202, resp.content
    finally:
        release.set()
        worker.join(120)
    assert ended == ["cancelled"]
    job = Job.objects.get(pk=job_id)
    assert job.state == "cancelled" and job.committed_at is None
    assert versions(name) == 1  # nothing registered
    actions = AuditEvent.objects.filter(object_type="job", object_id=str(job_id))
    assert not actions.filter(action="job.commit").exists()


def test_a_cancel_during_the_registration_is_refused_and_the_version_is_registered(
    sklearn_models, api, monkeypatch
):
    """Past the commit point the registration is under way: the cancel is 409
    ``job_committed``, changes nothing, and the job succeeds with the version registered
    (before the commit point: it ended ``cancelled`` with the version registered anyway)."""
    from registry import services as registry_services

    registering, release = threading.Event(), threading.Event()
    register = registry_services.model_version_register_converted

    def held(**kwargs):
        registering.set()
        assert release.wait(120)
        return register(**kwargs)

    monkeypatch.setattr(registry_services, "model_version_register_converted", held)
    name = upload(api, sklearn_models["forest"][0])
    job_id = convert(api, name)
    worker, ended = run_job_in_thread(job_id)
    try:
        assert registering.wait(600), Job.objects.get(pk=job_id).error
        resp = api.post(f"/api/v1/jobs/{job_id}/cancel")
        assert resp.status_code == 409, resp.content
        assert resp.json()["error"]["code"] == "job_committed"
        assert not Job.objects.get(pk=job_id).cancel_requested
    finally:
        release.set()
        worker.join(120)
    assert ended == ["succeeded"], Job.objects.get(pk=job_id).error
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["result"]["version"] == "2"
    assert job["committed_at"] is not None
    assert versions(name) == 2
    actions = list(
        AuditEvent.objects.filter(object_type="job", object_id=str(job_id))
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["job.submit", "job.start", "job.commit", "job.succeeded"]


class WorkerDied(BaseException):
    """Raised in the worker's thread to stand for its death: job_run ends without finishing
    the job (no handler of it catches a BaseException), which keeps its lease until it runs
    out, as a SIGKILLed worker's job does."""


def test_a_job_whose_worker_died_while_registering_cannot_be_cancelled_and_registers_once(
    sklearn_models, api, monkeypatch
):
    from registry import services as registry_services

    register = registry_services.model_version_register_converted
    calls: list[int] = []

    def dies_first_time(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise WorkerDied()
        return register(**kwargs)

    monkeypatch.setattr(registry_services, "model_version_register_converted", dies_first_time)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is expected
    name = upload(api, sklearn_models["forest"][0])
    job_id = convert(api, name)
    worker, ended = run_job_in_thread(job_id)
    worker.join(600)
    assert ended == [] and calls == [1]
    died = Job.objects.get(pk=job_id)
    assert died.state == "running" and died.committed_at is not None and versions(name) == 1
    Job.objects.filter(pk=job_id).update(lease_until=timezone.now())  # it ran out

    resp = api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_committed"
    assert services.job_sweep() == {"resumed": 1, "requeued": 0, "cancelled": 0, "failed": 0}
    assert services.job_run(job_id=job_id) == "succeeded", Job.objects.get(pk=job_id).error
    job = Job.objects.get(pk=job_id)
    assert job.attempts == 2 and job.result["version"] == "2" and versions(name) == 2
    assert conversion.lineage(ModelVersion.objects.get(model__name=name, version=2))["job"] == (
        str(job_id)
    )


def test_a_cancel_while_the_environment_is_compiled_stops_the_compile(
    sklearn_models, api, monkeypatch, tmp_path
):
    monkeypatch.setattr(runner, "ENVIRONMENT_ROOT", tmp_path / "envs")  # built anew (uv's cache)
    name = upload(api, sklearn_models["forest"][0])
    job_id = convert(api, name)
    worker, ended = run_job_in_thread(job_id)
    try:
        wait_for(
            lambda: JobLog.objects.filter(job_id=job_id, message__contains=" built in "),
            timeout=600,
            what="the environment to be built",
            interval=0.05,
        )
        assert api.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
        cancelled_at = time.monotonic()
    finally:
        worker.join(120)
    assert ended == ["cancelled"]
    assert time.monotonic() - cancelled_at < 5  # not the compile's 15-30 s
    (env,) = (tmp_path / "envs").glob("[0-9a-f]*")
    assert not (env / runner.COMPILED_MARKER).exists()  # compiled at the next conversion
    # the conversion's own compile (the builder's low-priority background one is the builder's)
    site = str(env / "lib").encode()
    ours = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and site in _cmdline(int(pid))
        and b"-m\x00compileall" in _cmdline(int(pid))
    ]
    assert not ours, "the compile outlived the cancel"
    assert conversion_processes(job_id) == [] and versions(name) == 1


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def worker_process(job_id: int, log, environments: Path) -> subprocess.Popen:
    """``services.job_run`` in a process of its own, as the Celery task runs it (with the
    session's cached conversion environments)."""
    code = (
        "import django; django.setup(); from pathlib import Path; "
        "from registry.conversion import runner; "
        f"runner.ENVIRONMENT_ROOT = Path({str(environments)!r}); "
        "from jobs.services import job_run; "
        f"print('ended', job_run(job_id={job_id}), flush=True)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=process_env(CONTROLPLANE_JOB_LEASE_SECONDS=str(LEASE)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_a_worker_killed_mid_conversion_takes_its_conversion_along_and_the_job_resumes(
    sklearn_models, api, settings, conversion_environments, tmp_path
):
    settings.CONTROLPLANE_JOB_LEASE_SECONDS = LEASE
    name = upload(api, sklearn_models["forest"][0])
    job_id = convert(api, name)
    log_path = tmp_path / "worker-a.log"
    with open(log_path, "w+") as log:
        first = worker_process(job_id, log, conversion_environments)
        try:
            wait_for(  # the script's first line: it runs (past its start-up) in the sandbox
                lambda: JobLog.objects.filter(job_id=job_id, message__contains="loading the"),
                timeout=600,  # the first run of a session may build the environment
                what="the first worker's conversion process to start",
                interval=0.05,
                detail=lambda: log_path.read_text()[-2000:],
            )
            (orphan,) = conversion_processes(job_id)
            os.kill(first.pid, signal.SIGKILL)
        finally:
            first.wait(10)
    killed_at = Job.objects.get(pk=job_id)
    assert killed_at.state == "running" and killed_at.attempts == 1
    # The kernel kills the conversion with its worker (in a session of its own, it would run
    # on, orphaned, until its next write to the dead worker's pipe; or, writing nothing, to
    # its end, into the workdir the next attempt uses).
    wait_for(lambda: gone(orphan), timeout=1, what="the orphaned conversion to be killed")

    wait_for(
        lambda: Job.objects.get(pk=job_id).lease_until < timezone.now(),
        timeout=LEASE + 5,
        what="the dead worker's lease to run out",
    )
    assert services.job_sweep()["resumed"] == 1  # handed to the next worker
    assert services.job_run(job_id=job_id) == "succeeded", Job.objects.get(pk=job_id).error
    assert conversion_processes(job_id) == []

    job = Job.objects.get(pk=job_id)
    assert job.attempts == 2
    assert job.result["version"] == "2"
    assert versions(name) == 2  # one conversion registered, once
    logs = [line["message"] for line in api.get(f"/api/v1/jobs/{job_id}").json()["logs"]]
    assert "resumed by another worker (attempt 2)" in logs
    new = ModelVersion.objects.get(model__name=name, version=2)
    assert conversion.lineage(new)["job"] == str(job_id)


def test_a_resumed_conversion_first_stops_what_an_earlier_attempt_left_running(sklearn_models, api):
    """Where the kernel could not take a conversion along with its worker (no
    PR_SET_PDEATHSIG), its labels still name it: the next attempt stops it before it starts."""
    name = upload(api, sklearn_models["forest"][0])
    job_id = convert(api, name)
    # A worker took the job and died (its lease ran out), leaving its labelled process.
    Job.objects.filter(pk=job_id).update(
        state="running", attempts=1, lease_owner="dead", lease_until=timezone.now()
    )
    labels = {
        "CONTROLPLANE_OWNER": owner_label(),
        "CONTROLPLANE_DEPLOYMENT": f"job-{job_id}",
        "CONTROLPLANE_REVISION": "1",
    }
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", runner.WORKER.name],
        env={"PATH": os.environ["PATH"], **labels},
        start_new_session=True,
    )
    try:
        (left,) = wait_for(lambda: conversion_processes(job_id), timeout=10, what="the stand-in")
        assert services.job_run(job_id=job_id) == "succeeded", Job.objects.get(pk=job_id).error
        assert stand_in.wait(5) is not None and gone(left)
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
            stand_in.wait()
    logs = [line["message"] for line in api.get(f"/api/v1/jobs/{job_id}").json()["logs"]]
    assert "stopped 1 process(es) of the earlier attempt" in logs
    assert Job.objects.get(pk=job_id).attempts == 2 and versions(name) == 2
