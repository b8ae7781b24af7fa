from django.urls import path

from . import apis, views

app_name = "monitoring"

api_urlpatterns = [
    path("prometheus/targets", apis.prometheus_targets, name="api-prometheus-targets"),
    path(
        "prometheus/instances/<str:deployment>/<int:revision>/<int:ordinal>/metrics",
        apis.prometheus_instance_metrics,
        name="api-prometheus-instance-metrics",
    ),
    path("deployments/<str:name>/metrics", apis.MetricsApi.as_view(), name="api-metrics"),
    path("deployments/<str:name>/feedback", apis.FeedbackApi.as_view(), name="api-feedback"),
    path("deployments/<str:name>/probes", apis.ProbeListApi.as_view(), name="api-probes"),
    path("alert-rules", apis.AlertRuleListApi.as_view(), name="api-alert-rules"),
    path("alert-rules/<int:rule_id>", apis.AlertRuleDetailApi.as_view(), name="api-alert-rule"),
    path(
        "alert-rules/<int:rule_id>/events",
        apis.AlertEventListApi.as_view(),
        name="api-alert-events",
    ),
    path(
        "models/<str:name>/versions/<str:version>/drift-reference",
        apis.DriftReferenceApi.as_view(),
        name="api-drift-reference",
    ),
]

urlpatterns = [
    path("", views.overview, name="overview"),
    path("deployments/<str:name>/", views.deployment_detail, name="deployment"),
    path(
        "deployments/<str:name>/drift-reference",
        views.drift_reference_upload,
        name="drift-reference-upload",
    ),
    path("alerts/", views.alert_list, name="alert-list"),
    path("alerts/new", views.alert_create, name="alert-create"),
    path("alerts/<int:rule_id>/", views.alert_detail, name="alert-detail"),
    path("alerts/<int:rule_id>/delete", views.alert_delete, name="alert-delete"),
]
