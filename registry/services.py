"""Registry writes. The UI, the API, the admin and Celery tasks call these.

Ordering with MLflow: quick MLflow calls (aliases, tags) run inside the
database transaction, so an MLflow failure rolls the change and its audit
record back. Registration, which moves files, runs in MLflow first and is
then mirrored in a short transaction; if that commit were lost, the periodic
sync adopts the version, so nothing is lost either way.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from django.utils import timezone

from accounts.permissions import Right, require, user_can
from audit.services import audit_record
from controlplane.lib.errors import ApplicationError, Conflict, Forbidden, NotFound
from controlplane.lib.tasks import send_on_commit

from .archives import check_archive, extract_archive
from .mlflow_store import ALIAS_RE, MODEL_NAME_RE, MlflowStoreError, VersionMeta, get_store
from .models import (
    Alias,
    AliasMove,
    ApprovalPolicy,
    ModelVersion,
    PromotionRequest,
    RegisteredModel,
)
from .selectors import approval_required, parse_version

logger = logging.getLogger(__name__)

RESERVED_ALIASES = {"latest"}  # MLflow resolves models:/name/latest itself


def _mlflow_error(exc: MlflowStoreError) -> ApplicationError:
    if exc.kind == "not_found":
        return ApplicationError(str(exc), code="mlflow_not_found", status_code=400)
    if exc.kind == "invalid":
        return ApplicationError(str(exc), code="invalid_source", status_code=400)
    if exc.kind == "conflict":
        return Conflict(str(exc), code="mlflow_conflict")
    return ApplicationError(str(exc), code="mlflow_unavailable", status_code=503)


def _validate_name(name: str) -> str:
    name = (name or "").strip()
    if not MODEL_NAME_RE.match(name):
        raise ApplicationError(
            "model name must be 1-256 characters: letters, digits, '.', '_' or '-', starting with a letter or digit",
            code="invalid_name",
        )
    return name


def _validate_tags(tags: Any) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise ApplicationError(
            "tags must be an object of string keys and values", code="invalid_tags"
        )
    if len(tags) > settings.CONTROLPLANE_VERSION_MAX_TAGS:
        raise ApplicationError(
            f"at most {settings.CONTROLPLANE_VERSION_MAX_TAGS} tags (CONTROLPLANE_VERSION_MAX_TAGS)",
            code="invalid_tags",
        )
    clean = {}
    for key, value in tags.items():
        if (
            not isinstance(key, str)
            or not key
            or len(key) > 250
            or not isinstance(value, str | int | float | bool)
        ):
            raise ApplicationError(
                f"tag {key!r} must be a short string key with a scalar value", code="invalid_tags"
            )
        clean[key] = str(value)[:5000]
    return clean


def _validate_alias(alias: str) -> str:
    if (
        not ALIAS_RE.match(alias or "")
        or alias.lower() in RESERVED_ALIASES
        or alias.lower().startswith("v")
        and alias[1:].isdigit()
    ):
        raise ApplicationError(
            f"{alias!r} is not a valid alias: letters, digits, '_' or '-', starting with a letter; not 'latest' or 'v<N>'",
            code="invalid_alias",
        )
    return alias


def _version_snapshot(mv: ModelVersion) -> dict:
    return {
        "model": mv.model.name,
        "version": str(mv.version),
        "status": mv.status,
        "source": mv.source,
    }


# --- registered models -----------------------------------------------------------------


@transaction.atomic
def registered_model_create(
    *, name: str, description: str = "", tags: dict | None = None, actor: AbstractBaseUser
) -> RegisteredModel:
    name = _validate_name(name)
    tags = _validate_tags(tags)
    if RegisteredModel.objects.filter(name=name).exists():
        raise Conflict(f"model {name!r} already exists", code="model_exists")
    try:
        model = RegisteredModel.objects.create(
            name=name, description=description or "", tags=tags, created_by=actor
        )
    except IntegrityError:
        raise Conflict(f"model {name!r} already exists", code="model_exists") from None
    audit_record(
        actor=actor,
        action="model.create",
        object_type="registered_model",
        object_id=name,
        object_repr=name,
        after={"name": name, "description": description, "tags": tags},
    )
    try:
        get_store().create_model(name, description=description, tags=tags)
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    return model


@transaction.atomic
def registered_model_update(
    *,
    model: RegisteredModel,
    description: str | None = None,
    tags: dict | None = None,
    actor: AbstractBaseUser,
) -> RegisteredModel:
    model = RegisteredModel.objects.select_for_update().get(pk=model.pk)
    before = {"description": model.description, "tags": model.tags}
    if tags is not None:
        model.tags = _validate_tags(tags)
    if description is not None:
        model.description = description
    model.save()
    audit_record(
        actor=actor,
        action="model.update",
        object_type="registered_model",
        object_id=model.name,
        object_repr=model.name,
        before=before,
        after={"description": model.description, "tags": model.tags},
    )
    try:
        get_store().update_model(
            model.name, description=description, tags=model.tags if tags is not None else None
        )
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    return model


@transaction.atomic
def registered_model_delete(*, model: RegisteredModel, actor: AbstractBaseUser) -> None:
    model = RegisteredModel.objects.select_for_update().get(pk=model.pk)
    aliases = list(model.aliases.values_list("name", flat=True))
    if aliases:
        raise Conflict(
            f"model {model.name!r} still has aliases ({', '.join(sorted(aliases))}); remove them first",
            code="alias_in_use",
        )
    _refuse_if_deployed(model=model, versions=None)
    name = model.name
    audit_record(
        actor=actor,
        action="model.delete",
        object_type="registered_model",
        object_id=name,
        object_repr=name,
        before={"name": name, "versions": list(model.versions.values_list("version", flat=True))},
    )
    try:
        model.delete()
    except ProtectedError:
        raise Conflict(
            f"model {name!r} has deployments (or their revision history); delete those first",
            code="model_in_use",
        ) from None
    try:
        get_store().delete_model(name)
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc


def _refuse_if_deployed(*, model: RegisteredModel, versions: list[int] | None) -> None:
    """Versions that deployments want or serve cannot be deleted."""
    from deployments.selectors import model_versions_in_use  # deployments depends on registry

    in_use = model_versions_in_use(model_name=model.name)
    blocking = sorted(in_use if versions is None else set(in_use) & set(versions))
    if blocking:
        raise Conflict(
            f"version(s) {', '.join(map(str, blocking))} of {model.name!r} are deployed; stop those deployments first",
            code="version_deployed",
        )


# --- versions ------------------------------------------------------------------------------


def model_version_register(
    *,
    model_name: str,
    source: str | None = None,
    archive: BinaryIO | None = None,
    archive_size: int | None = None,
    description: str = "",
    tags: dict | None = None,
    actor: AbstractBaseUser,
    create_model: bool = False,
) -> ModelVersion:
    """Register a version from an MLflow URI (``source``) or an uploaded zip (``archive``)."""
    if (source is None) == (archive is None):
        raise ApplicationError(
            "give exactly one of 'source' (an MLflow URI) or 'artifact' (a zip)", code="invalid"
        )
    tags = _validate_tags(tags)
    model = RegisteredModel.objects.filter(name=model_name).first()
    if model is None:
        if not create_model:
            raise NotFound(f"model {model_name!r} not found")
        model = registered_model_create(name=model_name, actor=actor)

    store = get_store()
    try:
        if archive is not None:
            size = archive_size if archive_size is not None else _size_of(archive)
            check_archive(
                archive,
                size=size,
                max_bytes=settings.CONTROLPLANE_UPLOAD_MAX_BYTES,
                max_entries=settings.CONTROLPLANE_UPLOAD_MAX_ENTRIES,
                max_uncompressed=settings.CONTROLPLANE_UPLOAD_MAX_UNCOMPRESSED_BYTES,
                max_ratio=settings.CONTROLPLANE_UPLOAD_MAX_RATIO,
            )
            archive.seek(0)
            # Under the upload temp dir, so upload_leftovers_sweep finds what a killed worker left.
            tmp_root = Path(settings.CONTROLPLANE_UPLOAD_TMP_DIR)
            tmp_root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="upload-", dir=tmp_root) as tmp:
                model_dir = Path(tmp) / "model"
                model_dir.mkdir()
                extract_archive(archive, model_dir)
                meta = store.upload_version(
                    model.name, model_dir, description=description, tags=tags
                )
        else:
            meta = store.register_version(
                model.name, source.strip(), description=description, tags=tags
            )
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    return _model_version_record(model=model, meta=meta, actor=actor, action="version.register")


def model_version_register_converted(
    *,
    source: ModelVersion,
    model_dir: Path,
    tags: dict,
    description: str = "",
    actor: AbstractBaseUser,
) -> ModelVersion:
    """Register ``model_dir`` (a converted MLflow model, registry/conversion/) as a new
    version of ``source``'s model, tagged with its lineage; audited as ``version.convert``."""
    require(actor, Right.REGISTRY_WRITE)
    tags = _validate_tags(tags)
    try:
        meta = get_store().upload_version(
            source.model.name, Path(model_dir), description=description, tags=tags
        )
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    return _model_version_record(
        model=source.model, meta=meta, actor=actor, action="version.convert"
    )


