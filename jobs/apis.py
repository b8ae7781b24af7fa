"""REST API v1 for jobs. Thin: validate, call one service or selector, serialize.

Contract (CI pipelines script against it): ``POST /api/v1/batch-jobs`` and
``POST /api/v1/models/{name}/versions/{version}/convert`` answer 202 with the job;
``GET /api/v1/jobs/{id}`` has ``id``, ``kind``, ``state``, ``progress`` (``done``,
``total``), ``error`` and, once succeeded, ``result`` and ``output_url``. ``committed_at``
is set once the job passed its commit point: ``POST /api/v1/jobs/{id}/cancel`` then answers
409 ``job_committed``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from django.conf import settings
from django.http import FileResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from accounts.permissions import Right
from accounts.scopes import DEPLOY, REGISTRY_WRITE
from controlplane.lib.apis import paginate, validated
from controlplane.lib.errors import ApplicationError, NotFound
from controlplane.lib.schema import Error

from . import selectors, services
from .models import Job

SUBMITTERS = (REGISTRY_WRITE, DEPLOY)
SUBMIT_RIGHTS = (Right.REGISTRY_WRITE, Right.DEPLOY)


class JobOutput(serializers.ModelSerializer):
    progress = serializers.SerializerMethodField()
    owner = serializers.CharField(source="owner.username", default=None)
    input = serializers.SerializerMethodField()
    result = serializers.SerializerMethodField()
    output_url = serializers.SerializerMethodField()
    files = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = [
            "id",
            "url",
            "kind",
            "state",
            "progress",
            "error",
            "result",
            "output_url",
            "files",
            "input",
            "owner",
            "attempts",
            "cancel_requested",
            "committed_at",
            "created_at",
            "started_at",
            "finished_at",
        ]

    def _url(self, route: str, **kwargs) -> str:
        return reverse(route, kwargs=kwargs, request=self.context.get("request"))

    def get_url(self, obj) -> str:
        return self._url("api:api-job", job_id=obj.pk)

    def get_progress(self, obj) -> dict:
        return {
            "done": obj.progress_done,
            "total": obj.progress_total,
            "percent": None if obj.percent is None else round(obj.percent, 1),
            "rate": None if obj.rate is None else round(obj.rate, 1),
            "eta_seconds": None if obj.eta_seconds is None else round(obj.eta_seconds, 1),
        }

    def get_input(self, obj) -> dict:
        return {k: v for k, v in (obj.input or {}).items() if k not in ("files", "signature")}

    def get_result(self, obj) -> dict | None:
        return obj.result if obj.state == Job.State.SUCCEEDED else None

    def get_files(self, obj) -> dict[str, str]:
        if obj.state != Job.State.SUCCEEDED:
            return {}
        return {
            name: self._url("api:api-job-file", job_id=obj.pk, name=name)
            for name in (obj.files or {})
        }

    def get_output_url(self, obj) -> str | None:
        return self.get_files(obj).get("output")


class JobDetailOutput(JobOutput):
    logs = serializers.SerializerMethodField()

    class Meta(JobOutput.Meta):
        fields = [*JobOutput.Meta.fields, "logs"]

    def get_logs(self, obj) -> list[dict]:
        return [
            {"at": line.created_at.isoformat(), "message": line.message}
            for line in selectors.job_logs(job=obj, limit=100)
        ]


def _accepted(request, job: Job) -> Response:
    job = selectors.job_get_for_user(user=request.user, job_id=job.pk)
    return Response(JobDetailOutput(job, context={"request": request}).data, status=202)


class JobListApi(APIView):
    """Your jobs (admins: every job); submit a job of a kind as JSON."""

    write_scope = SUBMITTERS
    write_right = SUBMIT_RIGHTS

    class InputSerializer(serializers.Serializer):
        kind = serializers.ChoiceField(choices=["batch", "convert"])
        input = serializers.DictField()

    @extend_schema(responses=JobOutput(many=True))
    def get(self, request):
        qs = selectors.job_list_for_user(
            user=request.user,
            state=request.query_params.get("state", ""),
            kind=request.query_params.get("kind", ""),
        )
        return paginate(request, self, qs, JobOutput)

    @extend_schema(request=InputSerializer, responses={202: JobDetailOutput})
    def post(self, request):
        data = validated(self.InputSerializer, request.data)
        if data["kind"] == "batch":
            fields = validated(BatchJobApi.InputSerializer, data["input"])
            if not fields.get("input_uri"):
                raise ApplicationError(
                    "a batch job submitted as JSON needs input_uri (upload files to "
                    "/api/v1/batch-jobs)",
                    code="invalid_input",
                )
            job = _submit_batch(request, fields, upload=None, upload_name="")
        else:
            fields = validated(ConvertInput, data["input"])
            job = services.convert_job_submit(
                actor=request.user,
                model=fields["model"],
                version=fields["version"],
                target=fields["target"],
                quantize=fields["quantize"],
                opset=fields["opset"],
            )
        return _accepted(request, job)


class JobDetailApi(APIView):
    @extend_schema(responses=JobDetailOutput)
    def get(self, request, job_id):
        job = selectors.job_get_for_user(user=request.user, job_id=job_id)
        return Response(JobDetailOutput(job, context={"request": request}).data)


class JobCancelApi(APIView):
    """Cancel a queued job at once; ask a running one to stop (it ends ``cancelled``). A
    running job past its commit point can no longer be cancelled (409 ``job_committed``)."""

    write_scope = SUBMITTERS
    write_right = SUBMIT_RIGHTS

    @extend_schema(
        request=None,
        responses={
            202: JobDetailOutput,
            409: OpenApiResponse(
                Error,
                description="`job_finished`: the job has ended; `job_committed`: it passed "
                "its commit point (it is registering its output and will finish)",
            ),
        },
    )
    def post(self, request, job_id):
        job = selectors.job_get_for_user(user=request.user, job_id=job_id)
        job = services.job_cancel(job=job, actor=request.user)
        return _accepted(request, job)


class JobFileApi(APIView):
    """A file a succeeded job produced (``output``; ``errors`` for skipped rows)."""

    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    def get(self, request, job_id, name):
        job = selectors.job_get_for_user(user=request.user, job_id=job_id)
        meta = (job.files or {}).get(name)
        if job.state != Job.State.SUCCEEDED or not meta or not Path(meta["path"]).is_file():
            raise NotFound(f"job {job_id} has no file {name!r}")
        response = FileResponse(
            open(meta["path"], "rb"),  # noqa: SIM115 (FileResponse closes it)
            as_attachment=True,
            filename=meta["filename"],
            content_type=meta["content_type"],
        )
        return response


class _ListField(serializers.ListField):
    """A list of column names: JSON list, or (multipart) one field per name or comma-separated."""

    def to_internal_value(self, data):
        if isinstance(data, str):
            text = data.strip()
            if text.startswith("["):
                try:
                    data = json.loads(text)
                except ValueError:
                    raise serializers.ValidationError("not a JSON list") from None
            else:
                data = [p.strip() for p in text.split(",") if p.strip()]
        return super().to_internal_value(data)


class BatchJobApi(APIView):
    """Score a file (multipart ``input``) or an MLflow artifact (JSON ``input_uri``)."""

    write_scope = DEPLOY
    parser_classes = [JSONParser, MultiPartParser]

    class InputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=256)
        version = serializers.CharField(
            required=False, allow_null=True, allow_blank=True, max_length=20
        )
        alias = serializers.CharField(
            required=False, allow_null=True, allow_blank=True, max_length=255
        )
        input_uri = serializers.CharField(
            required=False, allow_null=True, allow_blank=True, max_length=2000
        )
        keep_columns = _ListField(
            child=serializers.CharField(max_length=256),
            required=False,
            default=list,
            max_length=200,
        )
        format = serializers.ChoiceField(choices=["csv", "parquet"], required=False, default="csv")
        chunk_rows = serializers.IntegerField(required=False, allow_null=True, min_value=1)
        on_error = serializers.ChoiceField(choices=["fail", "skip"], required=False, default="fail")

    @extend_schema(request=InputSerializer, responses={202: JobDetailOutput})
    def post(self, request):
        limit = settings.CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > limit + 1024 * 1024:
            raise ApplicationError(
                f"the input is larger than {limit} bytes (CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES)",
                code="payload_too_large",
                status_code=413,
            )
        payload = request.data
        upload = None
        if hasattr(payload, "getlist"):
            upload = request.FILES.get("input")
            fields = {k: payload.get(k) for k in payload if k not in ("input", "keep_columns")}
            keep = payload.getlist("keep_columns")
            if keep:
                fields["keep_columns"] = keep[0] if len(keep) == 1 else keep
        else:
            fields = dict(payload) if isinstance(payload, dict) else {}
        data = validated(self.InputSerializer, fields)
        if upload is None and not data.get("input_uri"):
            raise ApplicationError(
                "give the file as multipart field 'input', or 'input_uri'", code="invalid_input"
            )
        staged = None
        if upload is not None:
            if upload.size > limit:
                raise ApplicationError(
                    f"the input is larger than {limit} bytes (CONTROLPLANE_BATCH_UPLOAD_MAX_BYTES)",
                    code="payload_too_large",
                    status_code=413,
                )
            staged = _stage(upload)
        try:
            job = _submit_batch(
                request, data, upload=staged, upload_name=getattr(upload, "name", "")
            )
        finally:
            if staged is not None and staged.exists():
                staged.unlink()  # refused: nothing kept
        return _accepted(request, job)


def _stage(upload) -> Path:
    staging = Path(settings.CONTROLPLANE_JOBS_DIR) / ".staging"
    staging.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = staging / uuid.uuid4().hex
    with open(path, "wb") as out:
        for chunk in upload.chunks():
            out.write(chunk)
    return path


def _submit_batch(request, data: dict, *, upload: Path | None, upload_name: str) -> Job:
    return services.batch_job_submit(
        actor=request.user,
        model=data["model"],
        version=data.get("version") or None,
        alias=data.get("alias") or None,
        upload=upload,
        upload_name=upload_name,
        input_uri=data.get("input_uri") or None,
        keep_columns=data.get("keep_columns") or [],
        format=data.get("format") or "csv",
        chunk_rows=data.get("chunk_rows"),
        on_error=data.get("on_error") or "fail",
    )


class ConvertInput(serializers.Serializer):
    model = serializers.CharField(max_length=256)
    version = serializers.CharField(max_length=20)
    target = serializers.ChoiceField(choices=["onnx"], required=False, default="onnx")
    quantize = serializers.ChoiceField(
        choices=["dynamic-int8"], required=False, allow_null=True, default=None
    )
    opset = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=7, max_value=30
    )


class ConvertApi(APIView):
    """Convert one version (to ONNX, optionally quantized) as a job; 202 with the job."""

    write_scope = REGISTRY_WRITE

    class InputSerializer(serializers.Serializer):
        target = serializers.ChoiceField(choices=["onnx"], required=False, default="onnx")
        quantize = serializers.ChoiceField(
            choices=["dynamic-int8"], required=False, allow_null=True, default=None
        )
        opset = serializers.IntegerField(
            required=False, allow_null=True, default=None, min_value=7, max_value=30
        )
        tolerances = serializers.DictField(
            required=False,
            allow_null=True,
            default=None,
            help_text="verification tolerances overriding the defaults (README: Conversion)",
        )

    @extend_schema(request=InputSerializer, responses={202: JobDetailOutput})
    def post(self, request, name, version):
        data = validated(self.InputSerializer, request.data)
        job = services.convert_job_submit(
            actor=request.user,
            model=name,
            version=version,
            target=data["target"],
            quantize=data["quantize"],
            opset=data["opset"],
            tolerances=data["tolerances"],
        )
        return _accepted(request, job)
