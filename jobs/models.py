from __future__ import annotations

from django.conf import settings
from django.db import models


class Job(models.Model):
    """One unit of background work of a registered kind (jobs/kinds.py), run by a worker.

    ``state`` moves queued → running → succeeded | failed | cancelled by compare-and-swap
    updates (jobs/services.py), each audited in its transaction. A running job holds a lease
    (``lease_owner`` until ``lease_until``) its worker renews while alive; once the lease runs
    out another worker resumes it from ``checkpoint``.

    ``committed_at`` is set once the handler passed its commit point (``ctx.commit()``, right
    before a step that cannot be undone, such as registering a version): from then on the job
    cannot be cancelled. Commit and cancel are conditional updates of this row that exclude
    each other (a commit needs ``cancel_requested`` unset, a cancel ``committed_at`` null), so
    exactly one of two racing wins.
    """

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    FINISHED = (State.SUCCEEDED, State.FAILED, State.CANCELLED)

    kind = models.CharField(max_length=32, db_index=True)
    input = models.JSONField(default=dict)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    state = models.CharField(
        max_length=16, choices=State.choices, default=State.QUEUED, db_index=True
    )
    cancel_requested = models.BooleanField(default=False)
    committed_at = models.DateTimeField(
        null=True, blank=True, help_text="when the job passed its commit point (no cancel after)"
    )
    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(null=True, blank=True)
    rate = models.FloatField(null=True, blank=True, help_text="units (rows) per second")
    error = models.TextField(blank=True)
    result = models.JSONField(null=True, blank=True)
    # Files the job produced, by name ("output", "errors"): {path, filename, content_type}.
    files = models.JSONField(default=dict, blank=True)
    checkpoint = models.JSONField(default=dict, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    lease_owner = models.CharField(max_length=64, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    progress_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["state", "lease_until"])]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.kind})"

    @property
    def finished(self) -> bool:
        return self.state in self.FINISHED

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the current rate, while running with a known total."""
        if self.state != self.State.RUNNING or not self.rate or self.progress_total is None:
            return None
        return max(self.progress_total - self.progress_done, 0) / self.rate

    @property
    def percent(self) -> float | None:
        if not self.progress_total:
            return 100.0 if self.state == self.State.SUCCEEDED else None
        return min(100.0, 100.0 * self.progress_done / self.progress_total)


class JobLog(models.Model):
    """One line a job logged (bounded: the oldest go beyond JOB_LOG_LINES per job)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="logs")
    created_at = models.DateTimeField(auto_now_add=True)
    message = models.TextField()

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.created_at:%H:%M:%S} {self.message[:80]}"
