"""The control plane's view of the MLflow registry, and what MLflow lacks.

MLflow is the source of truth for models, versions, artifacts and aliases;
these tables mirror them (for fast lists and joins) and add promotion history,
approval requests and policies. The periodic sync converges the mirror on
MLflow and records alias moves made outside the control plane.
"""

from django.conf import settings
from django.db import models


class RegisteredModel(models.Model):
    """A registered model (mirrors an MLflow registered model of the same name)."""

    name = models.CharField(max_length=256, unique=True)
    description = models.TextField(blank=True)
    tags = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """One version of a registered model, with the metadata read from MLflow
    (run metrics and params, MLmodel signature, input example)."""

    class Status(models.TextChoices):
        READY = "ready", "Ready"
        ARCHIVED = "archived", "Archived"

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY)
    source = models.TextField(
        help_text="where MLflow got the files from (runs:/, models:/ or artifact URI)"
    )
    run_id = models.CharField(max_length=64, blank=True)
    description = models.TextField(blank=True)
    tags = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    params = models.JSONField(default=dict, blank=True)
    flavors = models.JSONField(default=list, blank=True)
    signature = models.JSONField(null=True, blank=True)
    input_example = models.JSONField(null=True, blank=True)
    requirements = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["model", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["model", "version"], name="unique_model_version")
        ]

    def __str__(self) -> str:
        return f"{self.model.name} v{self.version}"


class Alias(models.Model):
    """Where an alias points now (mirrors MLflow's registered model aliases)."""

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=255)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "name"]
        constraints = [models.UniqueConstraint(fields=["model", "name"], name="unique_model_alias")]
        verbose_name_plural = "aliases"

    def __str__(self) -> str:
        return f"{self.model.name}@{self.name} -> v{self.version.version}"


class AliasMove(models.Model):
    """Promotion history: every move of an alias, by whom and why.

    ``origin`` is ``controlplane`` for moves made here and ``external`` for
    moves the sync found in MLflow (made with MLflow's own client or UI).
    """

    class Origin(models.TextChoices):
        CONTROLPLANE = "controlplane", "Control plane"
        EXTERNAL = "external", "Outside the control plane"

    model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="alias_moves")
    alias = models.CharField(max_length=255)
    from_version = models.PositiveIntegerField(null=True, blank=True)
    to_version = models.PositiveIntegerField(null=True, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(max_length=150)
    reason = models.TextField()
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.CONTROLPLANE)
    request = models.ForeignKey(
        "PromotionRequest", null=True, blank=True, on_delete=models.SET_NULL, related_name="moves"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.alias}: {self.from_version} -> {self.to_version}"


class ApprovalPolicy(models.Model):
    """Promotions to ``alias`` need approval by a different user with the
    approver role. ``model`` empty means: for every model."""

    alias = models.CharField(max_length=255)
    model = models.ForeignKey(
        RegisteredModel,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="approval_policies",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "approval policies"
        constraints = [
            models.UniqueConstraint(fields=["alias", "model"], name="unique_alias_policy")
        ]

    def __str__(self) -> str:
        return f"approval for @{self.alias} ({self.model or 'all models'})"


class PromotionRequest(models.Model):
    """A promotion waiting for (or decided by) an approver."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"

    model = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="promotion_requests"
    )
    alias = models.CharField(max_length=255)
    version = models.ForeignKey(
        ModelVersion, on_delete=models.CASCADE, related_name="promotion_requests"
    )
    reason = models.TextField()
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    requested_at = models.DateTimeField(auto_now_add=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_comment = models.TextField(blank=True)

    class Meta:
        ordering = ["-requested_at", "-id"]
        permissions = [("approve_promotion", "Can approve or reject promotion requests")]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.alias} -> v{self.version.version} ({self.status})"
