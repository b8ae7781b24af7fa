"""Jobs admin: read-only rows; cancel and delete go through the services (audited)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest

from controlplane.lib.errors import ApplicationError

from . import services
from .models import Job, JobLog


class JobLogInline(admin.TabularInline):
    model = JobLog
    extra = 0
    fields = ("created_at", "message")
    readonly_fields = fields
    can_delete = False
    max_num = 0

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "state", "owner", "progress_done", "progress_total", "created_at")
    list_filter = ("state", "kind")
    search_fields = ("id", "owner__username")
    readonly_fields = [f.name for f in Job._meta.fields]
    inlines = [JobLogInline]
    actions = ["cancel_jobs", "delete_finished_jobs"]

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # the action below deletes through the service (files, audit)

    def _each(self, request, queryset, call, done: str) -> None:
        ok = []
        for job in queryset:
            try:
                call(job)
            except ApplicationError as exc:
                messages.error(request, f"{job}: {exc.message}")
            else:
                ok.append(str(job.pk))
        if ok:
            messages.success(request, f"{done}: {', '.join(ok)}.")

    @admin.action(description="Cancel the selected jobs")
    def cancel_jobs(self, request, queryset) -> None:
        self._each(
            request, queryset, lambda j: services.job_cancel(job=j, actor=request.user), "Cancelled"
        )

    @admin.action(description="Delete the selected finished jobs (and their files)")
    def delete_finished_jobs(self, request, queryset) -> None:
        if not services.sees_every_job(request.user):
            messages.error(request, "only admins delete jobs")
            return
        self._each(
            request, queryset, lambda j: services.job_delete(job=j, actor=request.user), "Deleted"
        )
