"""Deployments admin: the operators' console.

Domain state (deployments, revisions, instances, events) is read-only here;
changes go through admin actions that call the same services as the UI, the
API and the reconciler (rollback, stop, start), so each is audited with the
admin user as the actor. A refusal is shown as a message, never a 500.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from accounts.permissions import Right, user_can
from controlplane.lib.errors import ApplicationError

from . import services, shadow
from .models import Deployment, DeploymentEvent, Instance, Revision

RECENT_EVENTS = 30


class ReadOnlyMixin:
    """View-only: no add, change or delete (those would bypass the services)."""

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class ReadOnlyAdmin(ReadOnlyMixin, admin.ModelAdmin):
    pass


def _run_each(request: HttpRequest, objects, call: Callable, what: str, done: str) -> None:
    """Call one service per object; report successes and each refusal."""
    ok = []
    for obj in objects:
        try:
            call(obj)
        except ApplicationError as exc:
            messages.error(request, f"{what} of {obj} refused: {exc.message}")
        else:
            ok.append(str(obj))
    if ok:
        messages.success(request, f"{done}: {', '.join(ok)}.")


def _revision_label(revision: Revision | None) -> str:
    if revision is None:
        return "—"
    return f"r{revision.number} (v{revision.model_version.version})"


class RevisionInline(ReadOnlyMixin, admin.TabularInline):
    model = Revision
    fk_name = "deployment"
    extra = 0
    ordering = ("-number",)
    fields = (
        "number",
        "model_version",
        "state",
        "reason",
        "failure",
        "spec",
        "live_at",
        "created_by",
        "created_at",
    )
    readonly_fields = fields
    show_change_link = True

    def get_queryset(self, request: HttpRequest) -> QuerySet[Revision]:
        return super().get_queryset(request).select_related("model_version__model", "created_by")


class InstanceInline(ReadOnlyMixin, admin.TabularInline):
    model = Instance
    extra = 0
    fields = (
        "revision",
        "ordinal",
        "runtime",
        "runtime_id",
        "port",
        "state",
        "healthy_streak",
        "restarts",
        "last_error",
        "last_probe_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Instance]:
        return super().get_queryset(request).select_related("revision__deployment")


class RecentEventsFormSet(BaseInlineFormSet):
    def get_queryset(self):
        return super().get_queryset()[:RECENT_EVENTS]


class RecentEventInline(ReadOnlyMixin, admin.TabularInline):
    model = DeploymentEvent
    formset = RecentEventsFormSet
    verbose_name_plural = f"Recent events (last {RECENT_EVENTS})"
    extra = 0
    fields = ("created_at", "kind", "revision", "message")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[DeploymentEvent]:
        return super().get_queryset(request).select_related("revision__deployment")


@admin.register(Deployment)
class DeploymentAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "model",
        "target",
        "runtime",
        "status",
        "serving",
        "endpoint",
        "updated_at",
    )
    list_filter = ("status", "runtime", "environment", "stopped", "deleted")
    list_select_related = ("model", "serving_revision__model_version")
    search_fields = ("name", "model__name", "target_alias")
    date_hierarchy = "created_at"
    fields = (
        "name",
        "page",
        "model",
        "target_version",
        "target_alias",
        "followed_version",
        "runtime",
        "replicas",
        "cpu",
        "memory_mb",
        "env",
        "environment",
        "predict_method",
        "endpoint",
        "desired_revision",
        "serving_revision",
        "status",
        "phase",
        "phase_started_at",
        "status_message",
        "stopped",
        "deleted",
        "progress_deadline_s",
        "router_pid",
        "created_by",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields
    inlines = [RevisionInline, InstanceInline, RecentEventInline]
    actions = [
        "roll_back",
        "stop",
        "start",
        "rollout_promote",
        "rollout_abort",
        "rollout_pause",
        "rollout_resume",
        "promote_shadow",
        "stop_shadow",
    ]

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return user_can(request.user, Right.DEPLOY)

    @admin.display(description="target")
    def target(self, obj: Deployment) -> str:
        return f"@{obj.target_alias}" if obj.target_alias else f"v{obj.target_version}"

    @admin.display(description="serving revision", ordering="serving_revision__number")
    def serving(self, obj: Deployment) -> str:
        return _revision_label(obj.serving_revision)

    @admin.display(description="deployment page")
    def page(self, obj: Deployment) -> str:
        if obj.deleted:
            return "— (being deleted)"
        url = reverse("deployments:deployment-detail", kwargs={"name": obj.name})
        return format_html('<a href="{}">{}</a>', url, url)

    @admin.action(description="Roll back to the previous revision", permissions=["operate"])
    def roll_back(self, request: HttpRequest, queryset: QuerySet[Deployment]):
        if request.POST.get("post") != "yes":
            # Asks first, as Django's delete action does: a page listing what rolls back.
            context = {
                **self.admin_site.each_context(request),
                "title": "Roll back deployments?",
                "opts": self.model._meta,
                "deployments": list(queryset.select_related("model", "desired_revision")),
                "action": "roll_back",
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(
                request, "admin/deployments/deployment/rollback_confirmation.html", context
            )
        _run_each(
            request,
            list(queryset),
            lambda d: services.deployment_rollback(
                deployment=d, actor=request.user, reason="admin rollback"
            ),
            "Rollback",
            "Rolling back",
        )
        return None

    @admin.action(description="Stop", permissions=["operate"])
    def stop(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        _run_each(
            request,
            list(queryset),
            lambda d: services.deployment_stop(deployment=d, actor=request.user),
            "Stop",
            "Stopping",
        )

    @admin.action(description="Promote the shadow to primary", permissions=["operate"])
    def promote_shadow(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        _run_each(
            request,
            list(queryset),
            lambda d: shadow.shadow_promote(deployment=d, actor=request.user),
            "Shadow promotion",
            "Promoting the shadow of",
        )

    @admin.action(description="Stop the shadow", permissions=["operate"])
    def stop_shadow(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        _run_each(
            request,
            list(queryset),
            lambda d: shadow.shadow_stop(deployment=d, actor=request.user),
            "Stopping the shadow",
            "Stopping the shadow of",
        )

    @admin.action(description="Start", permissions=["operate"])
    def start(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        _run_each(
            request,
            list(queryset),
            lambda d: services.deployment_start(deployment=d, actor=request.user),
            "Start",
            "Starting",
        )

    def _rollout(self, request: HttpRequest, queryset, action: str) -> None:
        from .rollouts import rollout_control

        _run_each(
            request,
            list(queryset),
            lambda d: rollout_control(
                deployment=d, action=action, actor=request.user, reason=f"admin {action}"
            ),
            f"Rollout {action}",
            f"Rollout {action} requested",
        )

    @admin.action(description="Rollout: promote the candidate now", permissions=["operate"])
    def rollout_promote(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        self._rollout(request, queryset, "promote")

    @admin.action(
        description="Rollout: abort (all traffic to the baseline)", permissions=["operate"]
    )
    def rollout_abort(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        self._rollout(request, queryset, "abort")

    @admin.action(description="Rollout: pause", permissions=["operate"])
    def rollout_pause(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        self._rollout(request, queryset, "pause")

    @admin.action(description="Rollout: resume", permissions=["operate"])
    def rollout_resume(self, request: HttpRequest, queryset: QuerySet[Deployment]) -> None:
        self._rollout(request, queryset, "resume")


@admin.register(Revision)
class RevisionAdmin(ReadOnlyAdmin):
    list_display = (
        "__str__",
        "model_version",
        "state",
        "reason",
        "live_at",
        "created_by",
        "created_at",
    )
    list_filter = ("state",)
    list_select_related = ("deployment", "model_version__model", "created_by")
    search_fields = ("deployment__name", "reason", "model_sha256")
    fields = (
        "deployment",
        "number",
        "model_version",
        "state",
        "reason",
        "failure",
        "spec",
        "model_sha256",
        "model_dir",
        "rollout_started_at",
        "live_at",
        "created_by",
        "created_at",
    )
    readonly_fields = fields


@admin.register(Instance)
class InstanceAdmin(ReadOnlyAdmin):
    list_display = (
        "__str__",
        "runtime",
        "runtime_id",
        "address",
        "state",
        "restarts",
        "last_probe_at",
    )
    list_filter = ("state", "runtime")
    list_select_related = ("deployment", "revision")
    search_fields = ("deployment__name", "runtime_id")
    fields = (
        "deployment",
        "revision",
        "ordinal",
        "runtime",
        "runtime_id",
        "port",
        "state",
        "healthy_streak",
        "restarts",
        "last_error",
        "started_at",
        "last_probe_at",
    )
    readonly_fields = fields


@admin.register(DeploymentEvent)
class DeploymentEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "deployment", "kind", "revision", "message")
    list_filter = ("kind",)
    list_select_related = ("deployment", "revision")
    search_fields = ("deployment__name", "message")
    date_hierarchy = "created_at"
    fields = ("created_at", "deployment", "kind", "revision", "message")
    readonly_fields = fields