@dataclass
class UploadSweepResult:
    runs_deleted: int = 0
    temp_entries_deleted: int = 0


def upload_leftovers_sweep(*, older_than_seconds: int | None = None) -> UploadSweepResult:
    """Delete what uploads whose worker died left behind: their MLflow runs still
    RUNNING after ``older_than_seconds`` (files included) and their temp files.
    Idempotent: a second pass finds nothing."""
    import shutil
    import time

    age = (
        settings.CONTROLPLANE_UPLOAD_STALE_SECONDS
        if older_than_seconds is None
        else older_than_seconds
    )
    cutoff = time.time() - age
    result = UploadSweepResult()
    store = get_store()
    try:
        stale = store.stale_upload_runs(older_than_ms=int(cutoff * 1000))
    except MlflowStoreError as exc:
        logger.warning("upload sweep: MLflow unavailable: %s", exc)
        stale = []
    for run_id in stale:
        store.delete_run(run_id)
        logger.info("upload sweep: deleted run %s left RUNNING by a dead upload", run_id)
        result.runs_deleted += 1
    tmp_root = Path(settings.CONTROLPLANE_UPLOAD_TMP_DIR)
    if tmp_root.is_dir():
        for entry in tmp_root.iterdir():
            try:
                if entry.lstat().st_mtime >= cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except FileNotFoundError:
                continue
            result.temp_entries_deleted += 1
    if result.runs_deleted or result.temp_entries_deleted:
        with transaction.atomic():
            audit_record(
                actor=None,
                action="upload.sweep",
                object_type="upload",
                object_id="-",
                object_repr="stale uploads",
                after={**result.__dict__, "runs": stale},
                system="upload-sweep",
            )
    return result


