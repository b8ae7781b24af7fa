"""API token pages: list your tokens, create one (shown once), revoke one."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods

from controlplane.lib.errors import ApplicationError

from .models import ApiToken
from .permissions import user_scopes
from .scopes import ALL_SCOPES, READ
from .services import (
    api_token_create,
    api_token_revoke,
    mlflow_credential_issue,
    mlflow_permission_for,
)


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What uses it, e.g. “ci-pipeline”.")
    scopes = forms.MultipleChoiceField(
        choices=[(scope, f"{scope} — {label}") for scope, label in ALL_SCOPES.items()],
        widget=forms.CheckboxSelectMultiple,
    )
    expires_in_days = forms.IntegerField(
        label="Expires in (days)",
        min_value=1,
        max_value=3650,
        required=False,
        help_text="Leave empty for a token that never expires.",
    )

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        held = user_scopes(user)  # a token never gets a scope its owner lacks
        self.fields["scopes"].choices = [
            (scope, f"{scope} — {label}") for scope, label in ALL_SCOPES.items() if scope in held
        ]


def _own_tokens(user) -> list[ApiToken]:
    return list(ApiToken.objects.filter(user=user).order_by("-created_at", "-id"))


@never_cache  # the response to a create carries the token text: keep it out of caches
@login_required
@require_http_methods(["GET", "POST"])
def token_list(request: HttpRequest) -> HttpResponse:
    issued = None
    status = 200
    if request.method == "POST":
        form = TokenForm(request.POST, user=request.user)
        if form.is_valid():
            data = form.cleaned_data
            try:
                issued = api_token_create(
                    user=request.user,
                    name=data["name"],
                    scopes=data["scopes"],
                    expires_in_days=data["expires_in_days"],
                    actor=request.user,
                )
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                form = TokenForm(initial=_initial(), user=request.user)
        if form.errors:
            status = 400
    else:
        form = TokenForm(initial=_initial(), user=request.user)
    return render(
        request,
        "accounts/tokens.html",
        {"form": form, "issued": issued, "tokens": _own_tokens(request.user)},
        status=status,
    )


def _initial() -> dict:
    return {"scopes": [READ], "expires_in_days": settings.CONTROLPLANE_TOKEN_DEFAULT_DAYS}


@login_required
@require_http_methods(["GET", "POST"])
def token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    """GET: the confirmation page. POST: revoke."""
    token = ApiToken.objects.filter(pk=token_id, user=request.user).first()
    if token is None:
        raise Http404("token not found")
    if request.method == "POST":
        try:
            api_token_revoke(token_id=token.pk, actor=request.user)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Token {token.display_prefix}… ({token.name}) revoked.")
        return redirect("accounts:tokens")
    return render(request, "accounts/token_revoke.html", {"token": token})


@never_cache  # the response to a POST carries the password
@login_required
@require_http_methods(["GET", "POST"])
def mlflow_credential(request: HttpRequest) -> HttpResponse:
    """GET: what you would get. POST: create or reset your MLflow user (password shown once)."""
    issued, error, status = None, None, 200
    if request.method == "POST":
        try:
            issued = mlflow_credential_issue(user=request.user, actor=request.user)
        except ApplicationError as exc:
            error, status = exc.message, exc.status_code
    return render(
        request,
        "accounts/mlflow_credential.html",
        {
            "issued": issued,
            "error": error,
            "permission": mlflow_permission_for(request.user),
            "tracking_uri": settings.MLFLOW_TRACKING_URI,
        },
        status=status,
    )


class LoginView(auth_views.LoginView):
    """Django's login page, with the single sign-on button when it is configured and
    no password form when local passwords are turned off (CONTROLPLANE_LOCAL_LOGIN)."""

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.update(
            sso_enabled=settings.CONTROLPLANE_OIDC_ENABLED,
            sso_name=settings.CONTROLPLANE_OIDC_PROVIDER_NAME,
            sso_failed=self.request.GET.get("sso") == "failed",
            local_login=settings.CONTROLPLANE_LOCAL_LOGIN,
        )
        return context

    def post(self, request, *args, **kwargs):
        if not settings.CONTROLPLANE_LOCAL_LOGIN:
            return HttpResponseForbidden(
                "local passwords are turned off: sign in with single sign-on"
            )
        return super().post(request, *args, **kwargs)
