"""Deployments: desired state lives here; the reconciler makes it so.

A ``Deployment`` names what should serve (a fixed version or an alias to
follow) and where (runtime, replicas, resources). Each change makes an
immutable, numbered ``Revision``; ``desired_revision`` is the one that should
serve, ``serving_revision`` the one the stable endpoint routes to now.
``Instance`` rows record what runs (process ids or container ids), so a
restarted control plane adopts instead of duplicating.
"""

from django.conf import settings
from django.db import models


class Deployment(models.Model):
    """A stable endpoint serving one registered model through a runtime."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DEPLOYING = "deploying", "Deploying"
        READY = "ready", "Ready"
        DEGRADED = "degraded", "Degraded"
        FAILED = "failed", "Failed"
        STOPPED = "stopped", "Stopped"

    name = models.SlugField(max_length=63, unique=True)
    model = models.ForeignKey(
        "registry.RegisteredModel", on_delete=models.PROTECT, related_name="deployments"
    )
    target_version = models.PositiveIntegerField(
        null=True, blank=True, help_text="a fixed version, or empty"
    )
    target_alias = models.CharField(
        max_length=255, blank=True, help_text="an alias to follow, or empty"
    )
    followed_version = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="the alias's version last rolled out (so a rollback sticks)",
    )
    runtime = models.CharField(max_length=16)
    replicas = models.PositiveSmallIntegerField(default=1)
    cpu = models.FloatField(null=True, blank=True, help_text="CPU limit in cores")
    memory_mb = models.PositiveIntegerField(null=True, blank=True)
    gpu = models.FloatField(null=True, blank=True, help_text="GPUs per instance (ray)")
    placement = models.JSONField(
        default=dict, blank=True, help_text="node labels every instance must run on (ray)"
    )
    env = models.JSONField(default=dict, blank=True)
    environment = models.CharField(
        max_length=16,
        default="auto",
        choices=[("auto", "auto"), ("isolated", "isolated"), ("shared", "shared")],
        help_text="auto: the control plane's Python when it has every requirement, else a "
        "built environment; isolated: always built; shared: always the control plane's",
    )
    predict_method = models.CharField(
        max_length=64,
        blank=True,
        help_text="the model's method answering predictions by default (e.g. predict_proba); "
        "empty: the model server's default",
    )
    port = models.PositiveIntegerField(
        unique=True, help_text="the stable endpoint's port on 127.0.0.1"
    )
    router_pid = models.CharField(
        max_length=64, blank=True, help_text="runtime id of the router process"
    )
    desired_revision = models.ForeignKey(
        "Revision", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    serving_revision = models.ForeignKey(
        "Revision", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    status_message = models.TextField(blank=True)
    phase = models.CharField(
        max_length=64, blank=True, help_text="rollout progress shown in the UI"
    )
    phase_started_at = models.DateTimeField(
        null=True, blank=True, help_text="when the current phase began (elapsed time in the UI)"
    )
    stopped = models.BooleanField(default=False, help_text="desired: nothing runs")
    deleted = models.BooleanField(default=False, help_text="desired: stop everything, then remove")
    progress_deadline_s = models.PositiveIntegerField(default=120)
    # Autoscaling (deployments/scaling.py): the policy, and the replica count it wants now
    # (desired state: the reconciler runs this many instead of the revision's ``replicas``).
    autoscaling = models.JSONField(
        null=True, blank=True, help_text="min/max replicas and targets; empty: fixed replicas"
    )
    autoscaled_replicas = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="replicas the autoscaler wants now"
    )
    scaled_up_at = models.DateTimeField(null=True, blank=True)
    scaled_down_at = models.DateTimeField(null=True, blank=True)
    cold_starts = models.PositiveIntegerField(
        default=0, help_text="times the autoscaler started a first replica from zero"
    )
    strategy = models.JSONField(
        default=dict,
        blank=True,
        help_text="how new revisions roll out (updates and alias moves): {} is rolling",
    )
    lease_until = models.DateTimeField(null=True, blank=True)
    lease_owner = models.CharField(max_length=64, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def endpoint(self) -> str:
        """The stable endpoint's URL: where its router runs, on this host's loopback or, for a
        ray deployment, on an ingress node of the cluster (deployments/router.py)."""
        from .router import address

        return f"http://{address(self.router_pid, self.port)}"

    @property
    def router_on_ingress(self) -> bool:
        """Whether the router is an actor on an ingress node of the Ray cluster."""
        from .router import on_ray

        return on_ray(self.router_pid)

    @property
    def router_host(self) -> str:
        """The address the router answers on (``127.0.0.1``, or its ingress node's)."""
        from .router import host_of

        return host_of(self.router_pid)


class Revision(models.Model):
    """An immutable snapshot of a deployment's desired spec, with the resolved
    model version and the sha256 of its files."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        ROLLING_OUT = "rolling_out", "Rolling out"
        LIVE = "live", "Live"
        SUPERSEDED = "superseded", "Superseded"
        FAILED = "failed", "Failed"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    spec = models.JSONField(
        help_text="runtime, replicas, resources, env at the time of the revision"
    )
    model_sha256 = models.CharField(max_length=64, blank=True)
    model_dir = models.CharField(max_length=1024, blank=True)
    reason = models.CharField(max_length=500)
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    failure = models.TextField(blank=True)
    rollout_started_at = models.DateTimeField(null=True, blank=True)
    live_at = models.DateTimeField(null=True, blank=True)
    superseded_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="when traffic left it; its instances stay warm for the rollback window",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["deployment", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["deployment", "number"], name="unique_revision_number")
        ]

    def __str__(self) -> str:
        return f"{self.deployment.name} r{self.number}"


class Instance(models.Model):
    """One model-server process or container, as last observed."""

    class State(models.TextChoices):
        STARTING = "starting", "Starting"
        READY = "ready", "Ready"
        UNHEALTHY = "unhealthy", "Unhealthy"
        CRASHED = "crashed", "Crashed"
        STOPPING = "stopping", "Stopping"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="instances")
    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="instances")
    ordinal = models.PositiveSmallIntegerField()
    runtime = models.CharField(max_length=16)
    runtime_id = models.CharField(max_length=128)
    port = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.STARTING)
    healthy_streak = models.PositiveSmallIntegerField(default=0)
    restarts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    last_probe_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["deployment", "revision", "ordinal"]
        constraints = [
            models.UniqueConstraint(fields=["revision", "ordinal"], name="unique_instance_ordinal"),
            models.UniqueConstraint(fields=["port"], name="unique_instance_port"),
        ]

    def __str__(self) -> str:
        return f"{self.deployment.name} r{self.revision.number}#{self.ordinal}"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` or ``unix:/path``: the runtime derives it from the port."""
        from .runtimes import instance_address

        return instance_address(self.runtime, self.port, self.runtime_id)

    @property
    def node(self) -> str:
        """Where the instance runs: its Ray node (ip/node id), else this host's runtime."""
        from .cluster import instance_node

        return instance_node(self.runtime, self.runtime_id)


class DeploymentEvent(models.Model):
    """The timeline of a deployment: revisions, rollout steps, crashes, rollbacks."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    revision = models.ForeignKey(
        Revision, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    kind = models.CharField(max_length=32, db_index=True)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.deployment.name}: {self.kind}"


class ScaleSample(models.Model):
    """One autoscaler poll of a deployment's router: what it saw and the replicas it wanted.
    The decision window and the replicas-over-time chart read these."""

    deployment = models.ForeignKey(
        Deployment, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    ts = models.FloatField(help_text="unix seconds")
    replicas = models.PositiveSmallIntegerField(help_text="desired after this poll's decision")
    ready = models.PositiveSmallIntegerField(help_text="ready instances of the serving revision")
    in_flight = models.PositiveIntegerField(help_text="requests in flight at the router")
    waiting = models.PositiveIntegerField(default=0, help_text="requests held (no backend)")
    requests_total = models.BigIntegerField(default=0, help_text="the router's request counter")

    class Meta:
        indexes = [models.Index(fields=["deployment", "ts"], name="dep_scalesample_dep_ts")]

    def __str__(self) -> str:
        return f"{self.deployment_id} @{self.ts:.0f}: {self.replicas}"


class ShadowRun(models.Model):
    """Shadow traffic to a candidate revision: the router mirrors ``fraction`` of the live
    prediction requests to it; callers always get the primary's answer. At most one active
    run per deployment (the desired state; the reconciler starts the candidate's instances
    and writes the router's mirror key once they are ready). deployments/shadow.py."""

    class State(models.TextChoices):
        ACTIVE = "active", "Active"
        STOPPED = "stopped", "Stopped"
        PROMOTED = "promoted", "Promoted"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="shadow_runs")
    revision = models.ForeignKey(Revision, on_delete=models.CASCADE, related_name="+")
    fraction = models.FloatField(help_text="share of prediction requests mirrored, 0 < f ≤ 1")
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE)
    mirroring_since = models.DateTimeField(
        null=True, blank=True, help_text="when the router was first told to mirror"
    )
    cursor_epoch = models.CharField(max_length=64, blank=True, help_text="the router mirror's")
    cursor = models.BigIntegerField(default=0, help_text="seq of the last pair pulled")
    counters = models.JSONField(
        default=dict, blank=True, help_text="{epoch: the router's mirror counters}"
    )
    lost = models.BigIntegerField(default=0, help_text="pairs that left the buffer unread")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment"],
                condition=models.Q(state="active"),
                name="one_active_shadow_per_deployment",
            )
        ]

    def __str__(self) -> str:
        return f"{self.deployment.name} shadow r{self.revision.number} ({self.state})"


