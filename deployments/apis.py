"""REST API v1 for deployments. Thin: validate, call one service or selector, serialize."""

from __future__ import annotations

import time

from django.db import transaction
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import Right, user_can
from accounts.scopes import DEPLOY
from controlplane.lib.apis import paginate, validated
from controlplane.lib.errors import ApplicationError, Conflict

from . import selectors, services, shadow
from .models import Deployment, DeploymentEvent, Instance, Revision
from .shadow_report import shadow_summary

WAIT_DONE = {Deployment.Status.READY, Deployment.Status.FAILED, Deployment.Status.STOPPED}


class InstanceOutput(serializers.ModelSerializer):
    revision = serializers.IntegerField(source="revision.number")
    address = serializers.CharField()
    node = serializers.CharField()

    class Meta:
        model = Instance
        fields = [
            "revision",
            "ordinal",
            "runtime",
            "runtime_id",
            "node",
            "address",
            "state",
            "restarts",
            "last_error",
            "started_at",
            "last_probe_at",
        ]


class DeploymentOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.SerializerMethodField()
    alias = serializers.CharField(source="target_alias")
    revision = serializers.SerializerMethodField()
    serving_revision = serializers.SerializerMethodField()
    model_version = serializers.SerializerMethodField()
    endpoint = serializers.CharField()
    resources = serializers.SerializerMethodField()
    predict_method = serializers.SerializerMethodField()
    autoscaling = serializers.SerializerMethodField()
    instances = InstanceOutput(many=True)
    strategy = serializers.SerializerMethodField()
    rollout = serializers.SerializerMethodField()

    class Meta:
        model = Deployment
        fields = [
            "name",
            "model",
            "version",
            "alias",
            "runtime",
            "replicas",
            "resources",
            "placement",
            "env",
            "environment",
            "predict_method",
            "autoscaling",
            "status",
            "phase",
            "phase_started_at",
            "status_message",
            "revision",
            "serving_revision",
            "model_version",
            "endpoint",
            "instances",
            "strategy",
            "rollout",
            "created_at",
            "updated_at",
        ]

    def get_strategy(self, obj) -> dict:
        return obj.strategy or {"type": "rolling"}

    def get_rollout(self, obj) -> dict | None:
        from .rollouts import rollout_summary

        return rollout_summary(obj)

    def get_version(self, obj) -> str | None:
        return str(obj.target_version) if obj.target_version else None

    def get_revision(self, obj) -> int | None:
        return obj.desired_revision.number if obj.desired_revision else None

    def get_serving_revision(self, obj) -> int | None:
        return obj.serving_revision.number if obj.serving_revision else None

    def get_model_version(self, obj) -> str | None:
        rev = obj.serving_revision or obj.desired_revision
        return str(rev.model_version.version) if rev else None

    def get_resources(self, obj) -> dict:
        return {"cpu": obj.cpu, "memory_mb": obj.memory_mb, "gpu": obj.gpu}

    def get_predict_method(self, obj) -> str | None:
        return obj.predict_method or None

    def get_autoscaling(self, obj) -> dict | None:
        """The policy with the windows in force, the replicas it wants now and the cold
        starts so far; null for fixed replicas."""
        from .scaling import autoscaling_view

        return autoscaling_view(obj)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        request = self.context.get("request")
        # Environment values may be secrets: readers without the deploy right see the names only.
        if request is not None and not user_can(request.user, Right.DEPLOY):
            data["env"] = {key: "********" for key in data.get("env") or {}}
        return data


class RevisionOutput(serializers.ModelSerializer):
    model_version = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username", default=None)

    class Meta:
        model = Revision
        fields = [
            "number",
            "model_version",
            "spec",
            "model_sha256",
            "reason",
            "state",
            "failure",
            "rollout_started_at",
            "live_at",
            "created_by",
            "created_at",
        ]

    def get_model_version(self, obj) -> str:
        return str(obj.model_version.version)


class EventOutput(serializers.ModelSerializer):
    revision = serializers.IntegerField(source="revision.number", default=None)

    class Meta:
        model = DeploymentEvent
        fields = ["kind", "message", "revision", "created_at"]