def _size_of(fileobj: BinaryIO) -> int:
    fileobj.seek(0, 2)
    size = fileobj.tell()
    fileobj.seek(0)
    return size


@transaction.atomic
def _model_version_record(
    *,
    model: RegisteredModel,
    meta: VersionMeta,
    actor: AbstractBaseUser | None,
    action: str,
    system: str | None = None,
) -> ModelVersion:
    mv, _created = ModelVersion.objects.update_or_create(
        model=model,
        version=meta.version,
        defaults={
            "source": meta.source,
            "run_id": meta.run_id,
            "description": meta.description,
            "tags": meta.tags,
            "metrics": meta.metrics,
            "params": meta.params,
            "flavors": meta.flavors,
            "signature": meta.signature,
            "input_example": meta.input_example,
            "requirements": meta.requirements,
            "created_by": actor if getattr(actor, "is_authenticated", False) else None,
        },
    )
    audit_record(
        actor=actor,
        action=action,
        object_type="model_version",
        object_id=f"{model.name}/{mv.version}",
        object_repr=str(mv),
        after=_version_snapshot(mv),
        system=system,
    )
    return mv


@transaction.atomic
def model_version_update(
    *,
    mv: ModelVersion,
    description: str | None = None,
    tags: dict | None = None,
    actor: AbstractBaseUser,
) -> ModelVersion:
    mv = ModelVersion.objects.select_for_update().select_related("model").get(pk=mv.pk)
    before = {"description": mv.description, "tags": mv.tags}
    store = get_store()
    try:
        if description is not None:
            mv.description = description
            store.update_version(mv.model.name, mv.version, description=description)
        if tags is not None:
            new_tags = _validate_tags(tags)
            for key, value in new_tags.items():
                store.set_version_tag(mv.model.name, mv.version, key, value)
            mv.tags = {**mv.tags, **new_tags}
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    mv.save()
    audit_record(
        actor=actor,
        action="version.update",
        object_type="model_version",
        object_id=f"{mv.model.name}/{mv.version}",
        object_repr=str(mv),
        before=before,
        after={"description": mv.description, "tags": mv.tags},
    )
    return mv


def _refuse_if_aliased(mv: ModelVersion) -> None:
    aliases = sorted(mv.aliases.values_list("name", flat=True))
    if aliases:
        raise Conflict(
            f"{mv} is the target of alias(es) {', '.join(aliases)}; move them first",
            code="alias_in_use",
            details={"aliases": aliases},
        )