class ShadowPair(models.Model):
    """One mirrored request: the primary's and the candidate's answers to it (bodies cut to
    the router's ``body_bytes``)."""

    run = models.ForeignKey(ShadowRun, on_delete=models.CASCADE, related_name="pairs")
    seq = models.BigIntegerField()
    ts = models.DateTimeField(help_text="when the primary answered")
    path = models.CharField(max_length=200, blank=True)
    primary_status = models.PositiveSmallIntegerField(null=True, blank=True)
    primary_ms = models.FloatField(null=True, blank=True)
    primary_body = models.TextField(blank=True)
    candidate_status = models.PositiveSmallIntegerField(null=True, blank=True)
    candidate_ms = models.FloatField(null=True, blank=True)
    candidate_body = models.TextField(blank=True)
    candidate_error = models.TextField(blank=True)
    truncated = models.BooleanField(default=False)

    class Meta:
        ordering = ["run", "ts", "id"]
        indexes = [models.Index(fields=["run", "ts"], name="deploy_shadowpair_run_ts")]

    def __str__(self) -> str:
        return f"run {self.run_id} #{self.seq}"


class Rollout(models.Model):
    """The progressive delivery of one revision (canary steps or a fixed split) against the
    revision serving before it: where it is, its weights, and every analysis decision with
    its figures. The reconciler drives it from these fields alone (a restarted worker
    resumes the same step: its timing comes from ``step_started_at``)."""

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        PAUSED = "paused", "Paused"
        PROMOTING = "promoting", "Promoting"
        ABORTING = "aborting", "Aborting"
        PROMOTED = "promoted", "Promoted"
        ABORTED = "aborted", "Aborted"
        SUPERSEDED = "superseded", "Superseded"

    ACTIVE = (State.RUNNING, State.PAUSED, State.PROMOTING, State.ABORTING)

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="rollouts")
    revision = models.OneToOneField(Revision, on_delete=models.CASCADE, related_name="rollout")
    baseline = models.ForeignKey(
        Revision, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    strategy = models.JSONField(help_text="type (canary|split), steps, analysis thresholds")
    state = models.CharField(
        max_length=16, choices=State.choices, default=State.RUNNING, db_index=True
    )
    step = models.IntegerField(default=-1, help_text="index into steps; -1: not started")
    step_started_at = models.DateTimeField(null=True, blank=True)
    weights = models.JSONField(default=dict, blank=True, help_text="group name -> weight now")
    window_start = models.JSONField(
        default=dict, blank=True, help_text="router counters per group when the step began"
    )
    checks = models.JSONField(default=list, blank=True, help_text="the last analysis's checks")
    decision = models.CharField(max_length=16, blank=True)
    reason = models.TextField(blank=True)
    decisions = models.JSONField(default=list, blank=True, help_text="every decision, in order")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.deployment.name} r{self.revision.number} {self.strategy.get('type')}"
