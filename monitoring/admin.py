"""Monitoring admin: alert rules are managed here too (through the same services as the
UI and the API, so every change is validated and audited); collected data is read-only.
The schedules of the periodic tasks are edited under Periodic tasks (django-celery-beat)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.permissions import Right, user_can
from controlplane.lib.errors import ApplicationError

from . import catalog, services
from .models import (
    AlertEvent,
    AlertNotification,
    AlertRule,
    DriftReference,
    ProbeResult,
    PullState,
    ScrapeState,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class AlertRuleAdminForm(forms.ModelForm):
    metric = forms.ChoiceField(choices=[(m, m) for m in catalog.METRICS])
    webhook_url = forms.URLField(required=False, max_length=2000, assume_scheme="https")

    class Meta:
        model = AlertRule
        fields = ["deployment", *services.RULE_FIELDS]

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        probe = AlertRule(**{k: v for k, v in data.items()})
        try:
            services.alert_rule_validate(probe)
        except ApplicationError as exc:
            raise ValidationError(exc.message) from None
        return data


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    form = AlertRuleAdminForm
    list_display = (
        "name",
        "deployment",
        "metric",
        "comparison",
        "threshold",
        "window_s",
        "min_samples",
        "state",
        "enabled",
        "last_value",
        "last_evaluated_at",
    )
    list_filter = ("state", "enabled", "metric")
    list_select_related = ("deployment",)
    search_fields = ("name", "deployment__name")
    readonly_fields = (
        "state",
        "state_changed_at",
        "last_value",
        "last_samples",
        "last_evaluated_at",
        "created_by",
        "created_at",
        "updated_at",
    )
    actions = ["evaluate_now"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return user_can(request.user, Right.MONITORING_WRITE)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return user_can(request.user, Right.MONITORING_WRITE)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return user_can(request.user, Right.MONITORING_WRITE)

    def get_readonly_fields(self, request, obj=None):
        # The deployment of an existing rule does not change (make a new rule instead).
        return (*self.readonly_fields, "deployment") if obj else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: AlertRule, form, change: bool) -> None:
        fields = {k: form.cleaned_data[k] for k in services.RULE_FIELDS if k in form.cleaned_data}
        if change:
            saved = services.alert_rule_update(rule=obj, actor=request.user, **fields)
        else:
            saved = services.alert_rule_create(
                deployment=form.cleaned_data["deployment"], actor=request.user, **fields
            )
        obj.pk = saved.pk
        obj.webhook_secret = saved.webhook_secret

    def delete_model(self, request: HttpRequest, obj: AlertRule) -> None:
        services.alert_rule_delete(rule=obj, actor=request.user)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[AlertRule]) -> None:
        for rule in queryset:
            services.alert_rule_delete(rule=rule, actor=request.user)

    @admin.action(description="Evaluate selected rules now", permissions=["change"])
    def evaluate_now(self, request: HttpRequest, queryset: QuerySet[AlertRule]) -> None:
        changed = 0
        for rule in queryset:
            result = services.alert_rule_evaluate(rule_id=rule.pk)
            changed += int(bool(result and result.changed))
        messages.success(request, f"Evaluated {queryset.count()} rule(s); {changed} changed state.")


class NotificationInline(admin.TabularInline):
    model = AlertNotification
    extra = 0
    can_delete = False
    fields = ("channel", "target", "status", "attempts", "response_status", "last_error", "sent_at")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(AlertEvent)
class AlertEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "rule", "from_state", "to_state", "value", "samples")
    list_filter = ("to_state",)
    list_select_related = ("rule",)
    inlines = [NotificationInline]
    date_hierarchy = "created_at"


@admin.register(AlertNotification)
class AlertNotificationAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "channel", "target", "status", "attempts", "response_status")
    list_filter = ("channel", "status")


@admin.register(ProbeResult)
class ProbeResultAdmin(ReadOnlyAdmin):
    list_display = ("ts", "deployment", "ok", "latency_ms", "status_code", "model_version", "kind")
    list_filter = ("ok", "kind")
    list_select_related = ("deployment",)
    date_hierarchy = "ts"


@admin.register(DriftReference)
class DriftReferenceAdmin(ReadOnlyAdmin):
    list_display = ("model_version", "source", "active", "n_rows", "created_by", "created_at")
    list_filter = ("source", "active")
    list_select_related = ("model_version__model", "created_by")


@admin.register(ScrapeState)
class ScrapeStateAdmin(ReadOnlyAdmin):
    list_display = ("instance", "scrapes", "resets", "scraped_at", "last_error")
    list_select_related = ("instance__deployment", "instance__revision")


@admin.register(PullState)
class PullStateAdmin(ReadOnlyAdmin):
    list_display = ("instance", "boot_id", "cursor", "records", "lost", "pulled_at", "last_error")
    list_select_related = ("instance__deployment", "instance__revision")
