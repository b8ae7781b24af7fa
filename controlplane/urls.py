from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from accounts import oidc
from accounts import views as account_views
from controlplane import views
from deployments.urls import api_urlpatterns as deployments_api
from jobs.urls import api_urlpatterns as jobs_api
from monitoring import views as monitoring_views
from monitoring.urls import api_urlpatterns as monitoring_api
from registry.urls import api_urlpatterns as registry_api

api_v1 = [
    *registry_api,
    *deployments_api,
    *monitoring_api,
    *jobs_api,
]

urlpatterns = [
    path("healthz", views.healthz, name="healthz"),
    path("favicon.ico", views.favicon, name="favicon"),
    path("models/", RedirectView.as_view(pattern_name="registry:model-list"), name="models"),
    path("login/", account_views.LoginView.as_view(), name="login"),
    path("oidc/sign-in/", oidc.SignInView.as_view(), name="oidc-sign-in"),
    path("oidc/callback/", oidc.CallbackView.as_view(), name="oidc-callback"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/", include((api_v1, "api"), namespace="api")),
    path("tokens/", include("accounts.urls")),
    path("audit/", include("audit.urls")),
    path("monitoring/", include("monitoring.urls")),
    path("metrics", monitoring_views.prometheus, name="prometheus"),
    path("deployments/", include("deployments.urls")),
    path("jobs/", include("jobs.urls")),
    path("", include("registry.urls")),
]

handler404 = "controlplane.lib.errors.handler404"
handler500 = "controlplane.lib.errors.handler500"
