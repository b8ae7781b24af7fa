from django.urls import path

from . import apis, views

app_name = "registry"

api_urlpatterns = [
    path("models", apis.ModelListApi.as_view(), name="api-models"),
    path("models/<str:name>", apis.ModelDetailApi.as_view(), name="api-model"),
    path("models/<str:name>/versions", apis.VersionListApi.as_view(), name="api-versions"),
    path(
        "models/<str:name>/versions/<str:version>",
        apis.VersionDetailApi.as_view(),
        name="api-version",
    ),
    path(
        "models/<str:name>/versions/<str:version>/bundle",
        apis.VersionBundleApi.as_view(),
        name="api-version-bundle",
    ),
    path("models/<str:name>/aliases/<str:alias>", apis.AliasApi.as_view(), name="api-alias"),
    path("models/<str:name>/history", apis.HistoryApi.as_view(), name="api-history"),
    path("models/<str:name>/compare", apis.CompareApi.as_view(), name="api-compare"),
    path("promotion-requests", apis.PromotionRequestListApi.as_view(), name="api-requests"),
    path(
        "promotion-requests/<int:request_id>/approve",
        apis.PromotionDecisionApi.as_view(decision="approve"),
        name="api-request-approve",
    ),
    path(
        "promotion-requests/<int:request_id>/reject",
        apis.PromotionDecisionApi.as_view(decision="reject"),
        name="api-request-reject",
    ),
    path("approval-policies", apis.ApprovalPolicyListApi.as_view(), name="api-policies"),
    path(
        "approval-policies/<int:policy_id>",
        apis.ApprovalPolicyDetailApi.as_view(),
        name="api-policy",
    ),
]

urlpatterns = [
    path("", views.model_list, name="model-list"),
    path("models/new", views.version_upload, name="upload"),
    path("models/<str:name>/", views.model_detail, name="model-detail"),
    path("models/<str:name>/compare", views.compare, name="compare"),
    path("models/<str:name>/history", views.history, name="history"),
    path("models/<str:name>/promote", views.promote, name="promote"),
    path("models/<str:name>/versions/<str:version>/", views.version_detail, name="version-detail"),
    path(
        "models/<str:name>/versions/<str:version>/archive",
        views.version_archive,
        name="version-archive",
    ),
    path(
        "models/<str:name>/versions/<str:version>/delete",
        views.version_delete,
        name="version-delete",
    ),
    path("approvals/", views.approvals, name="approvals"),
    path("approvals/<int:request_id>/decide", views.approval_decide, name="approval-decide"),
]
