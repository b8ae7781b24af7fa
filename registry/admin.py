"""Registry admin.

Domain state (models, versions, aliases, history, requests) is read-only
here; changes go through admin actions that call the same services as the UI
and the API. Approval policies are configuration and are edited directly,
each change recorded in the audit log.
"""

from __future__ import annotations

from collections.abc import Callable

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.permissions import Right, user_can
from controlplane.lib.errors import ApplicationError

from . import services
from .models import (
    Alias,
    AliasMove,
    ApprovalPolicy,
    ModelVersion,
    PromotionRequest,
    RegisteredModel,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """View-only: no add, change or bulk delete (those would bypass the services)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


def _run_each(request: HttpRequest, objects, call: Callable, done: str) -> None:
    """Call one service per object; report successes and each refusal."""
    ok = 0
    for obj in objects:
        try:
            call(obj)
        except ApplicationError as exc:
            messages.error(request, f"{obj}: {exc.message}")
        else:
            ok += 1
    if ok:
        messages.success(request, f"{done}: {ok}.")


@admin.register(RegisteredModel)
class RegisteredModelAdmin(ReadOnlyAdmin):
    list_display = ("name", "description", "created_at", "updated_at", "created_by")
    search_fields = ("name", "description")
    readonly_fields = ("name", "description", "tags", "created_at", "updated_at", "created_by")
    actions = ["delete_models"]

    def has_manage_permission(self, request: HttpRequest) -> bool:
        return user_can(request.user, Right.REGISTRY_WRITE)

    @admin.action(
        description="Delete selected models (refused while aliased or deployed)",
        permissions=["manage"],
    )
    def delete_models(self, request: HttpRequest, queryset: QuerySet[RegisteredModel]) -> None:
        _run_each(
            request,
            list(queryset),
            lambda m: services.registered_model_delete(model=m, actor=request.user),
            "Deleted models",
        )


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ("model", "version", "status", "run_id", "created_at", "created_by")
    list_filter = ("status",)
    list_select_related = ("model", "created_by")
    search_fields = ("model__name", "run_id", "description")
    readonly_fields = (
        "model",
        "version",
        "status",
        "source",
        "run_id",
        "description",
        "tags",
        "metrics",
        "params",
        "flavors",
        "signature",
        "input_example",
        "requirements",
        "created_at",
        "created_by",
    )
    actions = ["archive_versions", "restore_versions", "delete_versions"]

    def has_manage_permission(self, request: HttpRequest) -> bool:
        return user_can(request.user, Right.REGISTRY_WRITE)

    @admin.action(description="Archive selected versions", permissions=["manage"])
    def archive_versions(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        _run_each(
            request,
            list(queryset.select_related("model")),
            lambda mv: services.model_version_archive(mv=mv, actor=request.user),
            "Archived",
        )

    @admin.action(description="Restore selected versions", permissions=["manage"])
    def restore_versions(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        _run_each(
            request,
            list(queryset.select_related("model")),
            lambda mv: services.model_version_restore(mv=mv, actor=request.user),
            "Restored",
        )

    @admin.action(
        description="Delete selected versions (refused while aliased or deployed)",
        permissions=["manage"],
    )
    def delete_versions(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        _run_each(
            request,
            list(queryset.select_related("model")),
            lambda mv: services.model_version_delete(mv=mv, actor=request.user),
            "Deleted",
        )


@admin.register(Alias)
class AliasAdmin(ReadOnlyAdmin):
    list_display = ("model", "name", "version", "updated_at")
    list_select_related = ("model", "version__model")
    search_fields = ("model__name", "name")


@admin.register(AliasMove)
class AliasMoveAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "model",
        "alias",
        "from_version",
        "to_version",
        "actor_label",
        "origin",
        "reason",
    )
    list_filter = ("origin", "alias")
    list_select_related = ("model",)
    search_fields = ("model__name", "alias", "actor_label", "reason")
    date_hierarchy = "created_at"


class ApprovalPolicyForm(forms.ModelForm):
    class Meta:
        model = ApprovalPolicy
        fields = ("alias", "model")

    def clean_alias(self) -> str:
        try:
            return services._validate_alias(self.cleaned_data["alias"])
        except ApplicationError as exc:
            raise forms.ValidationError(exc.message) from None


@admin.register(ApprovalPolicy)
class ApprovalPolicyAdmin(admin.ModelAdmin):
    """Configuration: which aliases need a second person's approval. Writes go
    through the same services as the API."""

    form = ApprovalPolicyForm
    list_display = ("alias", "model", "created_at")
    list_select_related = ("model",)
    list_filter = ("alias",)
    search_fields = ("alias", "model__name")
    fields = ("alias", "model")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return user_can(request.user, Right.MANAGE_POLICIES)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return user_can(request.user, Right.MANAGE_POLICIES)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return user_can(request.user, Right.MANAGE_POLICIES)

    def save_model(self, request: HttpRequest, obj: ApprovalPolicy, form, change: bool) -> None:
        model_name = obj.model.name if obj.model_id else None
        if change:
            saved = services.approval_policy_update(
                policy=obj, model_name=model_name, alias=obj.alias, actor=request.user
            )
        else:
            saved = services.approval_policy_create(
                model_name=model_name, alias=obj.alias, actor=request.user
            )
        obj.pk = saved.pk

    def delete_model(self, request: HttpRequest, obj: ApprovalPolicy) -> None:
        services.approval_policy_delete(policy=obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApprovalPolicy]) -> None:
        for policy in queryset:
            services.approval_policy_delete(policy=policy, actor=request.user)


@admin.register(PromotionRequest)
class PromotionRequestAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "model",
        "alias",
        "version",
        "status",
        "requested_by",
        "requested_at",
        "decided_by",
        "decided_at",
    )
    list_filter = ("status", "alias")
    list_select_related = ("model", "version__model", "requested_by", "decided_by")
    search_fields = ("model__name", "alias", "reason")
    readonly_fields = (
        "model",
        "alias",
        "version",
        "reason",
        "status",
        "requested_by",
        "requested_at",
        "decided_by",
        "decided_at",
        "decision_comment",
    )
    actions = ["approve_requests", "reject_requests"]

    def has_approve_permission(self, request: HttpRequest) -> bool:
        return user_can(request.user, Right.APPROVE)

    @admin.action(
        description="Approve selected requests (moves the alias)", permissions=["approve"]
    )
    def approve_requests(self, request: HttpRequest, queryset: QuerySet[PromotionRequest]) -> None:
        _run_each(
            request,
            list(queryset),
            lambda r: services.promotion_request_approve(
                request_id=r.pk, actor=request.user, comment="approved in the admin"
            ),
            "Approved",
        )

    @admin.action(description="Reject selected requests", permissions=["approve"])
    def reject_requests(self, request: HttpRequest, queryset: QuerySet[PromotionRequest]) -> None:
        _run_each(
            request,
            list(queryset),
            lambda r: services.promotion_request_reject(
                request_id=r.pk, actor=request.user, comment="rejected in the admin"
            ),
            "Rejected",
        )
