from django.contrib import admin

from accounts.permissions import Right, user_can

from .models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: the audit log is append-only."""

    list_display = (
        "created_at",
        "actor_label",
        "action",
        "object_type",
        "object_repr",
        "request_id",
        "source_address",
    )
    list_filter = ("action", "object_type")
    search_fields = ("actor_label", "object_repr", "object_id", "request_id")
    date_hierarchy = "created_at"

    def has_module_permission(self, request):
        return user_can(request.user, Right.VIEW_AUDIT)

    def has_view_permission(self, request, obj=None):
        return user_can(request.user, Right.VIEW_AUDIT)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
