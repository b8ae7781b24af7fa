"""Registry UI: server-rendered pages.

Thin, like the API: parse the form, call one service or selector, render.
Domain errors (``ApplicationError``) never become a 500: a failed write is
shown as a form error or a message, a failed read as an error page with the
error's status code.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from django import forms
from django.contrib import messages
from django.core.paginator import Page, Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.permissions import Right, requires, user_can
from controlplane.lib.errors import ApplicationError
from controlplane.lib.views import error_pages

from . import selectors, services
from .models import ModelVersion, PromotionRequest

PAGE_SIZE = 25
SUGGESTED_ALIASES = ("staging", "production")
_EXAMPLE_MAX_CHARS = 20_000


# --- helpers -----------------------------------------------------------------------------


# A domain error raised while reading becomes an error page with its status code.
_ui = error_pages("registry/error.html")


def _page(request: HttpRequest, items, per_page: int = PAGE_SIZE) -> Page:
    return Paginator(items, per_page).get_page(request.GET.get("page"))


def _version_url(model_name: str, version: int | str) -> str:
    return reverse("registry:version-detail", kwargs={"name": model_name, "version": str(version)})


def _model_url(model_name: str) -> str:
    return reverse("registry:model-detail", kwargs={"name": model_name})


def _key_metrics(versions: list[ModelVersion], limit: int = 4) -> list[str]:
    """The metric names most versions on the page share (then by name)."""
    counts = Counter(key for mv in versions for key in (mv.metrics or {}))
    return [key for key, _n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


def _signature_rows(spec: Any) -> list[dict]:
    """Columns of one side of an MLflow signature (column- or tensor-based)."""
    if not isinstance(spec, list):
        return []
    rows = []
    for col in spec:
        if not isinstance(col, dict):
            continue
        detail = ""
        tensor = col.get("tensor-spec")
        if isinstance(tensor, dict):
            detail = f"dtype {tensor.get('dtype', '?')}, shape {tensor.get('shape', '?')}"
        elif col.get("required") is False:
            detail = "optional"
        rows.append(
            {"name": col.get("name") or "(unnamed)", "type": col.get("type", "?"), "detail": detail}
        )
    return rows


def _pretty_json(value: Any) -> str:
    """Indented JSON, with lists of scalars (a row of an example) kept on one line."""
    if value is None:
        return ""

    def fmt(item: Any, depth: int) -> str:
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(item, dict) and item:
            body = ",\n".join(
                f"{inner}{json.dumps(str(k))}: {fmt(v, depth + 1)}" for k, v in item.items()
            )
            return "{\n" + body + "\n" + pad + "}"
        if isinstance(item, list) and item and any(isinstance(v, dict | list) for v in item):
            return "[\n" + ",\n".join(inner + fmt(v, depth + 1) for v in item) + "\n" + pad + "]"
        return json.dumps(item, default=str)

    text = fmt(value, 0)
    if len(text) > _EXAMPLE_MAX_CHARS:
        text = text[:_EXAMPLE_MAX_CHARS] + "\n… (truncated)"
    return text


def _compare_versions_param(request: HttpRequest) -> list[str]:
    """``?versions=1,2,3`` from a link, or ``?versions=1&versions=2`` from checkboxes."""
    raw = ",".join(request.GET.getlist("versions"))
    return [part.strip() for part in raw.split(",") if part.strip()][:20]


# --- models ------------------------------------------------------------------------------


@requires(Right.READ)
@require_GET
def model_list(request: HttpRequest) -> HttpResponse:
    search = request.GET.get("q", "").strip()[:256]
    tag = request.GET.get("tag", "").strip()[:256]
    if tag.partition("=")[0] == "":
        tag = ""  # "=x" names no key; ignore rather than fail
    page = _page(request, selectors.registered_model_list(search=search, tag=tag))
    return render(request, "registry/model_list.html", {"page": page, "q": search, "tag": tag})


class UploadForm(forms.Form):
    model_name = forms.CharField(
        label="Model name",
        max_length=256,
        help_text="An existing model gets a new version; a new name creates the model.",
    )
    artifact = forms.FileField(
        label="Model archive (.zip)", help_text="A zipped MLflow model directory (with MLmodel)."
    )
    description = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), required=False, max_length=20000
    )


class SourceForm(forms.Form):
    model_name = forms.CharField(label="Model name", max_length=256)
    source = forms.CharField(
        label="MLflow URI",
        max_length=2000,
        help_text="runs:/<run_id>/<path> or models:/<name>/<version>",
        widget=forms.TextInput(attrs={"placeholder": "runs:/0123abcd.../model"}),
    )
    description = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), required=False, max_length=20000
    )


@requires(Right.REGISTRY_WRITE)
@_ui
@require_http_methods(["GET", "POST"])
def version_upload(request: HttpRequest) -> HttpResponse:
    initial = {"model_name": request.GET.get("model", "")[:256]}
    upload_form = UploadForm(initial=initial, prefix="upload")
    source_form = SourceForm(initial=initial, prefix="source")
    status = 200
    if request.method == "POST":
        kind = request.POST.get("kind")
        form = (
            UploadForm(request.POST, request.FILES, prefix="upload")
            if kind == "upload"
            else SourceForm(request.POST, prefix="source")
        )
        if kind == "upload":
            upload_form = form
        else:
            source_form = form
        if form.is_valid():
            data = form.cleaned_data
            artifact = data.get("artifact")
            try:
                mv = services.model_version_register(
                    model_name=data["model_name"].strip(),
                    source=None if artifact else data["source"],
                    archive=artifact.file if artifact else None,
                    archive_size=artifact.size if artifact else None,
                    description=data["description"],
                    actor=request.user,
                    create_model=True,
                )
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                messages.success(request, f"Registered {mv.model.name} version {mv.version}.")
                return redirect(_version_url(mv.model.name, mv.version))
        status = 400
    existing = selectors.registered_model_list().values_list("name", flat=True)[:500]
    return render(
        request,
        "registry/version_upload.html",
        {"upload_form": upload_form, "source_form": source_form, "existing_models": existing},
        status=status,
    )


@requires(Right.READ)
@_ui
@require_GET
def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.registered_model_get(name=name)
    page = _page(request, selectors.model_version_list(model=model), per_page=50)
    versions = list(page.object_list)
    metric_names = _key_metrics(versions)
    rows = [
        {
            "mv": mv,
            "aliases": sorted(a.name for a in mv.aliases.all()),
            "metrics": [(mv.metrics or {}).get(key) for key in metric_names],
        }
        for mv in versions
    ]
    pending = selectors.promotion_request_list(status=PromotionRequest.Status.PENDING).filter(
        model=model
    )
    return render(
        request,
        "registry/model_detail.html",
        {
            "model": model,
            "page": page,
            "rows": rows,
            "metric_names": metric_names,
            "aliases": model.aliases.all(),
            "pending": pending,
        },
    )


def _environment(mv: ModelVersion) -> dict:
    """The model's requirements as deployments resolve them (deployments/environments.py)."""
    from deployments.environments import EnvironmentFailure, normalize_requirements, unsatisfied

    try:
        resolved = normalize_requirements(mv.requirements or [], source="requirements.txt")
    except EnvironmentFailure as exc:
        return {"env_requirements": [], "env_error": str(exc), "env_missing": []}
    return {"env_requirements": resolved, "env_error": "", "env_missing": unsatisfied(resolved)}


