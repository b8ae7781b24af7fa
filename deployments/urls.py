from django.urls import path

from . import apis, shadow_views, views

app_name = "deployments"

api_urlpatterns = [
    path("deployments", apis.DeploymentListApi.as_view(), name="api-deployments"),
    path("deployments/<str:name>", apis.DeploymentDetailApi.as_view(), name="api-deployment"),
    path("deployments/<str:name>/revisions", apis.RevisionListApi.as_view(), name="api-revisions"),
    path("deployments/<str:name>/events", apis.EventListApi.as_view(), name="api-events"),
    path("deployments/<str:name>/rollback", apis.RollbackApi.as_view(), name="api-rollback"),
    path("deployments/<str:name>/logs", apis.LogsApi.as_view(), name="api-logs"),
    path(
        "deployments/<str:name>/shadow/promote",
        apis.ShadowPromoteApi.as_view(),
        name="api-shadow-promote",
    ),
    path(
        "deployments/<str:name>/rollout/<str:action>",
        apis.RolloutActionApi.as_view(),
        name="api-rollout-action",
    ),
    path("cluster", apis.ClusterApi.as_view(), name="api-cluster"),
]

urlpatterns = [
    path("", views.deployment_list, name="deployment-list"),
    path("new", views.deployment_create, name="deployment-create"),
    path("<slug:name>/", views.deployment_detail, name="deployment-detail"),
    path("<slug:name>/logs", views.deployment_logs, name="deployment-logs"),
    path("<slug:name>/update", views.deployment_update, name="deployment-update"),
    path("<slug:name>/scale", views.deployment_scale, name="deployment-scale"),
    path("<slug:name>/rollback", views.deployment_rollback, name="deployment-rollback"),
    path("<slug:name>/shadow", shadow_views.deployment_shadow, name="deployment-shadow"),
    path("<slug:name>/rollout/<str:action>", views.deployment_rollout, name="deployment-rollout"),
    path(
        "<slug:name>/stop", views.deployment_lifecycle, {"action": "stop"}, name="deployment-stop"
    ),
    path(
        "<slug:name>/start",
        views.deployment_lifecycle,
        {"action": "start"},
        name="deployment-start",
    ),
    path(
        "<slug:name>/delete",
        views.deployment_lifecycle,
        {"action": "delete"},
        name="deployment-delete",
    ),
]
