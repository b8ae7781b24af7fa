from rest_framework import authentication, exceptions

from .permissions import TOKEN_ATTR
from .services import api_token_authenticate


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer mlcp_...``. Sets ``request.auth`` to the ApiToken."""

    keyword = "Bearer"

    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        parts = header.split()
        if parts[0].lower() != self.keyword.lower():
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Malformed Authorization header: use 'Bearer <token>'."
            )
        token = api_token_authenticate(parts[1])
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
        # The permission helper intersects the owner's rights with this token's scopes.
        setattr(token.user, TOKEN_ATTR, token)
        return token.user, token

    def authenticate_header(self, request):
        return self.keyword
