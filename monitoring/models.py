"""Monitoring: what the model servers did, how right they were, and who to tell.

Time series live in three tables of the same shape (``TrafficSample`` raw, one row per
instance scrape; ``TrafficMinute`` and ``TrafficHour`` rollups), keyed by deployment and
model version. Rollups are written in the same transaction as the raw row (the stored rows
are read, merged and written back whole with their percentiles, one writer per deployment at
a time), so they never lag. Times in the series tables are unix seconds (integers): the
30-day, one-minute query reads 43,200 rows per version and arithmetic on integers is
what keeps it fast on every database.

Latency is kept as the model server's histogram (one column per bucket, counts not
cumulative), so percentiles over any window are computed from merged counts, not averaged.

Accuracy comes from ground truth posted later: ``Prediction`` rows are pulled from each
server's prediction log, ``FeedbackPair`` rows join them with labels, and
``FeedbackMinute`` holds the confusion counts of each minute (recomputed from the pairs
whenever a label arrives, so a late label updates the window its prediction fell in).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from controlplane.lib.fields import EncryptedTextField

# The model server's latency histogram (serving/metrics.py): 14 bounds, then +Inf.
from serving.metrics import LATENCY_BUCKETS

BUCKET_FIELDS = [f"b{i:02d}" for i in range(len(LATENCY_BUCKETS) + 1)]
TRAFFIC_FIELDS = ["requests", "errors", "latency_sum", *BUCKET_FIELDS]


def _bucket(i: int) -> models.BigIntegerField:
    bound = (
        f"≤ {LATENCY_BUCKETS[i]} s" if i < len(LATENCY_BUCKETS) else f"> {LATENCY_BUCKETS[-1]} s"
    )
    return models.BigIntegerField(default=0, help_text=f"requests with latency {bound}")


class TrafficCounts(models.Model):
    """Requests, 5xx errors and the latency histogram of prediction requests (not
    /metrics, /ping or /predictions), as increases over an interval."""

    # No database-level constraint: PostgreSQL checks deferred foreign keys row by row at
    # commit, which halves the ingestion rate; Django still deletes these rows with their
    # deployment (one DELETE per table).
    deployment = models.ForeignKey(
        "deployments.Deployment",
        on_delete=models.CASCADE,
        related_name="+",
        db_constraint=False,
        db_index=False,
    )  # the composite indexes lead with it
    model_version = models.PositiveIntegerField(
        help_text="0 in rollups: all versions of the deployment"
    )
    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0, help_text="responses with status 500 or more")
    latency_sum = models.FloatField(default=0.0, help_text="seconds")
    b00 = _bucket(0)
    b01 = _bucket(1)
    b02 = _bucket(2)
    b03 = _bucket(3)
    b04 = _bucket(4)
    b05 = _bucket(5)
    b06 = _bucket(6)
    b07 = _bucket(7)
    b08 = _bucket(8)
    b09 = _bucket(9)
    b10 = _bucket(10)
    b11 = _bucket(11)
    b12 = _bucket(12)
    b13 = _bucket(13)
    b14 = _bucket(14)

    class Meta:
        abstract = True


class TrafficSample(TrafficCounts):
    """Raw: what one instance served between two scrapes (``start`` to ``ts``)."""

    instance = models.CharField(max_length=64, help_text="revision#ordinal")
    start = models.BigIntegerField(
        help_text="unix seconds: the previous scrape, or the process start"
    )
    ts = models.BigIntegerField(help_text="unix seconds: this scrape")
    reset = models.BooleanField(default=False, help_text="the counters had restarted from zero")

    class Meta:
        indexes = [models.Index(fields=["deployment", "ts"], name="mon_sample_dep_ts")]

    def __str__(self) -> str:
        return f"{self.deployment_id} v{self.model_version} {self.instance} @{self.ts}"


class TrafficRollup(TrafficCounts):
    """A rollup row, with the latency percentiles of its own bucket computed when it is
    written: a query whose step is the rollup's resolution reads them instead of fifteen
    counts (wider steps merge the counts)."""

    bucket = models.BigIntegerField()
    p50 = models.FloatField(null=True, blank=True, help_text="ms")
    p95 = models.FloatField(null=True, blank=True, help_text="ms")
    p99 = models.FloatField(null=True, blank=True, help_text="ms")

    class Meta:
        abstract = True


class TrafficMinute(TrafficRollup):
    """One-minute rollup; ``bucket`` is the minute's start in unix seconds. Each minute has a
    row per model version and one with ``model_version`` 0 holding their sum."""

    class Meta:
        constraints = [
            # Also the read path: deployment = d AND model_version = v AND bucket in a range.
            models.UniqueConstraint(
                fields=["deployment", "model_version", "bucket"], name="mon_minute_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment_id} v{self.model_version} minute {self.bucket}"


class TrafficHour(TrafficRollup):
    """One-hour rollup, like ``TrafficMinute``; ``bucket`` is the hour's start in unix seconds."""

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "model_version", "bucket"], name="mon_hour_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment_id} v{self.model_version} hour {self.bucket}"


