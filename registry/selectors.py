from __future__ import annotations

from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from controlplane.lib.errors import ApplicationError, NotFound

from .models import (
    Alias,
    AliasMove,
    ApprovalPolicy,
    ModelVersion,
    PromotionRequest,
    RegisteredModel,
)


def registered_model_list(*, search: str = "", tag: str = "") -> QuerySet[RegisteredModel]:
    """Models with their aliases, version count and latest version: a constant
    number of queries whatever the number of rows."""
    # Correlated subqueries, not JOIN + GROUP BY: they run for the page's rows
    # only, and the paginator's COUNT(*) does not aggregate every version.
    versions = ModelVersion.objects.filter(model=OuterRef("pk")).order_by()
    qs = RegisteredModel.objects.annotate(
        version_count=Coalesce(
            Subquery(versions.values("model").annotate(n=Count("pk")).values("n")[:1]), Value(0)
        ),
        latest_version=Subquery(versions.order_by("-version").values("version")[:1]),
    ).prefetch_related(Prefetch("aliases", queryset=Alias.objects.select_related("version")))
    if search:
        qs = qs.filter(Q(name__icontains=search) | Q(description__icontains=search))
    if tag:
        key, sep, value = tag.partition("=")
        qs = qs.filter(**{f"tags__{key}": value}) if sep else qs.filter(tags__has_key=key)
    return qs.order_by("name")


def registered_model_get(*, name: str) -> RegisteredModel:
    model = (
        RegisteredModel.objects.prefetch_related(
            Prefetch("aliases", queryset=Alias.objects.select_related("version"))
        )
        .filter(name=name)
        .first()
    )
    if model is None:
        raise NotFound(f"model {name!r} not found")
    return model


def parse_version(version: str | int) -> int:
    try:
        number = int(str(version))
    except ValueError:
        raise ApplicationError(
            f"version {version!r} is not a version number", code="invalid_version"
        ) from None
    if number < 1:
        raise ApplicationError(
            f"version {version!r} is not a version number", code="invalid_version"
        )
    return number


def model_version_get(*, model: RegisteredModel, version: str | int) -> ModelVersion:
    try:
        number = parse_version(version)
    except ApplicationError:
        raise NotFound(f"version {version!r} of {model.name!r} not found") from None
    mv = (
        ModelVersion.objects.select_related("model", "created_by")
        .prefetch_related("aliases")
        .filter(model=model, version=number)
        .first()
    )
    if mv is None:
        raise NotFound(f"version {version} of {model.name!r} not found")
    return mv


def model_version_list(*, model: RegisteredModel) -> QuerySet[ModelVersion]:
    return (
        ModelVersion.objects.filter(model=model)
        .select_related("model", "created_by")
        .prefetch_related("aliases")
        .order_by("-version")
    )


def alias_move_list(*, model: RegisteredModel | None = None) -> QuerySet[AliasMove]:
    qs = AliasMove.objects.select_related("model", "actor", "request__decided_by")
    if model is not None:
        qs = qs.filter(model=model)
    return qs.order_by("-created_at", "-id")


def promotion_request_list(*, status: str | None = None) -> QuerySet[PromotionRequest]:
    qs = PromotionRequest.objects.select_related("model", "version", "requested_by", "decided_by")
    if status:
        qs = qs.filter(status=status)
    return qs


def approval_policy_list() -> QuerySet[ApprovalPolicy]:
    return ApprovalPolicy.objects.select_related("model").order_by("alias", "model__name", "pk")


def approval_policy_get(*, policy_id: int) -> ApprovalPolicy:
    policy = ApprovalPolicy.objects.select_related("model").filter(pk=policy_id).first()
    if policy is None:
        raise NotFound(f"approval policy {policy_id} not found")
    return policy


def approval_required(*, model: RegisteredModel, alias: str) -> bool:
    return (
        ApprovalPolicy.objects.filter(alias=alias)
        .filter(Q(model__isnull=True) | Q(model=model))
        .exists()
    )


def conversion_rows(ordered: list[ModelVersion]) -> list[dict]:
    from .conversion import comparison_rows

    return comparison_rows(ordered)


def model_versions_compare(*, model: RegisteredModel, versions: list[str]) -> dict:
    """Side by side: metrics, params, tags and signature, with what differs."""
    numbers = sorted({parse_version(v) for v in versions})
    if len(numbers) < 2:
        raise ApplicationError(
            "compare needs at least two different versions", code="invalid_compare"
        )
    if len(numbers) > 10:
        raise ApplicationError("compare at most 10 versions at once", code="invalid_compare")
    found = {mv.version: mv for mv in ModelVersion.objects.filter(model=model, version__in=numbers)}
    missing = [str(n) for n in numbers if n not in found]
    if missing:
        raise NotFound(f"version(s) {', '.join(missing)} of {model.name!r} not found")
    ordered = [found[n] for n in numbers]

    def table(attr: str) -> list[dict]:
        keys = sorted({k for mv in ordered for k in (getattr(mv, attr) or {})})
        rows = []
        for key in keys:
            values = [(getattr(mv, attr) or {}).get(key) for mv in ordered]
            rows.append(
                {"key": key, "values": values, "differs": len({repr(v) for v in values}) > 1}
            )
        return rows

    def columns(mv: ModelVersion, part: str) -> dict:
        spec = (mv.signature or {}).get(part) or []
        if not isinstance(spec, list):
            return {}
        return {
            str(c.get("name", i)): c.get("type") for i, c in enumerate(spec) if isinstance(c, dict)
        }

    signature_rows = []
    for part in ("inputs", "outputs"):
        names = sorted({n for mv in ordered for n in columns(mv, part)})
        for name in names:
            values = [columns(mv, part).get(name) for mv in ordered]
            signature_rows.append(
                {
                    "key": f"{part}.{name}",
                    "values": values,
                    "differs": len({repr(v) for v in values}) > 1,
                }
            )
    return {
        "model": model.name,
        "versions": [str(n) for n in numbers],
        "metrics": table("metrics"),
        "params": table("params"),
        "tags": table("tags"),
        "signature": signature_rows,
        "conversion": conversion_rows(ordered),
    }