class ResourcesInput(serializers.Serializer):
    cpu = serializers.FloatField(required=False, allow_null=True)
    memory_mb = serializers.IntegerField(required=False, allow_null=True)
    gpu = serializers.FloatField(required=False, allow_null=True, help_text="ray runtime")


def _wait_timeout(request) -> float | None:
    """Parse ``?wait=ready&timeout=S`` before anything changes (bad input changes nothing)."""
    wait = request.query_params.get("wait")
    if not wait:
        return None
    if wait != "ready":
        raise ApplicationError("wait only supports 'ready'", code="invalid_wait")
    try:
        timeout = float(request.query_params.get("timeout", "60"))
    except ValueError:
        raise ApplicationError(
            "timeout must be a number of seconds", code="invalid_timeout"
        ) from None
    if not 0 < timeout <= 600:
        raise ApplicationError("timeout must be between 0 and 600 seconds", code="invalid_timeout")
    return timeout


def _wait(name: str, timeout: float | None) -> Deployment:
    """Block until the deployment settles (ready on its desired revision, failed or stopped)."""
    deployment = selectors.deployment_get(name=name)
    if timeout is None:
        return deployment
    deadline = time.monotonic() + timeout
    while deployment.status not in WAIT_DONE and time.monotonic() < deadline:
        time.sleep(0.2)
        deployment = selectors.deployment_get(name=name)
    return deployment


def _failed_wait(d: Deployment, timeout: float | None) -> None:
    """A caller that waited (a CI step) gets a 409 with the failure, never a 2xx, for a
    deployment that failed; the change it asked for stays recorded, as without wait."""
    if timeout is not None and d.status == Deployment.Status.FAILED:
        raise Conflict(
            f"deployment {d.name} failed: {d.status_message or 'see its events'}",
            code="deployment_failed",
            details=DeploymentOutput(d).data,
        )


WAIT_PARAMS = [
    OpenApiParameter(
        "wait", str, description="'ready': answer once the deployment is ready, failed or stopped"
    ),
    OpenApiParameter("timeout", float, description="seconds to wait at most (default 60, max 600)"),
]


class DeploymentListApi(APIView):
    write_scope = DEPLOY

    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=63)
        model = serializers.CharField(max_length=256)
        version = serializers.CharField(required=False, max_length=20)
        alias = serializers.CharField(required=False, max_length=255)
        runtime = serializers.CharField(required=False, max_length=16)
        replicas = serializers.IntegerField(required=False, default=1)
        resources = ResourcesInput(required=False)
        env = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
        environment = serializers.CharField(
            required=False, max_length=16, help_text="auto (default), isolated or shared"
        )
        predict_method = serializers.CharField(
            required=False, allow_null=True, allow_blank=True, max_length=64
        )
        autoscaling = serializers.JSONField(
            required=False,
            allow_null=True,
            help_text='{"min_replicas": 0-16, "max_replicas": 1-16, "target_in_flight": N, '
            '"target_rps"?, "scale_up_window_s"?, "scale_down_window_s"?, '
            '"idle_before_zero_s"?}; null: fixed replicas',
        )
        strategy = serializers.JSONField(
            required=False, help_text='rolling (default) or {"type": "canary", "steps": [...]}'
        )
        placement = serializers.DictField(
            child=serializers.CharField(max_length=63),
            required=False,
            help_text="node labels every instance must run on (ray runtime)",
        )

    @extend_schema(responses=DeploymentOutput(many=True))
    def get(self, request):
        return paginate(request, self, selectors.deployment_list(), DeploymentOutput)

    @extend_schema(
        request=InputSerializer,
        responses={201: DeploymentOutput, 202: DeploymentOutput},
        parameters=WAIT_PARAMS,
    )
    def post(self, request):
        data = validated(self.InputSerializer, request.data)
        timeout = _wait_timeout(request)
        d = services.deployment_create(
            name=data["name"],
            model_name=data["model"],
            version=data.get("version"),
            alias=data.get("alias"),
            runtime=data.get("runtime"),
            replicas=data["replicas"],
            resources=data.get("resources"),
            env=data.get("env"),
            environment=data.get("environment"),
            predict_method=data.get("predict_method"),
            autoscaling=data.get("autoscaling"),
            strategy=data.get("strategy"),
            placement=data.get("placement"),
            actor=request.user,
        )
        d = _wait(d.name, timeout)
        _failed_wait(d, timeout)
        code = (
            status.HTTP_201_CREATED
            if d.status == Deployment.Status.READY
            else status.HTTP_202_ACCEPTED
        )
        return Response(DeploymentOutput(d).data, status=code)


