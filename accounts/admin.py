from django.contrib import admin, messages

from .models import ApiToken
from .permissions import Right, user_can
from .services import api_token_revoke


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = (
        "display_prefix",
        "name",
        "user",
        "scopes",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    list_filter = ("revoked_at",)
    search_fields = ("name", "key_id", "user__username")
    readonly_fields = (
        "user",
        "name",
        "key_id",
        "scopes",
        "created_at",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    exclude = ("key_hash",)
    actions = ["revoke"]

    def has_module_permission(self, request):
        return user_can(request.user, Right.MANAGE_USERS)

    def has_view_permission(self, request, obj=None):
        return user_can(request.user, Right.MANAGE_USERS)

    def has_revoke_permission(self, request):
        return user_can(request.user, Right.MANAGE_USERS)

    def has_add_permission(self, request):
        return False  # tokens are created by the UI, API or create_api_token: shown once there

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Revoke selected tokens", permissions=["revoke"])
    def revoke(self, request, queryset):
        for token in queryset:
            api_token_revoke(token_id=token.pk, actor=request.user)
        messages.success(request, f"Revoked {queryset.count()} token(s).")
