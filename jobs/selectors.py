from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from controlplane.lib.errors import NotFound

from .models import Job, JobLog
from .services import sees_every_job


def job_list_for_user(*, user: Any, state: str = "", kind: str = "") -> QuerySet[Job]:
    """The jobs ``user`` may see: their own; every job for admins."""
    qs = Job.objects.select_related("owner").defer("checkpoint")
    if not sees_every_job(user):
        qs = qs.filter(owner_id=user.pk)
    if state:
        qs = qs.filter(state=state)
    if kind:
        qs = qs.filter(kind=kind)
    return qs.order_by("-created_at", "-id")


def job_get_for_user(*, user: Any, job_id: int) -> Job:
    """One job, if ``user`` may see it (a job of someone else is "not found")."""
    job = job_list_for_user(user=user).filter(pk=job_id).first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def job_logs(*, job: Job, limit: int = 200) -> list[JobLog]:
    return list(reversed(JobLog.objects.filter(job=job).order_by("-id")[:limit]))
