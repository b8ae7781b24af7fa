"""What a running job's handler sees of the framework (the contract is in jobs/kinds.py)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .errors import JobCancelled, LeaseLost
from .models import Job, JobLog

# Seconds between two reads of the cancel flag (one query) by ``cancelled()``.
CANCEL_POLL_SECONDS = 0.5
# Weight of the newest sample in the rate's moving average.
RATE_SMOOTHING = 0.3


def job_dir(job_id: int) -> Path:
    return Path(settings.CONTROLPLANE_JOBS_DIR) / str(job_id)


def workdir_for(job_id: int) -> Path:
    path = job_dir(job_id) / "work"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def files_dir(job_id: int) -> Path:
    path = job_dir(job_id) / "files"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def remove_job_dir(job_id: int) -> None:
    shutil.rmtree(job_dir(job_id), ignore_errors=True)


class JobContext:
    """One run (attempt) of one job, holding its lease as ``lease_owner``.

    Every write is conditional on the lease still being this run's: a worker presumed dead
    whose job another worker took over gets ``LeaseLost`` instead of writing over it.
    """

    def __init__(self, job: Job, *, lease_owner: str, lost=None) -> None:
        self.job_id: int = job.pk
        self.attempt: int = job.attempts  # 1 on the first run, one more on every resume
        self.kind: str = job.kind
        self.input: dict = job.input
        self.owner = job.owner
        self.workdir: Path = workdir_for(job.pk)
        self.state: dict = dict(job.checkpoint or {})
        self._lease_owner = lease_owner
        self._lost = lost  # a threading.Event the heartbeat sets when the lease is gone
        self._cancel_checked = 0.0
        self._cancelled = False
        # Past the commit point (this attempt or an earlier one): no cancel any more.
        self.committed: bool = job.committed_at is not None
        self._rate_mark: tuple[float, int] | None = None
        self._rate: float | None = job.rate

    # --- writes guarded by the lease ---------------------------------------------------------

    def _mine(self):
        return Job.objects.filter(pk=self.job_id, lease_owner=self._lease_owner, state="running")

    def _update(self, **fields: Any) -> None:
        if self._lost is not None and self._lost.is_set():
            raise LeaseLost(f"job {self.job_id}: another worker holds it now")
        if not self._mine().update(**fields):
            raise LeaseLost(f"job {self.job_id}: another worker holds it now")

    def progress(self, done: int, total: int | None = None) -> None:
        now = time.monotonic()
        if self._rate_mark is None:
            self._rate_mark = (now, done)
        else:
            then, before = self._rate_mark
            if now - then >= 0.2 and done >= before:
                sample = (done - before) / (now - then)
                self._rate = (
                    sample
                    if self._rate is None
                    else RATE_SMOOTHING * sample + (1 - RATE_SMOOTHING) * self._rate
                )
                self._rate_mark = (now, done)
        fields: dict[str, Any] = {"progress_done": done, "progress_at": timezone.now()}
        if total is not None:
            fields["progress_total"] = total
        if self._rate is not None:
            fields["rate"] = self._rate
        self._update(**fields)

    def log(self, message: str) -> None:
        if self._lost is not None and self._lost.is_set():
            return
        JobLog.objects.create(job_id=self.job_id, message=str(message)[:4000])
        limit = settings.CONTROLPLANE_JOB_LOG_LINES
        oldest_kept = (
            JobLog.objects.filter(job_id=self.job_id)
            .order_by("-id")
            .values_list("id", flat=True)[limit - 1 : limit]
        )
        cut = list(oldest_kept)
        if cut:
            JobLog.objects.filter(job_id=self.job_id, id__lt=cut[0]).delete()

    def checkpoint(self, state: dict) -> None:
        """One UPDATE of the row: the checkpoint is replaced whole or not at all."""
        self._update(checkpoint=state)
        self.state = dict(state)

    def commit(self) -> None:
        """The commit point: call it right before the step that cannot be undone (registering
        a version). It either wins, and from then on the job can no longer be cancelled (a
        cancel answers 409; the job ends as the handler does), or finds a cancel asked first
        and raises JobCancelled, so that nothing is done. Idempotent, and already won on the
        attempt that resumes a job whose worker died after committing."""
        from .services import job_commit

        if self._lost is not None and self._lost.is_set():
            raise LeaseLost(f"job {self.job_id}: another worker holds it now")
        if not job_commit(job_id=self.job_id, lease_owner=self._lease_owner):
            self._cancelled = True
            raise JobCancelled(f"job {self.job_id} was cancelled before its commit point")
        self.committed = True

    def cancelled(self) -> bool:
        if self._lost is not None and self._lost.is_set():
            return True
        if self.committed:
            return False
        now = time.monotonic()
        if not self._cancelled and now - self._cancel_checked >= CANCEL_POLL_SECONDS:
            self._cancel_checked = now
            self._cancelled = Job.objects.filter(pk=self.job_id, cancel_requested=True).exists()
        return self._cancelled

    def process_labels(self) -> dict[str, str]:
        """Environment labels for a process the handler starts (a conversion subprocess):
        labelled like the job's model servers, it is stopped by the next attempt and by the
        sweep once this run is over (its worker was killed), never left running beside them."""
        from .server import owner_label

        return {
            "CONTROLPLANE_OWNER": owner_label(),
            "CONTROLPLANE_DEPLOYMENT": f"job-{self.job_id}",
            "CONTROLPLANE_REVISION": str(self.attempt),
        }

    def set_output(self, path: Path, *, filename: str, content_type: str) -> None:
        self.attach("output", path, filename=filename, content_type=content_type)

    def attach(self, name: str, path: Path, *, filename: str, content_type: str) -> None:
        """Keep ``path`` (moved into the job's files) as the job's file ``name``, downloadable
        from ``GET /api/v1/jobs/{id}/files/{name}`` once the job has succeeded."""
        target = files_dir(self.job_id) / name
        with transaction.atomic():
            job = Job.objects.select_for_update().get(pk=self.job_id)
            if job.lease_owner != self._lease_owner or job.state != "running":
                raise LeaseLost(f"job {self.job_id}: another worker holds it now")
            os.replace(path, target)
            files = dict(job.files or {})
            files[name] = {
                "path": str(target),
                "filename": os.path.basename(filename) or name,
                "content_type": content_type,
                "size": target.stat().st_size,
            }
            Job.objects.filter(pk=self.job_id).update(files=files)
