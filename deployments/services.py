"""Deployment writes: what users ask for (create, update, rollback, stop,
delete). Each records a revision and/or event and an audit row in one
transaction, and kicks the reconciler after commit; the reconciler
(reconciler.py) does the runtime work."""

from __future__ import annotations

import re
import socket
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Max

from audit.services import audit_record
from controlplane.lib.errors import ApplicationError, Conflict, NotFound
from controlplane.lib.tasks import enqueue_on_commit
from registry.models import Alias, ModelVersion, RegisteredModel

from .environments import ENVIRONMENT_CHOICES
from .models import Deployment, DeploymentEvent, Instance, Revision
from .runtimes import RUNTIMES

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
METHOD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_REPLICAS = 16
UNSET: Any = object()  # an optional argument not given (None means "set to nothing")


def _kick(deployment: Deployment) -> None:
    from .tasks import reconcile

    enqueue_on_commit(reconcile, deployment.pk)


def event_record(
    deployment: Deployment, kind: str, message: str, revision: Revision | None = None
) -> DeploymentEvent:
    return DeploymentEvent.objects.create(
        deployment=deployment, revision=revision, kind=kind, message=message
    )


def _spec_snapshot(d: Deployment) -> dict:
    return {
        "runtime": d.runtime,
        "replicas": d.replicas,
        "cpu": d.cpu,
        "memory_mb": d.memory_mb,
        "env": d.env,
        "environment": d.environment,
        "predict_method": d.predict_method or None,
        # Only when set: revisions from before these existed compare equal.
        **({"gpu": d.gpu} if d.gpu else {}),
        **({"placement": d.placement} if d.placement else {}),
    }


def _deployment_snapshot(d: Deployment) -> dict:
    return {
        "model": d.model.name,
        "version": str(d.target_version) if d.target_version else None,
        "alias": d.target_alias or None,
        **_spec_snapshot(d),
        "revision": d.desired_revision.number if d.desired_revision_id else None,
        "stopped": d.stopped,
        "autoscaling": d.autoscaling,
        "strategy": d.strategy or {"type": "rolling"},
    }


def _port_range() -> range:
    low, _, high = settings.CONTROLPLANE_PORT_RANGE.partition("-")
    return range(int(low), int(high) + 1)


def allocate_port() -> int:
    """A port in the configured range that no deployment or instance uses and nothing listens on."""
    used = set(Deployment.objects.values_list("port", flat=True)) | set(
        Instance.objects.values_list("port", flat=True)
    )
    for port in _port_range():
        if port in used:
            continue
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise ApplicationError(
        "no free port left in CONTROLPLANE_PORT_RANGE", code="no_port", status_code=503
    )


def _resolve_target(
    model: RegisteredModel, version: Any, alias: str | None
) -> tuple[ModelVersion, int | None, str]:
    if (version in (None, "")) == (not alias):
        raise ApplicationError("give exactly one of 'version' or 'alias'", code="invalid_target")
    if alias:
        pointer = Alias.objects.select_related("version").filter(model=model, name=alias).first()
        if pointer is None:
            raise NotFound(f"{model.name!r} has no alias {alias!r}", code="alias_not_found")
        return pointer.version, None, alias
    try:
        number = int(str(version))
    except ValueError:
        raise ApplicationError(
            f"version {version!r} is not a version number", code="invalid_version"
        ) from None
    mv = ModelVersion.objects.filter(model=model, version=number).first()
    if mv is None:
        raise NotFound(f"version {number} of {model.name!r} not found", code="version_not_found")
    if mv.status == ModelVersion.Status.ARCHIVED:
        raise Conflict(f"{mv} is archived", code="version_archived")
    return mv, number, ""