@transaction.atomic
def model_version_archive(*, mv: ModelVersion, actor: AbstractBaseUser) -> ModelVersion:
    mv = ModelVersion.objects.select_for_update().select_related("model").get(pk=mv.pk)
    if mv.status == ModelVersion.Status.ARCHIVED:
        return mv
    _refuse_if_aliased(mv)
    before = _version_snapshot(mv)
    updated = ModelVersion.objects.filter(pk=mv.pk, status=ModelVersion.Status.READY).update(
        status=ModelVersion.Status.ARCHIVED
    )
    if updated != 1:
        raise Conflict(f"{mv} changed concurrently; try again", code="concurrent_change")
    mv.status = ModelVersion.Status.ARCHIVED
    _cancel_requests_for(mv, actor, "version archived")
    audit_record(
        actor=actor,
        action="version.archive",
        object_type="model_version",
        object_id=f"{mv.model.name}/{mv.version}",
        object_repr=str(mv),
        before=before,
        after=_version_snapshot(mv),
    )
    try:
        get_store().set_version_tag(mv.model.name, mv.version, "controlplane.archived", "true")
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    return mv


@transaction.atomic
def model_version_restore(*, mv: ModelVersion, actor: AbstractBaseUser) -> ModelVersion:
    mv = ModelVersion.objects.select_for_update().select_related("model").get(pk=mv.pk)
    if mv.status == ModelVersion.Status.READY:
        return mv
    before = _version_snapshot(mv)
    ModelVersion.objects.filter(pk=mv.pk).update(status=ModelVersion.Status.READY)
    mv.status = ModelVersion.Status.READY
    audit_record(
        actor=actor,
        action="version.restore",
        object_type="model_version",
        object_id=f"{mv.model.name}/{mv.version}",
        object_repr=str(mv),
        before=before,
        after=_version_snapshot(mv),
    )
    try:
        get_store().set_version_tag(mv.model.name, mv.version, "controlplane.archived", "false")
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    return mv


@transaction.atomic
def model_version_delete(*, mv: ModelVersion, actor: AbstractBaseUser) -> None:
    mv = ModelVersion.objects.select_for_update().select_related("model").get(pk=mv.pk)
    _refuse_if_aliased(mv)
    _refuse_if_deployed(model=mv.model, versions=[mv.version])
    before = _version_snapshot(mv)
    name, number = mv.model.name, mv.version
    _cancel_requests_for(mv, actor, "version deleted")
    audit_record(
        actor=actor,
        action="version.delete",
        object_type="model_version",
        object_id=f"{name}/{number}",
        object_repr=str(mv),
        before=before,
    )
    PromotionRequest.objects.filter(version=mv).delete()
    try:
        mv.delete()
    except ProtectedError:
        raise Conflict(
            f"{mv} is part of a deployment's revision history; archive it instead",
            code="version_in_history",
        ) from None
    try:
        get_store().delete_version(name, number)
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc


def _cancel_requests_for(mv: ModelVersion, actor: AbstractBaseUser, why: str) -> None:
    PromotionRequest.objects.filter(version=mv, status=PromotionRequest.Status.PENDING).update(
        status=PromotionRequest.Status.CANCELLED,
        decided_by=actor if getattr(actor, "is_authenticated", False) else None,
        decided_at=timezone.now(),
        decision_comment=why,
    )


# --- aliases and promotion ------------------------------------------------------------------


@dataclass(frozen=True)
class PromotionOutcome:
    """Either the alias moved (``move``) or approval was requested (``request``)."""

    move: AliasMove | None = None
    request: PromotionRequest | None = None


def _require_reason(reason: str | None) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ApplicationError("a reason is required", code="reason_required")
    if len(reason) > 2000:
        raise ApplicationError("reason is longer than 2000 characters", code="invalid_reason")
    return reason