class DeploymentDetailApi(APIView):
    write_scope = DEPLOY

    class InputSerializer(serializers.Serializer):
        version = serializers.CharField(required=False, max_length=20)
        alias = serializers.CharField(required=False, max_length=255)
        replicas = serializers.IntegerField(required=False)
        resources = ResourcesInput(required=False)
        env = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
        environment = serializers.CharField(
            required=False, max_length=16, help_text="auto, isolated or shared"
        )
        predict_method = serializers.CharField(
            required=False, allow_null=True, allow_blank=True, max_length=64
        )
        autoscaling = serializers.JSONField(
            required=False,
            allow_null=True,
            help_text='{"min_replicas": 0-16, "max_replicas": 1-16, "target_in_flight": N, '
            '"target_rps"?, "scale_up_window_s"?, "scale_down_window_s"?, '
            '"idle_before_zero_s"?}; null: fixed replicas',
        )
        placement = serializers.DictField(
            child=serializers.CharField(max_length=63),
            required=False,
            help_text="node labels every instance must run on (ray runtime)",
        )
        stopped = serializers.BooleanField(required=False)
        shadow = serializers.JSONField(
            required=False,
            allow_null=True,
            help_text='{"version": "3", "fraction": 0.25} mirrors that share of the prediction '
            "requests to the version (callers get the primary's answers); null stops it",
        )
        strategy = serializers.JSONField(
            required=False,
            help_text='how this and later rollouts go: {"type": "rolling"} or '
            '{"type": "canary", "steps": [{"weight": 10, "seconds": 120}, ...]}',
        )
        variants = serializers.JSONField(
            required=False,
            help_text='A/B split: [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]',
        )
        sticky = serializers.CharField(
            required=False, allow_blank=True, max_length=80, help_text='"header:X-User-Id"'
        )

    @extend_schema(responses=DeploymentOutput)
    def get(self, request, name):
        d = selectors.deployment_get(name=name)
        data = DeploymentOutput(d, context={"request": request}).data
        data["shadow"] = shadow_summary(deployment=d)
        return Response(data)

    @extend_schema(
        request=InputSerializer,
        responses={200: DeploymentOutput, 202: DeploymentOutput},
        parameters=WAIT_PARAMS,
    )
    def patch(self, request, name):
        d = selectors.deployment_get(name=name)
        data = validated(self.InputSerializer, request.data)
        timeout = _wait_timeout(request)
        stopped = data.pop("stopped", None)
        has_shadow, shadow_spec = "shadow" in data, data.pop("shadow", None)
        if has_shadow and shadow_spec is not None and not isinstance(shadow_spec, dict):
            raise ApplicationError(
                'shadow must be {"version": ..., "fraction": ...} or null', code="invalid_shadow"
            )
        if shadow_spec and set(shadow_spec) - {"version", "fraction"}:
            raise ApplicationError(
                "shadow takes only 'version' and 'fraction'", code="invalid_shadow"
            )
        if "variants" in data or "sticky" in data:
            from .rollouts import deployment_split

            if set(data) - {"variants", "sticky"} or stopped is not None or has_shadow:
                raise ApplicationError(
                    "variants and sticky go without other fields", code="invalid_split"
                )
            deployment_split(
                deployment=d,
                variants=data.get("variants"),
                sticky=data.get("sticky"),
                actor=request.user,
            )
            data = {}
        # One transaction: a refused part (a shadow of a missing version) changes nothing.
        with transaction.atomic():
            if stopped is True:
                services.deployment_stop(deployment=d, actor=request.user)
            elif stopped is False:
                services.deployment_start(deployment=d, actor=request.user)
            if data:
                services.deployment_update(deployment=d, actor=request.user, **data)
            if has_shadow and shadow_spec is None:
                shadow.shadow_stop(deployment=d, actor=request.user)
            elif has_shadow:
                shadow.shadow_start(
                    deployment=d,
                    version=shadow_spec.get("version"),
                    fraction=shadow_spec.get("fraction"),
                    actor=request.user,
                )
        d = _wait(name, timeout)
        _failed_wait(d, timeout)
        return Response(
            DeploymentOutput(d).data,
            status=status.HTTP_202_ACCEPTED if d.status not in WAIT_DONE else status.HTTP_200_OK,
        )

    @extend_schema(responses={202: None})
    def delete(self, request, name):
        services.deployment_delete(
            deployment=selectors.deployment_get(name=name), actor=request.user
        )
        return Response(status=status.HTTP_202_ACCEPTED)