@requires(Right.READ)
@_ui
@require_GET
def version_detail(request: HttpRequest, name: str, version: str) -> HttpResponse:
    model = selectors.registered_model_get(name=name)
    mv = selectors.model_version_get(model=model, version=version)
    signature = mv.signature or {}
    return render(
        request,
        "registry/version_detail.html",
        {
            **_environment(mv),
            "model": model,
            "mv": mv,
            "aliases": sorted(a.name for a in mv.aliases.all()),
            "metrics": sorted((mv.metrics or {}).items()),
            "params": sorted((mv.params or {}).items()),
            "tags": sorted((mv.tags or {}).items()),
            "signature_inputs": _signature_rows(signature.get("inputs")),
            "signature_outputs": _signature_rows(signature.get("outputs")),
            "has_signature": bool(mv.signature),
            "input_example": _pretty_json(mv.input_example),
            "is_archived": mv.status == ModelVersion.Status.ARCHIVED,
            **_conversion(mv),
        },
    )


def _conversion(mv: ModelVersion) -> dict:
    """The version's ONNX lineage side by side with its source, and its conversions."""
    from . import conversion

    lineage = conversion.lineage(mv)
    return {
        "conversion": lineage,
        "conversion_figures": conversion.side_by_side(lineage) if lineage else [],
        "conversion_verification": conversion.verification_items(lineage) if lineage else [],
        "converted_versions": conversion.conversions_of(mv),
        "is_onnx": "onnx" in (mv.flavors or []),
    }