def _move_alias(
    *,
    model: RegisteredModel,
    alias: str,
    target: ModelVersion | None,
    reason: str,
    actor: AbstractBaseUser | None,
    origin: str = AliasMove.Origin.CONTROLPLANE,
    request: PromotionRequest | None = None,
    write_mlflow: bool = True,
) -> AliasMove | None:
    """Move (or remove, when ``target`` is None) one alias. Caller holds the
    model row lock inside a transaction."""
    current = Alias.objects.select_related("version").filter(model=model, name=alias).first()
    from_version = current.version.version if current else None
    to_version = target.version if target else None
    if from_version == to_version:
        return None
    if target is None:
        current.delete()
    elif current is None:
        Alias.objects.create(model=model, name=alias, version=target)
    else:
        current.version = target
        current.save(update_fields=["version", "updated_at"])
    user = actor if getattr(actor, "is_authenticated", False) else None
    move = AliasMove.objects.create(
        model=model,
        alias=alias,
        from_version=from_version,
        to_version=to_version,
        actor=user,
        actor_label=user.get_username() if user else "mlflow (external)",
        reason=reason,
        origin=origin,
        request=request,
    )
    audit_record(
        actor=actor,
        action="alias.set" if target else "alias.delete",
        object_type="alias",
        object_id=f"{model.name}@{alias}",
        object_repr=f"{model.name}@{alias}",
        before={"version": str(from_version) if from_version else None},
        after={
            "version": str(to_version) if to_version else None,
            "reason": reason,
            "origin": origin,
        },
        system="registry-sync" if origin == AliasMove.Origin.EXTERNAL else None,
    )
    if write_mlflow:
        try:
            if target is None:
                get_store().delete_alias(model.name, alias)
            else:
                get_store().set_alias(model.name, alias, target.version)
        except MlflowStoreError as exc:
            raise _mlflow_error(exc) from exc
    # Promotion is deployment: deployments following this alias converge now,
    # not at the next periodic pass.
    send_on_commit("deployments.tasks.reconcile_all")
    return move


def _require_move_right(*, model: RegisteredModel, alias: str, actor: AbstractBaseUser) -> None:
    """Promotion is deployment: an alias a deployment follows moves only with
    the deploy right; any other alias with the registry write right."""
    from deployments.models import Deployment  # deployments depends on registry

    followers = sorted(
        Deployment.objects.filter(model=model, target_alias=alias).values_list("name", flat=True)
    )
    if followers:
        require(
            actor,
            Right.DEPLOY,
            f"deployment(s) {', '.join(followers)} follow {model.name}@{alias}: moving it "
            "needs the deploy right (the deployer role and a token with the deploy scope)",
        )
    else:
        require(actor, Right.REGISTRY_WRITE, "moving an alias needs the registry write right")


@transaction.atomic
def alias_promote(
    *, model: RegisteredModel, alias: str, version: str | int, reason: str, actor: AbstractBaseUser
) -> PromotionOutcome:
    alias = _validate_alias(alias)
    reason = _require_reason(reason)
    number = parse_version(version)
    model = RegisteredModel.objects.select_for_update().get(pk=model.pk)
    _require_move_right(model=model, alias=alias, actor=actor)
    target = ModelVersion.objects.filter(model=model, version=number).first()
    if target is None:
        raise NotFound(f"version {number} of {model.name!r} not found")
    if target.status == ModelVersion.Status.ARCHIVED:
        raise Conflict(
            f"{target} is archived; restore it before promoting", code="version_archived"
        )
    current = (
        Alias.objects.filter(model=model, name=alias)
        .values_list("version__version", flat=True)
        .first()
    )
    if current == number:
        raise Conflict(
            f"{model.name}@{alias} already points at version {number}", code="alias_unchanged"
        )
    if approval_required(model=model, alias=alias):
        if PromotionRequest.objects.filter(
            model=model, alias=alias, version=target, status=PromotionRequest.Status.PENDING
        ).exists():
            raise Conflict(
                f"a promotion of version {number} to {alias!r} is already waiting for approval",
                code="request_pending",
            )
        request = PromotionRequest.objects.create(
            model=model, alias=alias, version=target, reason=reason, requested_by=actor
        )
        audit_record(
            actor=actor,
            action="promotion.request",
            object_type="promotion_request",
            object_id=request.pk,
            object_repr=str(request),
            after={"alias": alias, "version": str(number), "reason": reason},
        )
        return PromotionOutcome(request=request)
    move = _move_alias(model=model, alias=alias, target=target, reason=reason, actor=actor)
    return PromotionOutcome(move=move)


@transaction.atomic
def alias_remove(
    *, model: RegisteredModel, alias: str, reason: str, actor: AbstractBaseUser
) -> AliasMove:
    reason = _require_reason(reason)
    model = RegisteredModel.objects.select_for_update().get(pk=model.pk)
    if not Alias.objects.filter(model=model, name=alias).exists():
        raise NotFound(f"{model.name!r} has no alias {alias!r}")
    _require_move_right(model=model, alias=alias, actor=actor)
    if approval_required(model=model, alias=alias) and not user_can(actor, Right.APPROVE):
        raise Forbidden(f"removing {alias!r} needs the approver role", code="approval_required")
    return _move_alias(model=model, alias=alias, target=None, reason=reason, actor=actor)