class ScrapeState(models.Model):
    """The counters of one instance at its last scrape, to turn the next scrape into increases."""

    instance = models.OneToOneField(
        "deployments.Instance", on_delete=models.CASCADE, related_name="+"
    )
    process_start = models.FloatField(help_text="serving_process_start_time_seconds")
    scraped_at = models.FloatField(help_text="unix seconds")
    counters = models.JSONField(help_text="requests, errors, latency sum and cumulative buckets")
    scrapes = models.PositiveIntegerField(default=0)
    resets = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"scrape state of instance {self.instance_id}"


class PullState(models.Model):
    """Where the control plane is in one instance's prediction log."""

    instance = models.OneToOneField(
        "deployments.Instance", on_delete=models.CASCADE, related_name="+"
    )
    boot_id = models.CharField(max_length=64, blank=True)
    cursor = models.BigIntegerField(default=0, help_text="seq of the last record ingested")
    pulled_at = models.DateTimeField(null=True, blank=True)
    records = models.BigIntegerField(default=0)
    lost = models.BigIntegerField(
        default=0, help_text="records the server dropped before we pulled them"
    )
    last_error = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"pull state of instance {self.instance_id}"


class Prediction(models.Model):
    """One answered prediction request, from a model server's prediction log."""

    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="+", db_constraint=False
    )  # as TrafficCounts: no row-by-row check at commit
    model_version = models.PositiveIntegerField()
    request_id = models.CharField(
        max_length=200, help_text="printable ASCII, as the model server accepts it"
    )
    ts = models.DateTimeField()
    latency_ms = models.FloatField()
    n_rows = models.PositiveIntegerField()
    outputs = models.JSONField(help_text="one entry per row")
    boot_id = models.CharField(max_length=64)
    seq = models.BigIntegerField()
    labeled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "boot_id", "seq"], name="mon_prediction_key"
            )
        ]
        indexes = [
            models.Index(fields=["deployment", "request_id"], name="mon_pred_dep_rid"),
            models.Index(fields=["deployment", "ts"], name="mon_pred_dep_ts"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.deployment_id} v{self.model_version})"


class FeedbackPair(models.Model):
    """One row of a labeled prediction: what the model said and what was true.

    ``y_true``/``y_pred`` hold the JSON of categorical values (classification);
    ``*_num`` the numbers (regression). A value may be both (integer classes)."""

    prediction = models.ForeignKey(Prediction, on_delete=models.CASCADE, related_name="pairs")
    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="+"
    )
    model_version = models.PositiveIntegerField()
    ts = models.DateTimeField(help_text="when the prediction was made")
    row = models.PositiveIntegerField()
    y_true = models.TextField(blank=True)
    y_pred = models.TextField(blank=True)
    y_true_num = models.FloatField(null=True, blank=True)
    y_pred_num = models.FloatField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["deployment", "ts"], name="mon_pair_dep_ts")]

    def __str__(self) -> str:
        return f"{self.prediction_id}[{self.row}]: {self.y_pred} vs {self.y_true}"


class FeedbackMinute(models.Model):
    """Confusion counts of the labeled predictions made in one minute (classification)."""

    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="+"
    )
    model_version = models.PositiveIntegerField()
    bucket = models.BigIntegerField(help_text="unix seconds: start of the minute")
    n = models.PositiveIntegerField()
    confusion = models.JSONField(help_text="[[y_true JSON, y_pred JSON, count], ...]")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "bucket", "model_version"], name="mon_feedback_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment_id} v{self.model_version} feedback {self.bucket}"


class PendingLabel(models.Model):
    """A label whose prediction has not been pulled yet; applied when it arrives."""

    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="+"
    )
    request_id = models.CharField(max_length=200)
    label = models.JSONField()
    received_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["deployment", "request_id"], name="mon_pending_key")
        ]

    def __str__(self) -> str:
        return f"pending label for {self.request_id}"