class RevisionListApi(APIView):
    @extend_schema(responses=RevisionOutput(many=True))
    def get(self, request, name):
        d = selectors.deployment_get(name=name)
        return paginate(request, self, selectors.revision_list(deployment=d), RevisionOutput)


class EventListApi(APIView):
    @extend_schema(responses=EventOutput(many=True))
    def get(self, request, name):
        d = selectors.deployment_get(name=name)
        return Response(EventOutput(selectors.event_list(deployment=d), many=True).data)


class RollbackApi(APIView):
    write_scope = DEPLOY

    class InputSerializer(serializers.Serializer):
        revision = serializers.IntegerField(required=False, min_value=1)
        reason = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=2000
        )

    @extend_schema(
        request=InputSerializer, responses={202: DeploymentOutput}, parameters=WAIT_PARAMS
    )
    def post(self, request, name):
        d = selectors.deployment_get(name=name)
        data = validated(self.InputSerializer, request.data or {})
        timeout = _wait_timeout(request)
        services.deployment_rollback(
            deployment=d, revision=data.get("revision"), actor=request.user, reason=data["reason"]
        )
        d = _wait(name, timeout)
        _failed_wait(d, timeout)
        return Response(DeploymentOutput(d).data, status=status.HTTP_202_ACCEPTED)


class RolloutActionApi(APIView):
    """POST /deployments/{name}/rollout/{promote,abort,pause,resume}."""

    write_scope = DEPLOY

    class InputSerializer(serializers.Serializer):
        reason = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=2000
        )

    @extend_schema(request=InputSerializer, responses={202: DeploymentOutput})
    def post(self, request, name, action):
        from .rollouts import rollout_control

        d = selectors.deployment_get(name=name)
        data = validated(self.InputSerializer, request.data or {})
        rollout_control(deployment=d, action=action, actor=request.user, reason=data["reason"])
        d = selectors.deployment_get(name=name)
        return Response(
            DeploymentOutput(d, context={"request": request}).data,
            status=status.HTTP_202_ACCEPTED,
        )


class LogsApi(APIView):
    @extend_schema(parameters=[OpenApiParameter("tail", int)], responses=dict)
    def get(self, request, name):
        d = selectors.deployment_get(name=name)
        try:
            tail = int(request.query_params.get("tail", "100"))
        except ValueError:
            raise ApplicationError("tail must be an integer", code="invalid_tail") from None
        if not 1 <= tail <= 5000:
            raise ApplicationError("tail must be between 1 and 5000", code="invalid_tail")
        return Response({"instances": selectors.deployment_logs(deployment=d, tail=tail)})


class ShadowPromoteApi(APIView):
    """Promote the active shadow to primary through the normal rollout."""

    write_scope = DEPLOY

    @extend_schema(request=None, responses={202: DeploymentOutput}, parameters=WAIT_PARAMS)
    def post(self, request, name):
        d = selectors.deployment_get(name=name)
        timeout = _wait_timeout(request)
        shadow.shadow_promote(deployment=d, actor=request.user)
        d = _wait(name, timeout)
        return Response(DeploymentOutput(d).data, status=status.HTTP_202_ACCEPTED)


class ClusterApi(APIView):
    """The nodes deployments can run on, per runtime, with their resources."""

    @extend_schema(responses=dict)
    def get(self, request):
        from .cluster import cluster_nodes

        return Response(cluster_nodes())