def _decide(
    *, request_id: int, actor: AbstractBaseUser, approve: bool, comment: str
) -> PromotionRequest:
    request = (
        PromotionRequest.objects.select_for_update()
        .select_related("model", "version", "requested_by")
        .filter(pk=request_id)
        .first()
    )
    if request is None:
        raise NotFound("promotion request not found")
    if not user_can(actor, Right.APPROVE):
        raise Forbidden("deciding promotion requests needs the approver role", code="not_approver")
    if request.requested_by_id == actor.pk:
        raise Forbidden(
            "a promotion must be approved or rejected by someone other than its requester",
            code="self_approval",
        )
    new_status = PromotionRequest.Status.APPROVED if approve else PromotionRequest.Status.REJECTED
    updated = PromotionRequest.objects.filter(
        pk=request.pk, status=PromotionRequest.Status.PENDING
    ).update(
        status=new_status,
        decided_by=actor,
        decided_at=timezone.now(),
        decision_comment=comment.strip()[:2000],
    )
    if updated != 1:
        raise Conflict(f"this request is already {request.status}", code="request_decided")
    request.refresh_from_db()
    audit_record(
        actor=actor,
        action="promotion.approve" if approve else "promotion.reject",
        object_type="promotion_request",
        object_id=request.pk,
        object_repr=str(request),
        before={"status": PromotionRequest.Status.PENDING},
        after={"status": new_status, "comment": comment},
    )
    return request


@transaction.atomic
def promotion_request_approve(
    *, request_id: int, actor: AbstractBaseUser, comment: str = ""
) -> PromotionRequest:
    request = _decide(request_id=request_id, actor=actor, approve=True, comment=comment)
    model = RegisteredModel.objects.select_for_update().get(pk=request.model_id)
    if request.version.status == ModelVersion.Status.ARCHIVED:
        raise Conflict(f"{request.version} was archived after the request", code="version_archived")
    _move_alias(
        model=model,
        alias=request.alias,
        target=request.version,
        reason=request.reason,
        actor=request.requested_by,
        request=request,
    )
    return request


@transaction.atomic
def promotion_request_reject(
    *, request_id: int, actor: AbstractBaseUser, comment: str = ""
) -> PromotionRequest:
    return _decide(request_id=request_id, actor=actor, approve=False, comment=comment)


# --- approval policies ----------------------------------------------------------------------

# One approval by someone else is what PromotionRequest models; more would need a
# table of approvals per request (not built: the API refuses other numbers).
SUPPORTED_APPROVALS = (1,)
_UNSET: Any = object()


def _policy_snapshot(policy: ApprovalPolicy) -> dict:
    return {
        "model": policy.model.name if policy.model_id else None,
        "alias": policy.alias,
        "required_approvals": 1,
    }


def _policy_fields(
    *, model_name: str | None, alias: str, required_approvals: int, exclude_pk: int | None
) -> tuple[RegisteredModel | None, str]:
    alias = _validate_alias(alias)
    if required_approvals not in SUPPORTED_APPROVALS:
        raise ApplicationError(
            "required_approvals must be 1 (one approver other than the requester)",
            code="invalid_required_approvals",
        )
    model = None
    if model_name is not None:
        model = RegisteredModel.objects.filter(name=model_name).first()
        if model is None:
            raise ApplicationError(f"model {model_name!r} not found", code="unknown_model")
    # The unique constraint does not cover model IS NULL (NULLs differ in SQL): check here.
    clash = ApprovalPolicy.objects.filter(alias=alias, model=model).exclude(pk=exclude_pk)
    if clash.exists():
        raise Conflict(
            f"a policy for @{alias} ({model_name or 'all models'}) already exists",
            code="policy_exists",
        )
    return model, alias


@transaction.atomic
def approval_policy_create(
    *, model_name: str | None, alias: str, required_approvals: int = 1, actor: AbstractBaseUser
) -> ApprovalPolicy:
    require(actor, Right.MANAGE_POLICIES, "approval policies are managed by the admin role")
    model, alias = _policy_fields(
        model_name=model_name, alias=alias, required_approvals=required_approvals, exclude_pk=None
    )
    policy = ApprovalPolicy.objects.create(model=model, alias=alias)
    audit_record(
        actor=actor,
        action="approval_policy.create",
        object_type="approval_policy",
        object_id=policy.pk,
        object_repr=str(policy),
        after=_policy_snapshot(policy),
    )
    return policy


