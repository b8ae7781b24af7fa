from rest_framework.permissions import SAFE_METHODS, BasePermission

from .models import ApiToken
from .scopes import READ


class HasScope(BasePermission):
    """Deny by default: the caller must be authenticated, and a token caller
    must hold the scope the view needs (``read`` for safe methods, the view's
    ``write_scope`` otherwise). Session users act with their full rights."""

    message = "Authentication credentials were not provided or lack the required scope."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        token = request.auth
        if not isinstance(token, ApiToken):
            return True
        if request.method in SAFE_METHODS:
            needed = getattr(view, "read_scope", READ)
        else:
            needed = getattr(view, "write_scope", None)
            if needed is None:
                return False  # a view that forgot to declare its scope allows no token writes
        if needed not in token.scopes:
            self.message = f"This token lacks the '{needed}' scope."
            return False
        return True