@requires(Right.READ)
@_ui
@require_GET
def compare(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.registered_model_get(name=name)
    wanted = _compare_versions_param(request)
    only_diff = request.GET.get("diff") == "1"
    context: dict[str, Any] = {
        "model": model,
        "wanted": wanted,
        "only_diff": only_diff,
        # The newest 200, listed oldest first: the order of the table's columns.
        "all_versions": sorted(
            selectors.model_version_list(model=model).values_list("version", flat=True)[:200]
        ),
    }
    status = 200
    if wanted:
        try:
            result = selectors.model_versions_compare(model=model, versions=wanted)
        except ApplicationError as exc:
            context["error"] = exc.message
            status = exc.status_code
        else:
            sections = []
            for key, title in (
                ("metrics", "Metrics"),
                ("params", "Parameters"),
                ("tags", "Tags"),
                ("signature", "Signature"),
                ("conversion", "Conversion (ONNX)"),
            ):
                if key == "conversion" and not result[key]:
                    continue
                rows = [row for row in result[key] if row["differs"] or not only_diff]
                sections.append(
                    {
                        "key": key,
                        "title": title,
                        "rows": rows,
                        "total": len(result[key]),
                        "differing": sum(1 for row in result[key] if row["differs"]),
                    }
                )
            context.update(versions=result["versions"], sections=sections)
    return render(request, "registry/compare.html", context, status=status)


@requires(Right.READ)
@_ui
@require_GET
def history(request: HttpRequest, name: str) -> HttpResponse:
    model = selectors.registered_model_get(name=name)
    page = _page(request, selectors.alias_move_list(model=model), per_page=50)
    return render(request, "registry/history.html", {"model": model, "page": page})


# --- promotion -----------------------------------------------------------------------------


class PromoteForm(forms.Form):
    alias = forms.CharField(
        max_length=255, widget=forms.TextInput(attrs={"list": "alias-suggestions"})
    )
    version = forms.IntegerField(min_value=1)
    reason = forms.CharField(
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Why this version should serve under this alias; kept in the promotion history.",
    )


@requires(Right.REGISTRY_WRITE, Right.DEPLOY)
@_ui
@require_http_methods(["GET", "POST"])
def promote(request: HttpRequest, name: str) -> HttpResponse:
    """Two steps: the form, then a review page that says what will move and
    whether approval is required; only the confirmed POST calls the service."""
    model = selectors.registered_model_get(name=name)
    current = {a.name: a.version.version for a in model.aliases.all()}
    if request.method == "POST":
        form = PromoteForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            if request.POST.get("confirm") != "yes":
                return render(
                    request,
                    "registry/promote_confirm.html",
                    {
                        "model": model,
                        "form": form,
                        "data": data,
                        "current": current.get(data["alias"]),
                        "approval_required": selectors.approval_required(
                            model=model, alias=data["alias"]
                        ),
                    },
                )
            try:
                outcome = services.alias_promote(
                    model=model,
                    alias=data["alias"],
                    version=data["version"],
                    reason=data["reason"],
                    actor=request.user,
                )
            except ApplicationError as exc:
                form.add_error(None, exc.message)
            else:
                if outcome.request is not None:
                    messages.info(
                        request,
                        f"Promotion of version {data['version']} to @{data['alias']} is waiting for approval "
                        f"(request #{outcome.request.pk}).",
                    )
                else:
                    messages.success(
                        request, f"@{data['alias']} now points at version {data['version']}."
                    )
                return redirect(_model_url(model.name))
    else:
        form = PromoteForm(
            initial={
                "version": request.GET.get("version", ""),
                "alias": request.GET.get("alias", ""),
            }
        )
    suggestions = sorted(set(SUGGESTED_ALIASES) | set(current))
    ready = selectors.model_version_list(model=model).filter(status=ModelVersion.Status.READY)
    return render(
        request,
        "registry/promote.html",
        {
            "model": model,
            "form": form,
            "ready_versions": ready.values_list("version", flat=True)[:200],
            "aliases": [
                {
                    "name": alias,
                    "current": current.get(alias),
                    "approval_required": selectors.approval_required(model=model, alias=alias),
                }
                for alias in suggestions
            ],
        },
        status=400 if form.errors else 200,
    )


# --- archive, restore, delete ---------------------------------------------------------------


@requires(Right.REGISTRY_WRITE)
@_ui
@require_http_methods(["GET", "POST"])
def version_archive(request: HttpRequest, name: str, version: str) -> HttpResponse:
    """GET: the confirmation page. POST ``action=archive|restore``: do it."""
    model = selectors.registered_model_get(name=name)
    mv = selectors.model_version_get(model=model, version=version)
    if request.method == "POST":
        action = request.POST.get("action")
        if action not in ("archive", "restore"):
            messages.error(request, "Unknown action.")
            return redirect(_version_url(model.name, mv.version))
        try:
            if action == "archive":
                services.model_version_archive(mv=mv, actor=request.user)
            else:
                services.model_version_restore(mv=mv, actor=request.user)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(
                request,
                f"Version {mv.version} {'archived' if action == 'archive' else 'restored'}.",
            )
        return redirect(_version_url(model.name, mv.version))
    action = "restore" if mv.status == ModelVersion.Status.ARCHIVED else "archive"
    return render(
        request,
        "registry/version_confirm.html",
        {
            "model": model,
            "mv": mv,
            "action": action,
            "aliases": sorted(a.name for a in mv.aliases.all()),
            "post_url": reverse(
                "registry:version-archive", kwargs={"name": model.name, "version": mv.version}
            ),
        },
    )


@requires(Right.REGISTRY_WRITE)
@_ui
@require_http_methods(["GET", "POST"])
def version_delete(request: HttpRequest, name: str, version: str) -> HttpResponse:
    """GET: the confirmation page. POST: delete the version (here and in MLflow)."""
    model = selectors.registered_model_get(name=name)
    mv = selectors.model_version_get(model=model, version=version)
    if request.method == "POST":
        try:
            services.model_version_delete(mv=mv, actor=request.user)
        except ApplicationError as exc:
            messages.error(request, exc.message)
            return redirect(_version_url(model.name, mv.version))
        messages.success(request, f"Version {mv.version} of {model.name} deleted.")
        return redirect(_model_url(model.name))
    return render(
        request,
        "registry/version_confirm.html",
        {
            "model": model,
            "mv": mv,
            "action": "delete",
            "aliases": sorted(a.name for a in mv.aliases.all()),
            "post_url": reverse(
                "registry:version-delete", kwargs={"name": model.name, "version": mv.version}
            ),
        },
    )


# --- approvals --------------------------------------------------------------------------------


@requires(Right.READ)
@require_GET
def approvals(request: HttpRequest) -> HttpResponse:
    pending = selectors.promotion_request_list(status=PromotionRequest.Status.PENDING).order_by(
        "requested_at", "id"
    )
    decided = (
        selectors.promotion_request_list()
        .exclude(status=PromotionRequest.Status.PENDING)
        .order_by("-decided_at", "-id")
    )
    return render(
        request,
        "registry/approvals.html",
        {
            "pending": pending,
            "decided": decided[:20],
            "can_decide": user_can(request.user, Right.APPROVE),
        },
    )


class DecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")])
    comment = forms.CharField(required=False, max_length=2000)


@requires(Right.APPROVE)
@require_POST
def approval_decide(request: HttpRequest, request_id: int) -> HttpResponse:
    form = DecisionForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose approve or reject (comment at most 2000 characters).")
        return redirect("registry:approvals")
    data = form.cleaned_data
    decide = (
        services.promotion_request_approve
        if data["decision"] == "approve"
        else services.promotion_request_reject
    )
    try:
        decided = decide(request_id=request_id, actor=request.user, comment=data["comment"])
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        if data["decision"] == "approve":
            messages.success(
                request,
                f"Approved: {decided.model.name}@{decided.alias} now points at version {decided.version.version}.",
            )
        else:
            messages.success(
                request, f"Rejected request #{decided.pk} ({decided.model.name}@{decided.alias})."
            )
    return redirect("registry:approvals")
