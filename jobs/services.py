"""Writes for jobs: submit, cancel, run (the worker's side), sweep, delete.

Every state change is a compare-and-swap on the job row and is audited in its transaction.
A running job holds a lease its worker renews from a heartbeat thread; a worker that dies
stops renewing, and the sweep (or a duplicate delivery) hands the job to another worker,
which resumes the kind's handler from the job's last checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from accounts.permissions import Right, require, user_can
from audit.services import audit_record
from controlplane.lib.errors import ApplicationError, Conflict, Forbidden

from . import context as ctxmod
from .errors import JobCancelled, JobFailed, LeaseLost
from .kinds import KINDS, KindUnavailable, handler_for
from .models import Job

logger = logging.getLogger(__name__)

# The right submitting each kind needs (least privilege): a batch job runs the model's code
# on the control plane's machines, as a deployment does; a conversion registers a version.
KIND_RIGHTS: dict[str, Right] = {"batch": Right.DEPLOY, "convert": Right.REGISTRY_WRITE}
# A job queued this long without a worker taking it (its message lost) is enqueued again.
REQUEUE_AFTER_SECONDS = 30


def _snapshot(job: Job) -> dict[str, Any]:
    return {"state": job.state, "kind": job.kind, "attempts": job.attempts}


def _audit(job: Job, action: str, *, actor: Any = None, before: Any = None, after: Any = None):
    audit_record(
        actor=actor,
        action=action,
        object_type="job",
        object_id=job.pk,
        object_repr=str(job),
        before=before,
        after=after,
        system="jobs",
    )


def _enqueue(job_id: int) -> None:
    from controlplane.lib.tasks import send_on_commit

    send_on_commit("jobs.tasks.job_run", job_id)


# --- submit --------------------------------------------------------------------------------


def job_submit(
    *,
    kind: str,
    input: dict,
    actor: Any,
    files: dict[str, Path] | None = None,
) -> Job:
    """Create a queued job of ``kind`` and enqueue it once committed.

    ``files`` (name -> a staged file) are moved into the job's input directory and their
    paths recorded in ``input["files"]``. Kind-specific validation happens before (the
    kind's own submit service); this checks the kind and the submitter's right."""
    if kind not in KINDS:
        raise ApplicationError(
            f"unknown job kind {kind!r}; kinds: {', '.join(sorted(KINDS))}", code="invalid_kind"
        )
    require(actor, KIND_RIGHTS[kind], f"submitting a {kind} job needs {KIND_RIGHTS[kind]}")
    created: list[int] = []
    try:
        return _create(kind=kind, input=input, actor=actor, files=files, created=created)
    except BaseException:
        for job_id in created:  # rolled back: its moved input goes too
            ctxmod.remove_job_dir(job_id)
        raise


def _create(*, kind, input, actor, files, created: list[int]) -> Job:
    with transaction.atomic():
        job = Job.objects.create(kind=kind, input=dict(input), owner=actor)
        created.append(job.pk)
        if files:
            target = ctxmod.job_dir(job.pk) / "input"
            target.mkdir(parents=True, exist_ok=True, mode=0o700)
            placed = {}
            for name, staged in files.items():
                dest = target / name
                shutil.move(str(staged), dest)
                placed[name] = str(dest)
            job.input = {**job.input, "files": placed}
            job.save(update_fields=["input"])
        _audit(job, "job.submit", actor=actor, after={**_snapshot(job), "input": _public(job)})
        _enqueue(job.pk)
    return job


def _public(job: Job) -> dict:
    """The input as the audit log shows it: without host paths."""
    return {k: v for k, v in job.input.items() if k != "files"}


# --- the kinds' submit services -----------------------------------------------------------


def _resolve_version(model_name: str, version: Any, alias: str | None):
    from registry.models import Alias
    from registry.selectors import model_version_get, registered_model_get

    model = registered_model_get(name=model_name)
    if (version in (None, "")) == (not alias):
        raise ApplicationError("give exactly one of 'version' or 'alias'", code="invalid_target")
    if alias:
        pointer = Alias.objects.select_related("version").filter(model=model, name=alias).first()
        if pointer is None:
            raise ApplicationError(
                f"{model.name!r} has no alias {alias!r}", code="alias_not_found", status_code=404
            )
        return pointer.version
    return model_version_get(model=model, version=version)


def batch_job_submit(
    *,
    actor: Any,
    model: str,
    version: Any = None,
    alias: str | None = None,
    upload: Path | None = None,
    upload_name: str = "",
    input_uri: str | None = None,
    keep_columns: list[str] | None = None,
    format: str = "csv",
    chunk_rows: int | None = None,
    on_error: str = "fail",
) -> Job:
    """Validate a batch-scoring request completely, then submit it. ``upload`` is a staged
    file (moved into the job's directory); bad input raises before anything is created."""
    from . import batch

    require(actor, KIND_RIGHTS["batch"], "submitting a batch job needs the deploy right")
    if (upload is None) == (not input_uri):
        raise ApplicationError(
            "give exactly one of 'input' (a file) or 'input_uri'", code="invalid_input"
        )
    if format not in batch.FORMATS:
        raise ApplicationError("format must be csv or parquet", code="invalid_format")
    if on_error not in ("fail", "skip"):
        raise ApplicationError("on_error must be fail or skip", code="invalid_on_error")
    limit = settings.CONTROLPLANE_BATCH_MAX_CHUNK_ROWS
    chunk_rows = batch.DEFAULT_CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    chunk_rows = min(chunk_rows, limit) if chunk_rows == batch.DEFAULT_CHUNK_ROWS else chunk_rows
    if not 1 <= chunk_rows <= limit:
        raise ApplicationError(
            f"chunk_rows must be between 1 and {limit} (CONTROLPLANE_BATCH_MAX_CHUNK_ROWS)",
            code="invalid_chunk_rows",
        )
    keep = list(dict.fromkeys(keep_columns or []))
    mv = _resolve_version(model, version, alias)
    if mv.status != "ready":
        raise Conflict(
            f"version {mv.version} of {model!r} is {mv.status}", code="version_not_ready"
        )
    input_format = None
    if upload is not None:
        size = upload.stat().st_size
        if size > settings.CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES:
            raise ApplicationError(
                f"the input is larger than {settings.CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES} bytes "
                "(CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES)",
                code="payload_too_large",
                status_code=413,
            )
        input_format = batch.sniff_format(upload, upload_name)
        try:
            table = batch.read_table(upload, input_format)
        except ValueError as exc:
            raise ApplicationError(str(exc), code="invalid_input") from None
        if table.num_rows > settings.CONTROLPLANE_BATCH_MAX_ROWS:
            raise ApplicationError(
                f"the input has {table.num_rows} rows; at most "
                f"{settings.CONTROLPLANE_BATCH_MAX_ROWS} (CONTROLPLANE_BATCH_MAX_ROWS)",
                code="too_many_rows",
                status_code=413,
            )
        missing = [c for c in keep if c not in table.column_names]
        if missing:
            raise ApplicationError(
                f"keep_columns not in the input: {', '.join(missing)}", code="invalid_keep_columns"
            )
        try:
            batch.feature_columns(table.column_names, signature=mv.signature, keep_columns=keep)
        except ValueError as exc:
            raise ApplicationError(str(exc), code="invalid_input") from None
    elif not input_uri.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        raise ApplicationError(
            "input_uri must be an MLflow artifact URI (runs:/, models:/ or mlflow-artifacts:/)",
            code="invalid_input_uri",
        )
    spec = {
        "model": mv.model.name,
        "version": mv.version,
        "alias": alias or None,
        "keep_columns": keep,
        "format": format,
        "chunk_rows": chunk_rows,
        "on_error": on_error,
        "signature": mv.signature,
    }
    if input_uri:
        spec["input_uri"] = input_uri
    else:
        spec.update(input_name=os.path.basename(upload_name)[:200], input_format=input_format)
    return job_submit(
        kind="batch", input=spec, actor=actor, files={"input": upload} if upload else None
    )


CONVERT_TARGETS = ("onnx",)
CONVERT_QUANTIZE = (None, "dynamic-int8")


def convert_job_submit(
    *,
    actor: Any,
    model: str,
    version: Any,
    target: str = "onnx",
    quantize: str | None = None,
    opset: int | None = None,
    tolerances: dict | None = None,
) -> Job:
    """Submit the conversion of one version (the engine is registry.conversion)."""
    require(actor, KIND_RIGHTS["convert"], "converting a version needs the registry-write right")
    if target not in CONVERT_TARGETS:
        raise ApplicationError("target must be 'onnx'", code="invalid_target")
    if quantize not in CONVERT_QUANTIZE:
        raise ApplicationError("quantize must be null or 'dynamic-int8'", code="invalid_quantize")
    if opset is not None and not (isinstance(opset, int) and 7 <= opset <= 30):
        raise ApplicationError(
            "opset must be null or an integer from 7 to 30", code="invalid_opset"
        )
    mv = _resolve_version(model, version, None)
    job_input = {
        "model": mv.model.name,
        "version": mv.version,
        "target": target,
        "quantize": quantize,
        "opset": opset,
    }
    if tolerances:
        from registry.conversion import validate_input
        from registry.conversion.errors import ConversionFailed

        job_input["tolerances"] = tolerances
        try:
            validate_input(job_input)
        except ConversionFailed as exc:
            raise ApplicationError(str(exc), code="invalid_tolerances") from exc
    return job_submit(kind="convert", input=job_input, actor=actor)


# --- cancel --------------------------------------------------------------------------------


def job_cancel(*, job: Job, actor: Any) -> Job:
    """Cancel a queued job at once; ask a running one to stop (its worker ends it
    ``cancelled`` within a chunk). A running job whose worker died is cancelled at once.

    A running job past its commit point (``committed_at``: registering its output) cannot be
    cancelled any more: 409 ``job_committed``, nothing changed. Every update here requires
    ``committed_at`` null, as the commit requires ``cancel_requested`` unset: of a cancel and
    a commit that race, exactly one wins."""
    if job.owner_id != getattr(actor, "pk", None) and not sees_every_job(actor):
        raise Forbidden("only the job's owner or an admin may cancel it")
    now = timezone.now()
    with transaction.atomic():
        before = _snapshot(job)
        if Job.objects.filter(pk=job.pk, state=Job.State.QUEUED).update(
            state=Job.State.CANCELLED, cancel_requested=True, finished_at=now
        ):
            job.refresh_from_db()
            _audit(job, "job.cancel", actor=actor, before=before, after=_snapshot(job))
            transaction.on_commit(lambda: _cleanup_work(job.pk))
            return job
        dead = Q(lease_until__isnull=True) | Q(lease_until__lt=now)
        running = Job.objects.filter(pk=job.pk, state=Job.State.RUNNING, committed_at__isnull=True)
        if running.filter(dead).update(
            state=Job.State.CANCELLED,
            cancel_requested=True,
            finished_at=now,
            lease_owner="",
            lease_until=None,
        ):
            job.refresh_from_db()
            _audit(job, "job.cancel", actor=actor, before=before, after=_snapshot(job))
            transaction.on_commit(lambda: _cleanup_work(job.pk))
            return job
        if running.update(cancel_requested=True):
            job.refresh_from_db()
            _audit(
                job,
                "job.cancel_requested",
                actor=actor,
                before=before,
                after={**_snapshot(job), "cancel_requested": True},
            )
            return job
    job.refresh_from_db()
    if job.state == Job.State.RUNNING and job.committed_at is not None:
        raise Conflict(
            f"job {job.pk} can no longer be cancelled: it is registering its output and will "
            "finish",
            code="job_committed",
        )
    raise Conflict(f"job {job.pk} is already {job.state}", code="job_finished")


def job_commit(*, job_id: int, lease_owner: str) -> bool:
    """The run holding the lease passes the job's commit point: True once the job is
    committed (now, or by an earlier attempt), False if a cancel was asked first. Raises
    LeaseLost if the run no longer holds the job. One conditional UPDATE decides, against
    ``job_cancel``'s (which requires ``committed_at`` null)."""
    with transaction.atomic():
        won = Job.objects.filter(
            pk=job_id,
            lease_owner=lease_owner,
            state=Job.State.RUNNING,
            cancel_requested=False,
            committed_at__isnull=True,
        ).update(committed_at=timezone.now())
        job = Job.objects.get(pk=job_id)
        if job.lease_owner != lease_owner or job.state != Job.State.RUNNING:
            raise LeaseLost(f"job {job_id}: another worker holds it now")
        if won:
            _audit(
                job,
                "job.commit",
                before={**_snapshot(job), "committed_at": None},
                after={**_snapshot(job), "committed_at": job.committed_at.isoformat()},
            )
            return True
        return job.committed_at is not None  # committed by an earlier attempt, or cancelled


def sees_every_job(user: Any) -> bool:
    """Admins (who may read the audit log) see and cancel every job; others their own."""
    return user_can(user, Right.VIEW_AUDIT)


# --- run (the worker's side) ---------------------------------------------------------------


def _lease_seconds() -> float:
    return float(settings.CONTROLPLANE_JOB_LEASE_SECONDS)


def _acquire(job_id: int, owner: str) -> Job | None:
    """Take a queued job, or a running one whose worker's lease ran out (resume)."""
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.filter(pk=job_id).first()
        if job is None:
            return None
        before = _snapshot(job)
        taken = (
            Job.objects.filter(pk=job_id)
            .filter(
                Q(state=Job.State.QUEUED, cancel_requested=False)
                | Q(state=Job.State.RUNNING, cancel_requested=False, lease_until__lt=now)
            )
            .update(
                state=Job.State.RUNNING,
                lease_owner=owner,
                lease_until=now + timedelta(seconds=_lease_seconds()),
                attempts=F("attempts") + 1,
            )
        )
        if not taken:
            return None
        Job.objects.filter(pk=job_id, started_at__isnull=True).update(started_at=now)
        job = Job.objects.select_related("owner").get(pk=job_id)
        action = "job.start" if before["state"] == Job.State.QUEUED else "job.resume"
        _audit(job, action, before=before, after=_snapshot(job))
    return job


def _renew(job_id: int, owner: str) -> bool:
    return bool(
        Job.objects.filter(pk=job_id, lease_owner=owner, state=Job.State.RUNNING).update(
            lease_until=timezone.now() + timedelta(seconds=_lease_seconds())
        )
    )


class _Heartbeat:
    """Renews the lease every third of its length from a daemon thread with its own
    database connection; sets ``lost`` once the lease is no longer this run's."""

    def __init__(self, job_id: int, owner: str) -> None:
        self.job_id, self.owner = job_id, owner
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(_lease_seconds() / 3):
                try:
                    held = _renew(self.job_id, self.owner)
                except (DatabaseError, InterfaceError) as exc:
                    logger.warning("renewing the lease of job %s: %s", self.job_id, exc)
                    connection.close()
                    continue
                if not held:
                    self.lost.set()
                    return
        finally:
            connection.close()


def _finish(
    job_id: int,
    owner: str,
    state: str,
    *,
    error: str = "",
    result: dict | None = None,
) -> bool:
    with transaction.atomic():
        job = Job.objects.get(pk=job_id)
        before = _snapshot(job)
        done = Job.objects.filter(pk=job_id, lease_owner=owner, state=Job.State.RUNNING).update(
            state=state,
            error=error[:10000],
            result=result,
            finished_at=timezone.now(),
            lease_owner="",
            lease_until=None,
        )
        if not done:
            return False
        job.refresh_from_db()
        after = {**_snapshot(job), **({"error": job.error} if job.error else {})}
        _audit(job, f"job.{state}", before=before, after=after)
        transaction.on_commit(lambda: _cleanup_work(job_id))
    return True


def _cleanup_work(job_id: int) -> None:
    """A finished job keeps only its files (the output); its work and input go."""
    for part in ("work", "input"):
        shutil.rmtree(ctxmod.job_dir(job_id) / part, ignore_errors=True)


def job_run(*, job_id: int) -> str | None:
    """Run (or resume) one job to its end in this process; the state it ended in, or None
    when there was nothing to do (finished, cancelled, or another worker holds it)."""
    owner = uuid.uuid4().hex
    job = _acquire(job_id, owner)
    if job is None:
        return None
    with _Heartbeat(job_id, owner) as beat:
        ctx = None
        try:
            handler = handler_for(job.kind)
            ctx = ctxmod.JobContext(job, lease_owner=owner, lost=beat.lost)
            if job.attempts > 1:
                ctx.log(f"resumed by another worker (attempt {job.attempts})")
                # What the dead worker started (a model server, a conversion process) would
                # otherwise run beside this attempt, writing into the same workdir.
                from .server import stop_strays

                stopped = stop_strays(keep={(job_id, job.attempts)}, only_job=job_id)
                if stopped:
                    ctx.log(f"stopped {stopped} process(es) of the earlier attempt")
            result = handler(ctx)
            if beat.lost.is_set():
                return None
            if ctx.cancelled():  # never once committed: the cancel was refused (409)
                raise JobCancelled()
            if result is not None and not isinstance(result, dict):
                raise JobFailed(f"the {job.kind} handler returned {type(result).__name__}")
            state, fields = Job.State.SUCCEEDED, {"result": result or {}}
        except LeaseLost:
            logger.warning("job %s: lease lost; another worker has it", job_id)
            return None
        except JobCancelled:
            if ctx is not None and ctx.committed:
                # Nobody could cancel it (the cancel was refused): the handler stopped on its
                # own after its point of no return, which is a failure, not a cancel.
                state, fields = (
                    Job.State.FAILED,
                    {"error": "the handler stopped (JobCancelled) after its commit point"},
                )
            else:
                state, fields = Job.State.CANCELLED, {"error": ""}
        except JobFailed as exc:
            state, fields = Job.State.FAILED, {"error": exc.reason}
        except KindUnavailable as exc:
            state, fields = Job.State.FAILED, {"error": str(exc)}
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            state, fields = Job.State.FAILED, {"error": f"{type(exc).__name__}: {exc}"}
        if state == Job.State.FAILED and ctx is not None:
            try:
                ctx.log(f"failed: {fields['error']}")
            except Exception:
                pass
    return state if _finish(job_id, owner, state, **fields) else None


# --- sweep (periodic) ----------------------------------------------------------------------


def job_sweep() -> dict[str, int]:
    """Converge: resume running jobs whose worker died, enqueue queued jobs whose message
    was lost, end the cancelled-while-dead and those that killed too many workers."""
    now = timezone.now()
    counts = {"resumed": 0, "requeued": 0, "cancelled": 0, "failed": 0}
    dead = Job.objects.filter(state=Job.State.RUNNING, lease_until__lt=now)
    for job in dead:
        before = _snapshot(job)
        with transaction.atomic():
            if job.cancel_requested:
                if Job.objects.filter(
                    pk=job.pk, state=Job.State.RUNNING, lease_until__lt=now, committed_at=None
                ).update(
                    state=Job.State.CANCELLED, finished_at=now, lease_owner="", lease_until=None
                ):
                    job.refresh_from_db()
                    _audit(job, "job.cancelled", before=before, after=_snapshot(job))
                    counts["cancelled"] += 1
                continue
            if job.attempts >= settings.CONTROLPLANE_JOB_MAX_ATTEMPTS:
                reason = (
                    f"its worker died {job.attempts} times (CONTROLPLANE_JOB_MAX_ATTEMPTS); "
                    "the last checkpoint is kept"
                )
                if Job.objects.filter(
                    pk=job.pk, state=Job.State.RUNNING, lease_until__lt=now
                ).update(
                    state=Job.State.FAILED,
                    error=reason,
                    finished_at=now,
                    lease_owner="",
                    lease_until=None,
                ):
                    job.refresh_from_db()
                    _audit(
                        job, "job.failed", before=before, after={**_snapshot(job), "error": reason}
                    )
                    counts["failed"] += 1
                continue
            _enqueue(job.pk)
            counts["resumed"] += 1
    from .server import stop_strays

    alive = Job.objects.filter(state=Job.State.RUNNING, lease_until__gte=now)
    stop_strays(keep=set(alive.values_list("pk", "attempts")))
    stale = now - timedelta(seconds=REQUEUE_AFTER_SECONDS)
    for job_id in Job.objects.filter(state=Job.State.QUEUED, created_at__lt=stale).values_list(
        "pk", flat=True
    ):
        with transaction.atomic():
            _enqueue(job_id)
        counts["requeued"] += 1
    return counts


# --- delete --------------------------------------------------------------------------------


def job_delete(*, job: Job, actor: Any) -> None:
    """Delete a finished job and its files (admin)."""
    if not job.finished:
        raise Conflict("cancel the job first: it has not finished", code="job_not_finished")
    job_id = job.pk
    with transaction.atomic():
        _audit(job, "job.delete", actor=actor, before=_snapshot(job))
        job.delete()
        transaction.on_commit(lambda: ctxmod.remove_job_dir(job_id))