class DriftReference(models.Model):
    """What inputs should look like for one model version: per feature, the bins of the
    reference sample and the share of it in each bin."""

    class Source(models.TextChoices):
        INPUT_EXAMPLE = "input_example", "Input example logged with the model"
        DATASET = "dataset", "Uploaded reference dataset"

    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="+"
    )
    source = models.CharField(max_length=16, choices=Source.choices)
    active = models.BooleanField(default=True)
    n_rows = models.PositiveIntegerField()
    profile = models.JSONField(help_text="{feature: {kind, edges or categories, expected}}")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_version"],
                condition=models.Q(active=True),
                name="mon_one_active_reference",
            )
        ]

    def __str__(self) -> str:
        return f"{self.model_version} reference ({self.source}, {self.n_rows} rows)"


class DriftHour(models.Model):
    """Inputs seen in one hour, counted in the bins of a reference (one row per feature)."""

    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="+"
    )
    model_version = models.PositiveIntegerField()
    reference = models.ForeignKey(DriftReference, on_delete=models.CASCADE, related_name="+")
    bucket = models.BigIntegerField(help_text="unix seconds: start of the hour")
    feature = models.CharField(max_length=256)
    counts = models.JSONField()
    n = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "bucket", "model_version", "reference", "feature"],
                name="mon_drift_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment_id} v{self.model_version} {self.feature} @{self.bucket}"


class ProbeResult(models.Model):
    """One scheduled request with the model's input example to a deployment's endpoint."""

    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="+"
    )
    model_version = models.PositiveIntegerField(
        null=True, blank=True, help_text="as the server reported it"
    )
    ts = models.DateTimeField()
    ok = models.BooleanField()
    latency_ms = models.FloatField(null=True, blank=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    kind = models.CharField(max_length=16, help_text="'example' or 'ping' (no input example)")
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-ts", "-id"]
        indexes = [models.Index(fields=["deployment", "ts"], name="mon_probe_dep_ts")]

    def __str__(self) -> str:
        return f"probe {self.deployment_id} @{self.ts:%Y-%m-%d %H:%M:%S} {'ok' if self.ok else 'failed'}"


class AlertRule(models.Model):
    """A condition on one metric of one deployment, evaluated over a sliding window."""

    class Comparison(models.TextChoices):
        GT = "gt", ">"
        GTE = "gte", "≥"
        LT = "lt", "<"
        LTE = "lte", "≤"

    class State(models.TextChoices):
        OK = "ok", "OK"
        FIRING = "firing", "Firing"
        RESOLVED = "resolved", "Resolved"

    name = models.CharField(max_length=200)
    deployment = models.ForeignKey(
        "deployments.Deployment", on_delete=models.CASCADE, related_name="+"
    )
    metric = models.CharField(max_length=32)
    model_version = models.PositiveIntegerField(
        null=True, blank=True, help_text="empty: all versions"
    )
    window_s = models.PositiveIntegerField(default=300)
    comparison = models.CharField(max_length=3, choices=Comparison.choices)
    threshold = models.FloatField()
    min_samples = models.PositiveIntegerField(
        default=1, help_text="below this, the rule does not change state"
    )
    enabled = models.BooleanField(default=True)
    webhook_url = models.URLField(max_length=2000, blank=True)
    webhook_secret = EncryptedTextField(
        blank=True, help_text="HMAC-SHA256 key of the webhook body (encrypted at rest)"
    )
    email_to = models.TextField(blank=True, help_text="comma-separated addresses")
    rollback_on_fire = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.OK, db_index=True)
    state_changed_at = models.DateTimeField(null=True, blank=True)
    last_value = models.FloatField(null=True, blank=True)
    last_samples = models.PositiveIntegerField(null=True, blank=True)
    last_evaluated_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["deployment__name", "name", "id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.metric} {self.get_comparison_display()} {self.threshold:g})"


class AlertEvent(models.Model):
    """A state change of a rule: the history."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="events")
    from_state = models.CharField(max_length=16)
    to_state = models.CharField(max_length=16)
    value = models.FloatField(null=True, blank=True)
    samples = models.PositiveIntegerField(default=0)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.rule.name}: {self.from_state} → {self.to_state}"


class AlertNotification(models.Model):
    """One delivery of an alert event to one channel."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed"

    event = models.ForeignKey(AlertEvent, on_delete=models.CASCADE, related_name="notifications")
    channel = models.CharField(max_length=16)
    target = models.TextField()
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    claimed_at = models.DateTimeField(
        null=True, blank=True, help_text="when a worker began sending it"
    )
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.channel} → {self.target} ({self.status})"