def _validate_spec(
    runtime: str, replicas: Any, resources: Any, env: Any
) -> tuple[str, int, float | None, int | None, dict]:
    if runtime not in RUNTIMES:
        raise ApplicationError(
            f"runtime must be one of {', '.join(RUNTIMES)}", code="invalid_runtime"
        )
    if (
        not isinstance(replicas, int)
        or isinstance(replicas, bool)
        or not 1 <= replicas <= MAX_REPLICAS
    ):
        raise ApplicationError(
            f"replicas must be an integer from 1 to {MAX_REPLICAS}", code="invalid_replicas"
        )
    resources = resources or {}
    if not isinstance(resources, dict) or set(resources) - {"cpu", "memory_mb", "gpu"}:
        raise ApplicationError(
            "resources takes only 'cpu' (cores), 'memory_mb' and 'gpu'", code="invalid_resources"
        )
    cpu, memory = resources.get("cpu"), resources.get("memory_mb")
    if cpu is not None and (
        not isinstance(cpu, int | float) or isinstance(cpu, bool) or not 0.05 <= cpu <= 64
    ):
        raise ApplicationError(
            "resources.cpu must be a number of cores from 0.05 to 64", code="invalid_resources"
        )
    if memory is not None and (
        not isinstance(memory, int) or isinstance(memory, bool) or not 64 <= memory <= 262144
    ):
        raise ApplicationError(
            "resources.memory_mb must be an integer from 64 to 262144", code="invalid_resources"
        )
    env = env or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str)
        and re.match(r"^[A-Z_][A-Z0-9_]{0,127}$", k)
        and isinstance(v, str)
        and len(v) < 4096
        for k, v in env.items()
    ):
        raise ApplicationError("env must map UPPER_CASE names to strings", code="invalid_env")
    if any(k.startswith(("CONTROLPLANE_", "SERVING_")) for k in env):
        raise ApplicationError(
            "env may not set CONTROLPLANE_* or SERVING_* variables", code="invalid_env"
        )
    return runtime, replicas, float(cpu) if cpu is not None else None, memory, env


LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _validate_scheduling(runtime: str, gpu: Any, placement: Any) -> tuple[float | None, dict]:
    """``resources.gpu`` (fractional GPUs) and ``placement`` (node labels): ray only."""
    if gpu is not None and (
        not isinstance(gpu, int | float) or isinstance(gpu, bool) or not 0 < gpu <= 64
    ):
        raise ApplicationError(
            "resources.gpu must be a number of GPUs above 0, at most 64", code="invalid_resources"
        )
    placement = placement or {}
    if (
        not isinstance(placement, dict)
        or len(placement) > 16
        or not all(
            isinstance(k, str) and isinstance(v, str) and LABEL_RE.match(k) and LABEL_RE.match(v)
            for k, v in placement.items()
        )
    ):
        raise ApplicationError(
            "placement must map up to 16 label names to values (letters, digits, '_.-')",
            code="invalid_placement",
        )
    if (gpu or placement) and runtime != "ray":
        raise ApplicationError(
            "resources.gpu and placement need the ray runtime", code="invalid_placement"
        )
    return (float(gpu) if gpu else None), dict(sorted(placement.items()))


def _validate_environment(environment: Any) -> str:
    if environment not in ENVIRONMENT_CHOICES:
        raise ApplicationError(
            f"environment must be one of {', '.join(ENVIRONMENT_CHOICES)}",
            code="invalid_environment",
            details={"choices": list(ENVIRONMENT_CHOICES)},
        )
    return environment


def _validate_predict_method(method: Any) -> str:
    """A method name, or "" for the server's default; which methods a model has is the
    model server's to check."""
    if method in (None, ""):
        return ""
    if not isinstance(method, str) or not METHOD_RE.match(method):
        raise ApplicationError(
            "predict_method must be a method name such as predict_proba, or null",
            code="invalid_predict_method",
        )
    return method


