from django.urls import path

from . import apis, views

app_name = "jobs"

urlpatterns = [
    path("", views.job_list, name="job-list"),
    path("<int:job_id>/", views.job_detail, name="job-detail"),
    path("<int:job_id>/cancel/", views.job_cancel, name="job-cancel"),
]

api_urlpatterns = [
    path("jobs", apis.JobListApi.as_view(), name="api-jobs"),
    path("jobs/<int:job_id>", apis.JobDetailApi.as_view(), name="api-job"),
    path("jobs/<int:job_id>/cancel", apis.JobCancelApi.as_view(), name="api-job-cancel"),
    path("jobs/<int:job_id>/files/<slug:name>", apis.JobFileApi.as_view(), name="api-job-file"),
    path("batch-jobs", apis.BatchJobApi.as_view(), name="api-batch-jobs"),
    path(
        "models/<str:name>/versions/<str:version>/convert",
        apis.ConvertApi.as_view(),
        name="api-convert",
    ),
]