@transaction.atomic
def approval_policy_update(
    *,
    policy: ApprovalPolicy,
    actor: AbstractBaseUser,
    model_name: str | None = _UNSET,
    alias: str = _UNSET,
    required_approvals: int = _UNSET,
) -> ApprovalPolicy:
    require(actor, Right.MANAGE_POLICIES, "approval policies are managed by the admin role")
    policy = (
        ApprovalPolicy.objects.select_for_update(of=("self",))
        .select_related("model")
        .get(pk=policy.pk)
    )
    before = _policy_snapshot(policy)
    model, alias = _policy_fields(
        model_name=before["model"] if model_name is _UNSET else model_name,
        alias=policy.alias if alias is _UNSET else alias,
        required_approvals=1 if required_approvals is _UNSET else required_approvals,
        exclude_pk=policy.pk,
    )
    policy.model, policy.alias = model, alias
    policy.save(update_fields=["model", "alias"])
    after = _policy_snapshot(policy)
    if after != before:
        audit_record(
            actor=actor,
            action="approval_policy.update",
            object_type="approval_policy",
            object_id=policy.pk,
            object_repr=str(policy),
            before=before,
            after=after,
        )
    return policy


@transaction.atomic
def approval_policy_delete(*, policy: ApprovalPolicy, actor: AbstractBaseUser) -> None:
    require(actor, Right.MANAGE_POLICIES, "approval policies are managed by the admin role")
    policy = (
        ApprovalPolicy.objects.select_for_update(of=("self",))
        .select_related("model")
        .get(pk=policy.pk)
    )
    audit_record(
        actor=actor,
        action="approval_policy.delete",
        object_type="approval_policy",
        object_id=policy.pk,
        object_repr=str(policy),
        before=_policy_snapshot(policy),
    )
    policy.delete()


# --- sync with MLflow ---------------------------------------------------------------------


@dataclass
class SyncResult:
    models_added: int = 0
    versions_added: int = 0
    external_moves: int = 0
    versions_removed: int = 0
    reverted: int = 0  # outside moves of approval-gated aliases, moved back


def registry_sync() -> SyncResult:
    """Converge the mirror on MLflow; record alias moves made outside as such.

    Idempotent: a second run right after the first changes nothing.
    """
    result = SyncResult()
    store = get_store()
    try:
        snapshots = store.snapshot()
    except MlflowStoreError as exc:
        logger.warning("registry sync skipped: %s", exc)
        return result
    for snap in snapshots:
        model = RegisteredModel.objects.filter(name=snap.name).first()
        if model is None:
            with transaction.atomic():
                model, created = RegisteredModel.objects.get_or_create(
                    name=snap.name, defaults={"description": snap.description, "tags": snap.tags}
                )
                if created:
                    result.models_added += 1
                    audit_record(
                        actor=None,
                        action="model.adopt",
                        object_type="registered_model",
                        object_id=snap.name,
                        object_repr=snap.name,
                        after={"name": snap.name},
                        system="registry-sync",
                    )
        known = set(model.versions.values_list("version", flat=True))
        for number in sorted(set(snap.versions) - known):
            try:
                meta = store.version_meta(snap.name, number)
            except MlflowStoreError as exc:
                logger.warning("cannot adopt %s v%s: %s", snap.name, number, exc)
                continue
            _model_version_record(
                model=model, meta=meta, actor=None, action="version.adopt", system="registry-sync"
            )
            result.versions_added += 1
        with transaction.atomic():
            model = RegisteredModel.objects.select_for_update().get(pk=model.pk)
            mirrored = dict(
                Alias.objects.filter(model=model).values_list("name", "version__version")
            )
            for alias in sorted(set(mirrored) | set(snap.aliases)):
                wanted = snap.aliases.get(alias)
                if mirrored.get(alias) == wanted:
                    continue
                # Again under the model's lock: a move the control plane made since the
                # snapshot is in the mirror and MLflow alike, and is no outside move.
                try:
                    wanted = store.get_alias(model.name, alias)
                except MlflowStoreError as exc:
                    logger.warning("cannot read %s@%s: %s", model.name, alias, exc)
                    continue
                if mirrored.get(alias) == wanted:
                    continue
                target = (
                    ModelVersion.objects.filter(model=model, version=wanted).first()
                    if wanted
                    else None
                )
                if approval_required(model=model, alias=alias):
                    try:
                        with transaction.atomic():
                            _alias_revert_outside_move(
                                model=model,
                                alias=alias,
                                approved=mirrored.get(alias),
                                outside=wanted,
                                outside_version=target,
                            )
                    except ApplicationError as exc:  # MLflow refused: nothing kept, next pass
                        logger.warning("cannot revert %s@%s: %s", model.name, alias, exc)
                        continue
                    result.external_moves += 1
                    result.reverted += 1
                    continue
                if wanted and target is None:
                    continue  # version not adopted yet (not an MLflow model); next pass
                _move_alias(
                    model=model,
                    alias=alias,
                    target=target,
                    reason="moved outside the control plane",
                    actor=None,
                    origin=AliasMove.Origin.EXTERNAL,
                    write_mlflow=False,
                )
                result.external_moves += 1
            gone = known - set(snap.versions)
            for number in sorted(gone):
                mv = ModelVersion.objects.filter(model=model, version=number).first()
                if mv is None or mv.aliases.exists():
                    continue
                audit_record(
                    actor=None,
                    action="version.vanish",
                    object_type="model_version",
                    object_id=f"{model.name}/{number}",
                    object_repr=str(mv),
                    before=_version_snapshot(mv),
                    system="registry-sync",
                )
                PromotionRequest.objects.filter(version=mv).delete()
                mv.delete()
                result.versions_removed += 1
    return result