def _new_revision(
    d: Deployment, mv: ModelVersion, *, reason: str, actor: AbstractBaseUser | None
) -> Revision:
    number = (d.revisions.aggregate(n=Max("number"))["n"] or 0) + 1
    revision = Revision.objects.create(
        deployment=d,
        number=number,
        model_version=mv,
        spec=_spec_snapshot(d),
        reason=reason[:500],
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    d.desired_revision = revision
    # Not ready again until the reconciler has this revision serving.
    d.status = Deployment.Status.DEPLOYING if d.serving_revision_id else Deployment.Status.PENDING
    if d.target_alias:
        d.followed_version = mv.version
    event_record(
        d, "revision", f"revision {number}: {mv.model.name} v{mv.version} ({reason})", revision
    )
    from .rollouts import rollout_for_new_revision

    rollout_for_new_revision(d, revision)
    return revision


@transaction.atomic
def deployment_create(
    *,
    name: str,
    model_name: str,
    version: Any = None,
    alias: str | None = None,
    runtime: str | None = None,
    replicas: int = 1,
    resources: dict | None = None,
    env: dict | None = None,
    environment: str | None = None,
    predict_method: str | None = None,
    autoscaling: dict | None = None,
    strategy: dict | None = None,
    placement: dict | None = None,
    actor: AbstractBaseUser,
) -> Deployment:
    from .rollouts import validate_strategy
    from .scaling import autoscaling_apply, autoscaling_validate

    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApplicationError(
            "name must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit",
            code="invalid_name",
        )
    if Deployment.objects.filter(name=name).exists():
        raise Conflict(f"deployment {name!r} already exists", code="deployment_exists")
    model = RegisteredModel.objects.filter(name=model_name).first()
    if model is None:
        raise NotFound(f"model {model_name!r} not found", code="model_not_found")
    mv, number, alias = _resolve_target(model, version, alias)
    runtime, replicas, cpu, memory, env = _validate_spec(
        runtime or settings.CONTROLPLANE_DEFAULT_RUNTIME, replicas, resources, env
    )
    gpu, placement = _validate_scheduling(runtime, (resources or {}).get("gpu"), placement)
    environment = _validate_environment(environment or settings.CONTROLPLANE_DEFAULT_ENVIRONMENT)
    predict_method = _validate_predict_method(predict_method)
    autoscaling = autoscaling_validate(autoscaling)
    strategy = validate_strategy(strategy)
    try:
        with transaction.atomic():
            d = Deployment.objects.create(
                name=name,
                model=model,
                target_version=number,
                target_alias=alias,
                runtime=runtime,
                replicas=replicas,
                cpu=cpu,
                memory_mb=memory,
                gpu=gpu,
                placement=placement,
                env=env,
                environment=environment,
                predict_method=predict_method,
                strategy=strategy,
                port=allocate_port(),
                progress_deadline_s=settings.CONTROLPLANE_PROGRESS_DEADLINE,
                created_by=actor if getattr(actor, "is_authenticated", False) else None,
            )
    except IntegrityError:
        raise Conflict(
            f"deployment {name!r} already exists (or its port was taken); try again",
            code="deployment_exists",
        ) from None
    event_record(d, "created", f"created by {actor.get_username()}")
    note = autoscaling_apply(d, autoscaling)
    if note:
        event_record(d, "autoscaling", note)
    _new_revision(d, mv, reason="created", actor=actor)
    d.save()
    audit_record(
        actor=actor,
        action="deployment.create",
        object_type="deployment",
        object_id=name,
        object_repr=name,
        after=_deployment_snapshot(d),
    )
    _kick(d)
    return d


def _locked(d: Deployment) -> Deployment:
    locked = (
        Deployment.objects.select_for_update(of=("self",))
        .select_related("model", "desired_revision")
        .get(pk=d.pk)
    )
    if locked.deleted:
        raise NotFound(f"deployment {d.name!r} not found")
    return locked


@transaction.atomic
def deployment_update(
    *,
    deployment: Deployment,
    version: Any = None,
    alias: str | None = None,
    replicas: int | None = None,
    resources: dict | None = None,
    env: dict | None = None,
    environment: str | None = None,
    predict_method: str | None = UNSET,
    autoscaling: dict | None = UNSET,
    strategy: dict | None = UNSET,
    placement: dict | None = None,
    actor: AbstractBaseUser,
) -> Deployment:
    from .rollouts import validate_strategy
    from .scaling import autoscaling_apply

    d = _locked(deployment)
    before = _deployment_snapshot(d)
    if strategy is not UNSET:
        # Part of the deployment's spec: this rollout and later ones (alias moves) use it.
        d.strategy = validate_strategy(strategy)
    changes = []
    autoscaling_note = None if autoscaling is UNSET else autoscaling_apply(d, autoscaling)
    if autoscaling_note:
        event_record(d, "autoscaling", autoscaling_note)
    mv = d.desired_revision.model_version if d.desired_revision_id else None
    if version not in (None, "") or alias:
        mv, number, new_alias = _resolve_target(d.model, version, alias)
        d.target_version, d.target_alias = number, new_alias
        changes.append(f"alias {new_alias}" if new_alias else f"version {number}")
    new_resources = {"cpu": d.cpu, "memory_mb": d.memory_mb, "gpu": d.gpu}
    if resources is not None:
        if not isinstance(resources, dict):
            raise ApplicationError("resources must be an object", code="invalid_resources")
        new_resources.update(resources)
    _, new_replicas, cpu, memory, new_env = _validate_spec(
        d.runtime,
        d.replicas if replicas is None else replicas,
        new_resources,
        d.env if env is None else env,
    )
    if new_replicas != d.replicas:
        changes.append(f"replicas {d.replicas}→{new_replicas}")
    gpu, new_placement = _validate_scheduling(
        d.runtime, new_resources.get("gpu"), d.placement if placement is None else placement
    )
    if (cpu, memory, gpu) != (d.cpu, d.memory_mb, d.gpu):
        changes.append("resources")
    if new_placement != d.placement:
        changes.append("placement")
    if new_env != d.env:
        changes.append("env")
    new_environment = _validate_environment(d.environment if environment is None else environment)
    if new_environment != d.environment:
        changes.append(f"environment {new_environment}")
    new_method = (
        d.predict_method if predict_method is UNSET else _validate_predict_method(predict_method)
    )
    if new_method != d.predict_method:
        changes.append(f"predict_method {new_method or 'default'}")
    d.replicas, d.cpu, d.memory_mb, d.env = new_replicas, cpu, memory, new_env
    d.gpu, d.placement = gpu, new_placement
    d.environment, d.predict_method = new_environment, new_method
    current = d.desired_revision
    if current and current.model_version_id == mv.pk and current.spec == _spec_snapshot(d):
        d.save()
        # A policy or strategy change needs no new revision; nothing restarts.
        if autoscaling_note or before["strategy"] != _deployment_snapshot(d)["strategy"]:
            audit_record(
                actor=actor,
                action="deployment.update",
                object_type="deployment",
                object_id=d.name,
                object_repr=d.name,
                before=before,
                after=_deployment_snapshot(d),
            )
            _kick(d)
        return d  # nothing else changed: no new revision
    d.stopped = False
    _new_revision(d, mv, reason="update: " + (", ".join(changes) or "redeploy"), actor=actor)
    d.save()
    audit_record(
        actor=actor,
        action="deployment.update",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before=before,
        after=_deployment_snapshot(d),
    )
    _kick(d)
    return d


def _previous_good(d: Deployment, exclude: Revision | None) -> Revision | None:
    qs = d.revisions.filter(live_at__isnull=False).exclude(state=Revision.State.FAILED)
    if exclude is not None:
        qs = qs.exclude(pk=exclude.pk).filter(number__lt=exclude.number)
    return qs.order_by("-number").first()


@transaction.atomic
def deployment_rollback(
    *,
    deployment: Deployment,
    revision: int | None = None,
    actor: AbstractBaseUser | None,
    reason: str = "",
    automatic: bool = False,
    system: str = "reconciler",
) -> Deployment:
    """Serve an earlier revision again. Its files (and image) are kept, so nothing is rebuilt.
    An automatic rollback is audited as ``system:<system>``: the reconciler's own, or the
    monitoring app's when an alert rule asks for it."""
    d = _locked(deployment)
    current = d.desired_revision
    if revision is None:
        target = _previous_good(d, current)
        if target is None:
            raise Conflict(
                "there is no earlier revision that served successfully", code="no_previous_revision"
            )
    else:
        if isinstance(revision, bool) or not isinstance(revision, int):
            raise ApplicationError("revision must be a revision number", code="invalid_revision")
        target = d.revisions.filter(number=revision).first()
        if target is None:
            raise NotFound(
                f"revision {revision} of {d.name!r} not found", code="revision_not_found"
            )
        if target.pk == (current.pk if current else None):
            raise Conflict(
                f"revision {revision} is already the desired revision", code="already_current"
            )
    if target.model_version.status == ModelVersion.Status.ARCHIVED and not automatic:
        raise Conflict(f"{target.model_version} is archived", code="version_archived")
    before = _deployment_snapshot(d)
    d.desired_revision = target
    # The deployment now wants what that revision says (a later update starts from it).
    spec = target.spec
    d.replicas, d.cpu, d.memory_mb, d.env = (
        spec["replicas"],
        spec.get("cpu"),
        spec.get("memory_mb"),
        spec.get("env") or {},
    )
    d.gpu, d.placement = spec.get("gpu"), spec.get("placement") or {}
    # Revisions made before environments existed ran on the control plane's interpreter.
    d.environment = spec.get("environment", "shared")
    d.predict_method = spec.get("predict_method") or ""
    if not d.target_alias:
        d.target_version = target.model_version.version
    d.stopped = False
    d.status = Deployment.Status.DEPLOYING if d.serving_revision_id else Deployment.Status.PENDING
    if target.state != Revision.State.LIVE:
        # Rolls out again (with its progress deadline); a warm standby is ready at once.
        Revision.objects.filter(pk=target.pk).update(state=Revision.State.PENDING, failure="")
    kind = "auto_rollback" if automatic else "rollback"
    why = reason or ("automatic" if automatic else f"by {actor.get_username()}")
    from .rollouts import rollouts_cancel

    rollouts_cancel(d, f"rollback to r{target.number}: {why}")
    event_record(
        d,
        kind,
        f"rollback from r{current.number if current else '-'} to r{target.number}: {why}",
        target,
    )
    d.save()
    audit_record(
        actor=actor,
        action=f"deployment.{kind}",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before=before,
        after={**_deployment_snapshot(d), "reason": why},
        system=system if automatic else None,
    )
    _kick(d)
    return d


@transaction.atomic
def deployment_stop(*, deployment: Deployment, actor: AbstractBaseUser) -> Deployment:
    d = _locked(deployment)
    if d.stopped:
        return d
    d.stopped = True
    d.save()
    event_record(d, "stop", f"stop requested by {actor.get_username()}")
    audit_record(
        actor=actor,
        action="deployment.stop",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before={"stopped": False},
        after={"stopped": True},
    )
    _kick(d)
    return d


@transaction.atomic
def deployment_start(*, deployment: Deployment, actor: AbstractBaseUser) -> Deployment:
    d = _locked(deployment)
    if not d.stopped:
        return d
    d.stopped = False
    d.save()
    event_record(d, "start", f"start requested by {actor.get_username()}")
    audit_record(
        actor=actor,
        action="deployment.start",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before={"stopped": True},
        after={"stopped": False},
    )
    _kick(d)
    return d


@transaction.atomic
def deployment_delete(*, deployment: Deployment, actor: AbstractBaseUser) -> None:
    d = _locked(deployment)
    before = _deployment_snapshot(d)
    d.deleted = True
    d.stopped = True
    d.save()
    event_record(d, "delete", f"delete requested by {actor.get_username()}")
    audit_record(
        actor=actor,
        action="deployment.delete",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before=before,
    )
    _kick(d)


def deployments_following(*, model_name: str, alias: str) -> list[int]:
    return list(
        Deployment.objects.filter(
            model__name=model_name, target_alias=alias, deleted=False
        ).values_list("pk", flat=True)
    )


@transaction.atomic
def deployment_follow_alias(*, deployment_id: int) -> Deployment | None:
    """If the followed alias moved since the last rollout, make a revision for
    its new version (called by the reconciler every pass: level-triggered)."""
    d = (
        Deployment.objects.select_for_update(of=("self",))
        .select_related("model", "desired_revision")
        .filter(pk=deployment_id, deleted=False)
        .first()
    )
    if d is None or not d.target_alias:
        return d
    pointer = (
        Alias.objects.select_related("version").filter(model=d.model, name=d.target_alias).first()
    )
    if pointer is None or pointer.version.version == d.followed_version:
        return d
    mv = pointer.version
    before = _deployment_snapshot(d)
    _new_revision(d, mv, reason=f"alias {d.target_alias} moved to v{mv.version}", actor=None)
    d.stopped = False
    d.save()
    audit_record(
        actor=None,
        action="deployment.follow_alias",
        object_type="deployment",
        object_id=d.name,
        object_repr=d.name,
        before=before,
        after=_deployment_snapshot(d),
        system="reconciler",
    )
    return d
