"""REST API v1 for the registry. Thin: validate, call one service or selector, serialize."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import Right
from accounts.scopes import DEPLOY, REGISTRY_WRITE
from controlplane.lib.apis import StringMapField, paginate, validated
from controlplane.lib.errors import ApplicationError
from controlplane.lib.schema import Error

from . import selectors, services
from .models import AliasMove, ApprovalPolicy, ModelVersion, PromotionRequest, RegisteredModel


class ModelOutput(serializers.ModelSerializer):
    aliases = serializers.SerializerMethodField()
    latest_version = serializers.SerializerMethodField()
    version_count = serializers.SerializerMethodField()

    class Meta:
        model = RegisteredModel
        fields = [
            "name",
            "description",
            "tags",
            "aliases",
            "latest_version",
            "version_count",
            "created_at",
            "updated_at",
        ]

    def get_aliases(self, obj) -> dict[str, str]:
        return {a.name: str(a.version.version) for a in obj.aliases.all()}

    def get_latest_version(self, obj) -> str | None:
        latest = getattr(obj, "latest_version", None)
        if latest is None and not hasattr(obj, "version_count"):
            latest = obj.versions.order_by("-version").values_list("version", flat=True).first()
        return str(latest) if latest is not None else None

    def get_version_count(self, obj) -> int:
        count = getattr(obj, "version_count", None)
        return count if count is not None else obj.versions.count()


class VersionOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.SerializerMethodField()
    aliases = serializers.SerializerMethodField()
    created_by = serializers.CharField(source="created_by.username", default=None)

    class Meta:
        model = ModelVersion
        fields = [
            "model",
            "version",
            "status",
            "source",
            "run_id",
            "description",
            "tags",
            "metrics",
            "params",
            "flavors",
            "signature",
            "input_example",
            "requirements",
            "aliases",
            "created_at",
            "created_by",
        ]

    def get_version(self, obj) -> str:
        return str(obj.version)

    def get_aliases(self, obj) -> list[str]:
        return sorted(a.name for a in obj.aliases.all())


class MoveOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    actor = serializers.CharField(source="actor_label")
    from_version = serializers.SerializerMethodField()
    to_version = serializers.SerializerMethodField()
    approved_by = serializers.SerializerMethodField()
    time = serializers.DateTimeField(source="created_at")

    class Meta:
        model = AliasMove
        fields = [
            "id",
            "model",
            "alias",
            "from_version",
            "to_version",
            "actor",
            "reason",
            "origin",
            "approved_by",
            "time",
        ]

    def get_from_version(self, obj) -> str | None:
        return str(obj.from_version) if obj.from_version is not None else None

    def get_to_version(self, obj) -> str | None:
        return str(obj.to_version) if obj.to_version is not None else None

    def get_approved_by(self, obj) -> str | None:
        if obj.request_id and obj.request and obj.request.decided_by:
            return obj.request.decided_by.username
        return None

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data["from"] = data.pop("from_version")
        data["to"] = data.pop("to_version")
        return data


class RequestOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name")
    version = serializers.SerializerMethodField()
    requested_by = serializers.CharField(source="requested_by.username")
    decided_by = serializers.CharField(source="decided_by.username", default=None)

    class Meta:
        model = PromotionRequest
        fields = [
            "id",
            "model",
            "alias",
            "version",
            "reason",
            "status",
            "requested_by",
            "requested_at",
            "decided_by",
            "decided_at",
            "decision_comment",
        ]

    def get_version(self, obj) -> str:
        return str(obj.version.version)


# --- models -------------------------------------------------------------------------------


class ModelListApi(APIView):
    write_scope = REGISTRY_WRITE

    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=256)
        description = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=20000
        )
        tags = StringMapField(required=False, default=dict)

    @extend_schema(responses=ModelOutput(many=True))
    def get(self, request):
        qs = selectors.registered_model_list(
            search=request.query_params.get("search", "")[:256],
            tag=request.query_params.get("tag", "")[:256],
        )
        return paginate(request, self, qs, ModelOutput)

    @extend_schema(request=InputSerializer, responses={201: ModelOutput})
    def post(self, request):
        data = validated(self.InputSerializer, request.data)
        model = services.registered_model_create(actor=request.user, **data)
        return Response(
            ModelOutput(selectors.registered_model_get(name=model.name)).data, status=201
        )


class ModelDetailApi(APIView):
    write_scope = REGISTRY_WRITE

    class InputSerializer(serializers.Serializer):
        description = serializers.CharField(required=False, allow_blank=True, max_length=20000)
        tags = StringMapField(required=False)

    @extend_schema(responses=ModelOutput)
    def get(self, request, name):
        return Response(ModelOutput(selectors.registered_model_get(name=name)).data)

    @extend_schema(request=InputSerializer, responses=ModelOutput)
    def patch(self, request, name):
        model = selectors.registered_model_get(name=name)
        data = validated(self.InputSerializer, request.data)
        services.registered_model_update(model=model, actor=request.user, **data)
        return Response(ModelOutput(selectors.registered_model_get(name=name)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, name):
        services.registered_model_delete(
            model=selectors.registered_model_get(name=name), actor=request.user
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- versions -----------------------------------------------------------------------------


class VersionListApi(APIView):
    write_scope = REGISTRY_WRITE
    parser_classes = [JSONParser, MultiPartParser]

    class InputSerializer(serializers.Serializer):
        source = serializers.CharField(required=False, max_length=2000)
        artifact = serializers.FileField(required=False)
        description = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=20000
        )
        tags = StringMapField(required=False, default=dict)

    @extend_schema(responses=VersionOutput(many=True))
    def get(self, request, name):
        model = selectors.registered_model_get(name=name)
        return paginate(request, self, selectors.model_version_list(model=model), VersionOutput)

    @extend_schema(request=InputSerializer, responses={201: VersionOutput})
    def post(self, request, name):
        model = selectors.registered_model_get(name=name)
        payload = request.data
        if hasattr(payload, "getlist"):  # multipart: a plain dict, tags as a JSON string
            payload = {**payload.dict(), "tags": _json_field(payload.get("tags"), "tags")}
        data = validated(self.InputSerializer, payload)
        artifact = data.get("artifact")
        mv = services.model_version_register(
            model_name=model.name,
            source=data.get("source"),
            archive=artifact.file if artifact else None,
            archive_size=artifact.size if artifact else None,
            description=data["description"],
            tags=data["tags"],
            actor=request.user,
        )
        mv = selectors.model_version_get(model=model, version=mv.version)
        return Response(VersionOutput(mv).data, status=201)


def _json_field(raw, name: str):
    import json

    if raw in (None, ""):
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise ApplicationError(f"{name} must be a JSON object", code="invalid") from None


class VersionDetailApi(APIView):
    write_scope = REGISTRY_WRITE

    class InputSerializer(serializers.Serializer):
        description = serializers.CharField(required=False, allow_blank=True, max_length=20000)
        tags = StringMapField(required=False)
        status = serializers.ChoiceField(choices=ModelVersion.Status.choices, required=False)

    @extend_schema(responses=VersionOutput)
    def get(self, request, name, version):
        model = selectors.registered_model_get(name=name)
        return Response(
            VersionOutput(selectors.model_version_get(model=model, version=version)).data
        )

    @extend_schema(request=InputSerializer, responses=VersionOutput)
    def patch(self, request, name, version):
        model = selectors.registered_model_get(name=name)
        mv = selectors.model_version_get(model=model, version=version)
        data = validated(self.InputSerializer, request.data)
        new_status = data.pop("status", None)
        if data:
            mv = services.model_version_update(mv=mv, actor=request.user, **data)
        if new_status == ModelVersion.Status.ARCHIVED:
            services.model_version_archive(mv=mv, actor=request.user)
        elif new_status == ModelVersion.Status.READY:
            services.model_version_restore(mv=mv, actor=request.user)
        return Response(
            VersionOutput(selectors.model_version_get(model=model, version=version)).data
        )

    @extend_schema(responses={204: None})
    def delete(self, request, name, version):
        model = selectors.registered_model_get(name=name)
        services.model_version_delete(
            mv=selectors.model_version_get(model=model, version=version), actor=request.user
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class VersionBundleApi(APIView):
    """An ONNX version as an edge bundle (zip: model, signature, example, manifest, runner)."""

    @extend_schema(
        responses={
            (200, "application/zip"): bytes,
            409: OpenApiResponse(Error, description="the version is not an ONNX model"),
        }
    )
    def get(self, request, name, version):
        from django.http import HttpResponse

        from .bundle import model_version_bundle

        model = selectors.registered_model_get(name=name)
        mv = selectors.model_version_get(model=model, version=version)
        response = HttpResponse(model_version_bundle(mv=mv), content_type="application/zip")
        response["Content-Disposition"] = (
            f'attachment; filename="{model.name}-v{mv.version}-onnx-bundle.zip"'
        )
        return response


# --- aliases, history, compare --------------------------------------------------------------


class AliasApi(APIView):
    # A followed alias moves with the deploy right, any other with registry
    # write: the service decides which, once it knows whether a deployment follows.
    write_scope = (REGISTRY_WRITE, DEPLOY)
    write_right = (Right.REGISTRY_WRITE, Right.DEPLOY)

    class PromoteInput(serializers.Serializer):
        version = serializers.CharField(max_length=20)
        reason = serializers.CharField(max_length=2000)

    class RemoveInput(serializers.Serializer):
        reason = serializers.CharField(max_length=2000)

    @extend_schema(request=PromoteInput, responses={201: MoveOutput, 202: RequestOutput})
    def post(self, request, name, alias):
        model = selectors.registered_model_get(name=name)
        data = validated(self.PromoteInput, request.data)
        outcome = services.alias_promote(model=model, alias=alias, actor=request.user, **data)
        if outcome.request is not None:
            return Response(RequestOutput(outcome.request).data, status=status.HTTP_202_ACCEPTED)
        return Response(MoveOutput(outcome.move).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=RemoveInput, responses=MoveOutput)
    def delete(self, request, name, alias):
        model = selectors.registered_model_get(name=name)
        data = validated(
            self.RemoveInput, request.data or {"reason": request.query_params.get("reason", "")}
        )
        move = services.alias_remove(model=model, alias=alias, actor=request.user, **data)
        return Response(MoveOutput(move).data)


class HistoryApi(APIView):
    @extend_schema(responses=MoveOutput(many=True))
    def get(self, request, name):
        model = selectors.registered_model_get(name=name)
        return paginate(request, self, selectors.alias_move_list(model=model), MoveOutput)


class CompareApi(APIView):
    @extend_schema(responses=dict)
    def get(self, request, name):
        model = selectors.registered_model_get(name=name)
        versions = [v for v in request.query_params.get("versions", "").split(",") if v.strip()]
        return Response(selectors.model_versions_compare(model=model, versions=versions))


# --- approvals ------------------------------------------------------------------------------


class PromotionRequestListApi(APIView):
    @extend_schema(responses=RequestOutput(many=True))
    def get(self, request):
        wanted = request.query_params.get("status")
        if wanted and wanted not in PromotionRequest.Status.values:
            raise ApplicationError(
                f"status must be one of {', '.join(PromotionRequest.Status.values)}"
            )
        return paginate(
            request, self, selectors.promotion_request_list(status=wanted), RequestOutput
        )


class PromotionDecisionApi(APIView):
    write_scope = REGISTRY_WRITE
    write_right = Right.APPROVE
    decision: str = ""

    class InputSerializer(serializers.Serializer):
        comment = serializers.CharField(
            required=False, allow_blank=True, default="", max_length=2000
        )

    @extend_schema(request=InputSerializer, responses=RequestOutput)
    def post(self, request, request_id):
        data = validated(self.InputSerializer, request.data)
        decide = (
            services.promotion_request_approve
            if self.decision == "approve"
            else services.promotion_request_reject
        )
        result = decide(request_id=request_id, actor=request.user, comment=data["comment"])
        return Response(RequestOutput(result).data)


# --- approval policies ----------------------------------------------------------------------


class PolicyOutput(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name", default=None, allow_null=True)
    required_approvals = serializers.SerializerMethodField()

    class Meta:
        model = ApprovalPolicy
        fields = ["id", "model", "alias", "required_approvals", "created_at"]

    def get_required_approvals(self, obj) -> int:
        return 1


class ApprovalPolicyListApi(APIView):
    write_scope = REGISTRY_WRITE
    write_right = Right.MANAGE_POLICIES

    class InputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=256, allow_null=True, required=False, default=None)
        alias = serializers.CharField(max_length=255)
        required_approvals = serializers.IntegerField(required=False, default=1)

    @extend_schema(responses=PolicyOutput(many=True))
    def get(self, request):
        return paginate(request, self, selectors.approval_policy_list(), PolicyOutput)

    @extend_schema(request=InputSerializer, responses={201: PolicyOutput})
    def post(self, request):
        data = validated(self.InputSerializer, request.data)
        policy = services.approval_policy_create(
            model_name=data["model"],
            alias=data["alias"],
            required_approvals=data["required_approvals"],
            actor=request.user,
        )
        return Response(PolicyOutput(policy).data, status=status.HTTP_201_CREATED)


class ApprovalPolicyDetailApi(APIView):
    write_scope = REGISTRY_WRITE
    write_right = Right.MANAGE_POLICIES

    class InputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=256, allow_null=True, required=False)
        alias = serializers.CharField(max_length=255, required=False)
        required_approvals = serializers.IntegerField(required=False)

    @extend_schema(responses=PolicyOutput)
    def get(self, request, policy_id):
        return Response(PolicyOutput(selectors.approval_policy_get(policy_id=policy_id)).data)

    @extend_schema(request=InputSerializer, responses=PolicyOutput)
    def patch(self, request, policy_id):
        policy = selectors.approval_policy_get(policy_id=policy_id)
        data = validated(self.InputSerializer, request.data)
        if "model" in data:
            data["model_name"] = data.pop("model")
        policy = services.approval_policy_update(policy=policy, actor=request.user, **data)
        return Response(PolicyOutput(policy).data)

    @extend_schema(responses={204: None})
    def delete(self, request, policy_id):
        services.approval_policy_delete(
            policy=selectors.approval_policy_get(policy_id=policy_id), actor=request.user
        )
        return Response(status=status.HTTP_204_NO_CONTENT)
