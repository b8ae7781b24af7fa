"""REST API v1 for monitoring. Thin: validate, call one service or selector, serialize."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.views.decorators.http import require_GET
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.scopes import MONITORING_WRITE
from controlplane.lib.apis import paginate, validated
from controlplane.lib.errors import ApplicationError, NotFound
from registry.selectors import model_version_get, registered_model_get

from . import catalog, selectors, services
from .adapters import AdapterError, ModelServer
from .models import AlertEvent, AlertNotification, AlertRule, DriftReference, ProbeResult

_STEP = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_STEP = 3660 * 86400
MAX_INT = 2**31 - 1


def _model_version(name: str, version: str):
    if "\x00" in name or "\x00" in version:
        raise NotFound("model version not found")
    return model_version_get(model=registered_model_get(name=name), version=version)


def parse_time(raw: str | None, name: str) -> datetime | None:
    """An ISO 8601 date-time (``Z``, an offset or naive UTC) or a date; 400 otherwise."""
    if raw is None or raw == "":
        return None
    text = raw.strip()
    # An unencoded '+' of an offset arrives as a space.
    text = re.sub(r"(\d) (\d{2}:?\d{2})$", r"\1+\2", text)
    try:
        value = parse_datetime(text)
        if value is None:
            day = parse_date(text)
            value = datetime(day.year, day.month, day.day) if day else None
    except ValueError:
        value = None
    if value is None:
        raise ApplicationError(
            f"{name} must be an ISO 8601 date-time, e.g. 2025-01-31T12:00:00Z",
            code="invalid_time",
            details={name: raw},
        )
    if timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    return value


def parse_step(raw: str | None) -> int:
    if raw is None or raw == "":
        return 60
    match = _STEP.match(raw)
    step = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not 0 < step <= MAX_STEP:
        raise ApplicationError(
            "step must be a positive number of seconds (or with s, m, h, d), at most 10 years",
            code="invalid_step",
            details={"step": raw},
        )
    return step


def parse_version_param(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_INT:
        raise ApplicationError("version must be a version number", code="invalid_version")
    return int(raw)


METRICS_PARAMS = [
    OpenApiParameter("name", str, required=True, enum=list(catalog.METRICS)),
    OpenApiParameter("from", str, description="ISO 8601; default: one hour before 'to'"),
    OpenApiParameter("to", str, description="ISO 8601; default: now"),
    OpenApiParameter("step", str, description="seconds per point (or 30s, 5m, 1h, 1d); default 60"),
    OpenApiParameter("version", int, description="only this model version"),
    OpenApiParameter("feature", str, description="drift_psi of one feature (default: the largest)"),
]


class MetricsApi(APIView):
    class OutputSerializer(serializers.Serializer):
        class PointSerializer(serializers.Serializer):
            t = serializers.CharField()
            value = serializers.FloatField()

        name = serializers.CharField()
        points = PointSerializer(many=True)

    @extend_schema(parameters=METRICS_PARAMS, responses=OutputSerializer)
    def get(self, request, name):
        deployment = selectors.deployment_get(name=name)
        params = request.query_params
        metric = params.get("name")
        if not metric:
            raise ApplicationError("name is required", code="missing_name")
        if metric not in catalog.METRICS:
            raise ApplicationError(
                f"unknown metric {metric!r}",
                code="unknown_metric",
                details={"names": list(catalog.METRICS)},
            )
        end = parse_time(params.get("to"), "to") or timezone.now()
        try:
            start = parse_time(params.get("from"), "from") or end - timedelta(hours=1)
        except OverflowError:
            raise ApplicationError("to is too early", code="invalid_time") from None
        step = parse_step(params.get("step"))
        version = parse_version_param(params.get("version"))
        if start >= end:
            raise ApplicationError("from must be before to", code="invalid_range")
        try:
            start_s, end_s = math.floor(start.timestamp()), math.ceil(end.timestamp())
        except (OverflowError, ValueError):
            raise ApplicationError(
                "from and to must be between years 1 and 9999", code="invalid_time"
            ) from None
        if (end_s - start_s) / step > selectors.MAX_POINTS:
            raise ApplicationError(
                f"at most {selectors.MAX_POINTS} points; use a larger step", code="too_many_points"
            )
        feature = params.get("feature") or None
        if feature is not None and ("\x00" in feature or len(feature) > 256):
            raise ApplicationError("feature must be a column name", code="invalid_feature")
        times, values = selectors.metric_columns(
            deployment_id=deployment.pk,
            name=metric,
            start=start_s,
            end=end_s,
            step=step,
            version=version,
            feature=feature,
        )
        points = [
            {"t": t, "value": value}
            for t, value in zip(selectors.iso_times(times), values, strict=True)
        ]
        return Response({"name": metric, "points": points})


class FeedbackApi(APIView):
    write_scope = MONITORING_WRITE

    class OutputSerializer(serializers.Serializer):
        received = serializers.IntegerField()
        matched = serializers.IntegerField()
        pending = serializers.IntegerField(
            help_text="labels kept: applied when their predictions are collected"
        )
        pending_request_ids = serializers.ListField(child=serializers.CharField())
        unknown = serializers.IntegerField(
            help_text="labels dropped: they waited past CONTROLPLANE_PREDICTION_RETENTION_DAYS"
        )
        unknown_request_ids = serializers.ListField(child=serializers.CharField())
        mismatched = serializers.IntegerField()
        mismatched_request_ids = serializers.ListField(child=serializers.CharField())
        pairs = serializers.IntegerField()

    @extend_schema(
        request={
            "application/json": {
                "type": "array",
                "maxItems": services.FEEDBACK_MAX_ITEMS,
                "items": {
                    "type": "object",
                    "required": ["request_id", "label"],
                    "properties": {"request_id": {"type": "string"}, "label": {}},
                },
            }
        },
        responses=OutputSerializer,
    )
    def post(self, request, name):
        deployment = selectors.deployment_get(name=name)
        result = services.feedback_record(
            deployment=deployment, items=request.data, actor=request.user
        )
        return Response(self.OutputSerializer(result).data)


class ProbeListApi(APIView):
    class OutputSerializer(serializers.ModelSerializer):
        class Meta:
            model = ProbeResult
            fields = ["ts", "ok", "latency_ms", "status_code", "model_version", "kind", "error"]

    @extend_schema(responses=OutputSerializer(many=True))
    def get(self, request, name):
        deployment = selectors.deployment_get(name=name)
        return Response(
            self.OutputSerializer(selectors.probe_list(deployment=deployment), many=True).data
        )


class AlertRuleOutput(serializers.ModelSerializer):
    deployment = serializers.CharField(source="deployment.name")
    # Plain strings in the schema: 'state' and 'comparison' enums would collide with others.
    state = serializers.CharField(help_text="ok, firing or resolved")
    comparison = serializers.CharField(help_text="gt, gte, lt or lte")

    class Meta:
        model = AlertRule
        fields = [
            "id",
            "name",
            "deployment",
            "metric",
            "model_version",
            "window_s",
            "comparison",
            "threshold",
            "min_samples",
            "enabled",
            "webhook_url",
            "email_to",
            "rollback_on_fire",
            "state",
            "state_changed_at",
            "last_value",
            "last_samples",
            "last_evaluated_at",
            "created_at",
            "updated_at",
        ]


class AlertRuleSecretOutput(AlertRuleOutput):
    """Only in the answer to a create (or a secret rotation): the webhook signing key."""

    class Meta(AlertRuleOutput.Meta):
        fields = [*AlertRuleOutput.Meta.fields, "webhook_secret"]


class RuleFields(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    metric = serializers.ChoiceField(choices=list(catalog.METRICS))
    model_version = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=MAX_INT
    )
    window_s = serializers.IntegerField(required=False, min_value=60, max_value=30 * 86400)
    comparison = serializers.ChoiceField(
        choices=AlertRule.Comparison.values, help_text="gt, gte, lt or lte"
    )
    threshold = serializers.FloatField()
    min_samples = serializers.IntegerField(required=False, min_value=1, max_value=MAX_INT)
    enabled = serializers.BooleanField(required=False)
    webhook_url = serializers.CharField(
        required=False, allow_blank=True, allow_null=True, max_length=2000
    )
    email_to = serializers.CharField(
        required=False, allow_blank=True, allow_null=True, max_length=5000
    )
    rollback_on_fire = serializers.BooleanField(required=False)


class AlertRuleListApi(APIView):
    write_scope = MONITORING_WRITE

    class InputSerializer(RuleFields):
        deployment = serializers.CharField(max_length=63)

    @extend_schema(
        parameters=[OpenApiParameter("deployment", str)], responses=AlertRuleOutput(many=True)
    )
    def get(self, request):
        name = request.query_params.get("deployment")
        deployment = selectors.deployment_get(name=name) if name else None
        return paginate(
            request, self, selectors.alert_rule_list(deployment=deployment), AlertRuleOutput
        )

    @extend_schema(request=InputSerializer, responses={201: AlertRuleSecretOutput})
    def post(self, request):
        data = validated(self.InputSerializer, request.data)
        deployment = selectors.deployment_get(name=data.pop("deployment"))
        rule = services.alert_rule_create(deployment=deployment, actor=request.user, **data)
        return Response(AlertRuleSecretOutput(rule).data, status=status.HTTP_201_CREATED)


class AlertRuleDetailApi(APIView):
    write_scope = MONITORING_WRITE

    class InputSerializer(RuleFields):
        rotate_secret = serializers.BooleanField(required=False, default=False)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for f in self.fields.values():
                f.required = False

    @extend_schema(responses=AlertRuleOutput)
    def get(self, request, rule_id):
        return Response(AlertRuleOutput(selectors.alert_rule_get(rule_id=rule_id)).data)

    @extend_schema(request=InputSerializer, responses=AlertRuleOutput)
    def patch(self, request, rule_id):
        rule = selectors.alert_rule_get(rule_id=rule_id)
        data = validated(self.InputSerializer, request.data)
        rotate = data.pop("rotate_secret", False)
        rule = services.alert_rule_update(
            rule=rule, actor=request.user, rotate_secret=rotate, **data
        )
        output = AlertRuleSecretOutput if rotate else AlertRuleOutput
        return Response(output(rule).data)

    @extend_schema(responses={204: None})
    def delete(self, request, rule_id):
        services.alert_rule_delete(
            rule=selectors.alert_rule_get(rule_id=rule_id), actor=request.user
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class AlertEventListApi(APIView):
    class OutputSerializer(serializers.ModelSerializer):
        class NotificationSerializer(serializers.ModelSerializer):
            class Meta:
                model = AlertNotification
                fields = [
                    "channel",
                    "target",
                    "status",
                    "attempts",
                    "response_status",
                    "last_error",
                    "sent_at",
                ]

        notifications = NotificationSerializer(many=True)

        class Meta:
            model = AlertEvent
            fields = [
                "id",
                "from_state",
                "to_state",
                "value",
                "samples",
                "message",
                "created_at",
                "notifications",
            ]

    @extend_schema(responses=OutputSerializer(many=True))
    def get(self, request, rule_id):
        rule = selectors.alert_rule_get(rule_id=rule_id)
        return Response(
            self.OutputSerializer(selectors.alert_event_list(rule=rule), many=True).data
        )


class DriftReferenceApi(APIView):
    write_scope = MONITORING_WRITE

    class OutputSerializer(serializers.ModelSerializer):
        features = serializers.SerializerMethodField()
        created_by = serializers.CharField(source="created_by.username", default=None)

        class Meta:
            model = DriftReference
            fields = ["source", "n_rows", "features", "created_by", "created_at"]

        def get_features(self, obj) -> list[str]:
            return sorted(obj.profile)

    @extend_schema(responses=OutputSerializer)
    def get(self, request, name, version):
        mv = _model_version(name, version)
        reference = DriftReference.objects.filter(model_version=mv, active=True).first()
        if reference is None:
            raise ApplicationError(
                f"{mv} has no drift reference yet (none uploaded, and no input example seen)",
                code="not_found",
                status_code=404,
            )
        return Response(self.OutputSerializer(reference).data)

    @extend_schema(
        request={
            "application/json": {
                "type": "object",
                "description": 'MLflow split JSON {"columns": [...], "data": [[...]]}, records, or {column: [values]}',
            }
        },
        responses={201: OutputSerializer},
    )
    def put(self, request, name, version):
        mv = _model_version(name, version)
        reference = services.drift_reference_upload(
            model_version=mv, dataset=request.data, actor=request.user
        )
        return Response(self.OutputSerializer(reference).data, status=status.HTTP_201_CREATED)


# --- Prometheus: service discovery and the metrics of servers it cannot reach ----------------
# Plain views, guarded like GET /metrics (CONTROLPLANE_PROMETHEUS_TOKEN or
# CONTROLPLANE_PROMETHEUS_ALLOW), not by API tokens: Prometheus holds the Prometheus token.


def _prometheus_forbidden() -> HttpResponse:
    response = JsonResponse(
        {
            "error": {
                "code": "forbidden",
                "message": "send the Prometheus bearer token or scrape from an allowed address",
            }
        },
        status=403,
    )
    response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_GET
def prometheus_targets(request: HttpRequest) -> HttpResponse:
    """GET /api/v1/prometheus/targets: Prometheus HTTP SD (``http_sd_configs``)."""
    from .views import prometheus_allowed

    if not prometheus_allowed(request):
        return _prometheus_forbidden()
    groups = selectors.prometheus_targets(
        control_plane=request.get_host(), scheme=request.scheme or "http"
    )
    return JsonResponse(groups, safe=False)


@require_GET
def prometheus_instance_metrics(
    request: HttpRequest, deployment: str, revision: int, ordinal: int
) -> HttpResponse:
    """The /metrics of a model server on a Unix socket, read by the control plane for
    Prometheus (the ``__metrics_path__`` of its discovered target)."""
    from .views import prometheus_allowed

    if not prometheus_allowed(request):
        return _prometheus_forbidden()
    try:
        inst = selectors.instance_for_metrics(
            deployment=deployment, revision=revision, ordinal=ordinal
        )
    except NotFound as exc:
        return JsonResponse({"error": {"code": "not_found", "message": exc.message}}, status=404)
    try:
        text = ModelServer(inst.address, timeout=5.0).metrics()
    except AdapterError as exc:
        return JsonResponse(
            {"error": {"code": "unreachable", "message": f"model server: {exc}"}}, status=502
        )
    return HttpResponse(text, content_type="text/plain; version=0.0.4; charset=utf-8")
