"""The jobs pages: a list and a detail page with live progress (jobs.js polls the API)."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from accounts.permissions import Right, requires
from controlplane.lib.errors import ApplicationError
from controlplane.lib.views import error_pages

from . import selectors, services
from .models import Job

PAGE_SIZE = 50
BADGES = {
    "queued": "badge-pending",
    "running": "badge-alias",
    "succeeded": "badge-ready",
    "failed": "badge-rejected",
    "cancelled": "badge-cancelled",
}


def _context(job: Job) -> dict:
    spec = job.input or {}
    return {
        "job": job,
        "badge": BADGES.get(job.state, "badge-archived"),
        "target": f"{spec.get('model', '')} v{spec.get('version', '')}"
        if spec.get("model")
        else "",
    }


@requires(Right.READ)
@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    state = request.GET.get("state", "").strip()[:16]
    qs = selectors.job_list_for_user(user=request.user, state=state)
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [_context(job) for job in page]
    return render(
        request,
        "jobs/job_list.html",
        {
            "section": "jobs",
            "page": page,
            "rows": rows,
            "state": state,
            "states": Job.State.values,
            "badges": BADGES,
            "live": any(not r["job"].finished for r in rows),
        },
    )


@requires(Right.READ)
@require_GET
@error_pages("registry/error.html")
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = selectors.job_get_for_user(user=request.user, job_id=job_id)
    return render(
        request,
        "jobs/job_detail.html",
        {
            "section": "jobs",
            **_context(job),
            "logs": selectors.job_logs(job=job),
            "badges": BADGES,
            "can_cancel": not job.finished
            and (job.owner_id == request.user.pk or services.sees_every_job(request.user)),
            # past its commit point: the button stays, disabled, saying why
            "committed": job.committed_at is not None and not job.finished,
            "files": sorted((job.files or {}).items()) if job.state == Job.State.SUCCEEDED else [],
        },
    )


@requires(Right.REGISTRY_WRITE, Right.DEPLOY)
@require_POST
@error_pages("registry/error.html")
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    job = selectors.job_get_for_user(user=request.user, job_id=job_id)
    try:
        services.job_cancel(job=job, actor=request.user)
        messages.success(request, f"Cancel requested for job {job.pk}.")
    except ApplicationError as exc:
        if exc.status_code == 404:
            raise
        messages.error(request, exc.message)
    return redirect("jobs:job-detail", job_id=job.pk)
