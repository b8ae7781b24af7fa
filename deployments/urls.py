from django.urls import path

from . import apis

app_name = "deployments"

api_urlpatterns = [
    path("deployments", apis.DeploymentListApi.as_view(), name="api-deployments"),
    path("deployments/<str:name>", apis.DeploymentDetailApi.as_view(), name="api-deployment"),
    path("deployments/<str:name>/revisions", apis.RevisionListApi.as_view(), name="api-revisions"),
    path("deployments/<str:name>/events", apis.EventListApi.as_view(), name="api-events"),
    path("deployments/<str:name>/rollback", apis.RollbackApi.as_view(), name="api-rollback"),
    path("deployments/<str:name>/logs", apis.LogsApi.as_view(), name="api-logs"),
]

urlpatterns: list = []