SYNC_REQUESTER = "registry-sync"  # requester of the promotion requests the sync opens


def _sync_requester() -> AbstractBaseUser:
    from django.contrib.auth import get_user_model

    user, created = get_user_model().objects.get_or_create(
        username=SYNC_REQUESTER, defaults={"is_active": False}
    )
    if created:
        user.set_unusable_password()  # it never logs in
        user.save(update_fields=["password"])
    return user


def _alias_revert_outside_move(
    *,
    model: RegisteredModel,
    alias: str,
    approved: int | None,
    outside: int | None,
    outside_version: ModelVersion | None,
) -> PromotionRequest | None:
    """An approval-gated alias was moved outside the control plane (with MLflow's own
    tools): record the move, move the alias back in MLflow to the last approved version and
    open a pending promotion request for the outside move. The mirror, which deployments
    follow, stays on the approved version throughout, so nothing rolls out the unapproved
    one. Caller holds the model row lock inside a transaction: all of it, audit included,
    commits together, or (MLflow refusing the revert) not at all and the next pass retries."""
    name = f"{model.name}@{alias}"
    AliasMove.objects.create(
        model=model,
        alias=alias,
        from_version=approved,
        to_version=outside,
        actor=None,
        actor_label="mlflow (external)",
        reason="moved outside the control plane; the alias needs approval",
        origin=AliasMove.Origin.EXTERNAL,
    )
    audit_record(
        actor=None,
        action="alias.external_move",
        object_type="alias",
        object_id=name,
        object_repr=name,
        before={"version": str(approved) if approved else None},
        after={"version": str(outside) if outside else None, "origin": AliasMove.Origin.EXTERNAL},
        system="registry-sync",
    )
    request = None
    if outside_version is not None and outside_version.status == ModelVersion.Status.READY:
        request = PromotionRequest.objects.filter(
            model=model,
            alias=alias,
            version=outside_version,
            status=PromotionRequest.Status.PENDING,
        ).first()
        if request is None:
            request = PromotionRequest.objects.create(
                model=model,
                alias=alias,
                version=outside_version,
                reason=f"moved to version {outside} outside the control plane; reverted by the registry sync",
                requested_by=_sync_requester(),
            )
            audit_record(
                actor=None,
                action="promotion.request",
                object_type="promotion_request",
                object_id=request.pk,
                object_repr=str(request),
                after={"alias": alias, "version": str(outside), "reason": request.reason},
                system="registry-sync",
            )
    AliasMove.objects.create(
        model=model,
        alias=alias,
        from_version=outside,
        to_version=approved,
        actor=None,
        actor_label=SYNC_REQUESTER,
        reason=(
            f"reverted: {alias!r} needs approval"
            + (f" (promotion request #{request.pk})" if request else "")
        ),
        origin=AliasMove.Origin.CONTROLPLANE,
        request=request,
    )
    audit_record(
        actor=None,
        action="alias.revert",
        object_type="alias",
        object_id=name,
        object_repr=name,
        before={"version": str(outside) if outside else None},
        after={
            "version": str(approved) if approved else None,
            "request": request.pk if request else None,
        },
        system="registry-sync",
    )
    try:
        if approved is None:
            get_store().delete_alias(model.name, alias)
        else:
            get_store().set_alias(model.name, alias, approved)
    except MlflowStoreError as exc:
        raise _mlflow_error(exc) from exc
    return request
