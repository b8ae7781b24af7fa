"""Deployments UI: server-rendered pages.

Thin, like the API: parse the form, call one service or selector, render.
Every write has a confirmation step (a review page) and happens on POST only.
Domain errors (``ApplicationError``) never become a 500: a failed write is
shown as a form error or a message, a failed read as an error page with the
error's status code.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from accounts.permissions import Right, requires
from controlplane.lib.errors import ApplicationError
from controlplane.lib.views import error_pages
from registry.models import Alias, ModelVersion
from registry.selectors import registered_model_list

from . import selectors, services
from .calls import call_examples
from .environments import ENVIRONMENT_CHOICES
from .models import Deployment, Instance
from .runtimes import RUNTIMES, isolation_warning
from .scaling import autoscaling_view
from .shadow_views import shadow_panel

# Rollout steps in the order the reconciler goes through them (its ``phase``); the second
# is "building image" on the docker runtime (reconciler.PREPARE_PHASES).
ROLLOUT_STEPS = (
    "fetching model files",
    "preparing environment",
    "starting instances",
    "waiting for readiness",
    "switching traffic",
    "draining",
)
UNSETTLED = {Deployment.Status.PENDING, Deployment.Status.DEPLOYING}
# States mapped onto the stylesheet's badge colours: green, amber, red, grey.
BADGES = {
    # deployments
    "ready": "badge-ready",
    "pending": "badge-pending",
    "deploying": "badge-pending",
    "degraded": "badge-pending",
    "failed": "badge-rejected",
    "stopped": "badge-archived",
    # revisions
    "rolling_out": "badge-pending",
    "live": "badge-ready",
    "superseded": "badge-archived",
    # instances
    "starting": "badge-pending",
    "unhealthy": "badge-rejected",
    "crashed": "badge-rejected",
    "stopping": "badge-archived",
}
EVENTS_SHOWN = 50
LOG_LINES_ON_PAGE = 30
LOG_LINES_DEFAULT = 200
LOG_LINES_MAX = 5000
EXAMPLE_ROWS = 3
PAYLOAD_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


# --- helpers -----------------------------------------------------------------------------


# A domain error raised while reading becomes an error page with its status code.
_ui = error_pages("deployments/error.html")


def _detail_url(name: str) -> str:
    return reverse("deployments:deployment-detail", kwargs={"name": name})


def _badge(state: str) -> str:
    return BADGES.get(state, "badge-archived")


def _alias_versions(deployments) -> dict[tuple[int, str], int]:
    """(model id, alias) -> the version the alias points at now, in one query."""
    wanted = [d for d in deployments if d.target_alias]
    if not wanted:
        return {}
    rows = Alias.objects.filter(
        model_id__in={d.model_id for d in wanted}, name__in={d.target_alias for d in wanted}
    ).values_list("model_id", "name", "version__version")
    return {(model_id, name): version for model_id, name, version in rows}


def _current(d: Deployment, alias_versions: dict | None = None) -> dict:
    """What the desired revision asks for. After a rollback this is the earlier
    revision's spec, not the deployment's last requested target, so pages show
    (and forms start from) what actually should run; a deployment that follows an
    alias but runs another version (a rollback pinned it) says both."""
    rev = d.desired_revision
    spec = rev.spec if rev is not None else {}
    version = rev.model_version.version if rev is not None else d.target_version
    if alias_versions is None:
        alias_versions = _alias_versions([d])
    alias_version = alias_versions.get((d.model_id, d.target_alias)) if d.target_alias else None
    pinned = alias_version is not None and alias_version != version
    if pinned:
        target = f"v{version}, pinned by rollback (@{d.target_alias} is v{alias_version})"
    elif d.target_alias:
        target = f"@{d.target_alias} → v{version}"
    else:
        target = f"v{version}"
    return {
        "version": version,
        "alias_version": alias_version,
        "pinned": pinned,
        "target": target,
        "replicas": spec.get("replicas", d.replicas),
        "cpu": spec.get("cpu", d.cpu),
        "memory_mb": spec.get("memory_mb", d.memory_mb),
        "environment": spec.get("environment", "shared") if rev is not None else d.environment,
        "predict_method": spec.get("predict_method") or "",
    }


def _instance_counts(d: Deployment) -> tuple[int, int]:
    """Ready/total instances of the desired revision (a warm standby of the previous
    revision is listed in the instances table, not counted here)."""
    instances = [
        i for i in d.instances.all() if i.revision_id == d.desired_revision_id
    ]  # prefetched
    return sum(1 for i in instances if i.state == Instance.State.READY), len(instances)


def _example_payload(mv: ModelVersion | None) -> dict | None:
    """The model version's saved input example as an ``/invocations`` body (a few rows)."""
    example = mv.input_example if mv is not None else None
    if isinstance(example, dict) and set(example) & set(PAYLOAD_KEYS):
        return example
    if isinstance(example, dict) and isinstance(example.get("data"), list):
        # MLflow saves a DataFrame example in pandas "split" orientation.
        return {"dataframe_split": {**example, "data": example["data"][:EXAMPLE_ROWS]}}
    if isinstance(example, list) and example:
        rows = example[:EXAMPLE_ROWS]
        if all(isinstance(row, dict) for row in rows):
            return {"dataframe_records": rows}
        return {"instances": rows}
    return None


def _curl_example(d: Deployment, mv: ModelVersion | None) -> tuple[str, bool]:
    """A copyable curl command for the stable endpoint, and whether its body is real."""
    payload = _example_payload(mv)
    if payload is not None:
        body = json.dumps(payload, separators=(",", ":"), default=str)
    else:
        inputs = ((mv.signature or {}).get("inputs") or []) if mv is not None else []
        columns = json.dumps([c["name"] for c in inputs if isinstance(c, dict) and c.get("name")])
        body = '{"dataframe_split": {"columns": ' + columns + ', "data": [[...]]}}'
    command = (
        f"curl -sS -X POST {shlex.quote(d.endpoint + '/invocations')} \\\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}"
    )
    return command, payload is not None


def _settled_statuses(d: Deployment) -> list[str]:
    """The statuses that mean what was last asked for is done: the page polls until one shows."""
    if d.stopped:
        return [Deployment.Status.STOPPED]  # a stop asked for: done once stopped
    done = [s for s in Deployment.Status.values if s not in UNSETTLED]
    if d.status == Deployment.Status.STOPPED:
        done.remove(Deployment.Status.STOPPED)  # a start asked for: done once it serves again
    return done


def _steps(runtime: str) -> tuple[str, ...]:
    if runtime == "docker":
        return tuple("building image" if s == "preparing environment" else s for s in ROLLOUT_STEPS)
    return ROLLOUT_STEPS


def _rollout_steps(d: Deployment) -> list[dict]:
    """The rollout steps with where the reconciler is now (only while it rolls out)."""
    steps = _steps(d.runtime)
    current = steps.index(d.phase) if d.phase in steps else -1
    return [
        {"name": step, "state": "done" if i < current else "current" if i == current else "todo"}
        for i, step in enumerate(steps)
    ]


ENVIRONMENT_HELP = (
    "auto: the control plane's own Python when it already has every requirement of the model, "
    "else an environment built for it; isolated: always a built environment; shared: always "
    "the control plane's Python."
)
ENVIRONMENT_FIELD_CHOICES = [(e, e) for e in ENVIRONMENT_CHOICES]


def _environment_fields() -> dict[str, forms.Field]:
    return {
        "environment": forms.ChoiceField(
            choices=ENVIRONMENT_FIELD_CHOICES,
            initial="auto",
            required=False,  # empty: the default (create) or unchanged (update)
            help_text=ENVIRONMENT_HELP,
        ),
        "predict_method": forms.CharField(
            label="Prediction method",
            required=False,
            max_length=64,
            help_text="The model's method answering predictions, e.g. predict_proba. "
            "Empty: the model's default.",
            widget=forms.TextInput(attrs={"placeholder": "predict"}),
        ),
    }


def _phase_seconds(d: Deployment) -> int | None:
    """Seconds the deployment has been in its current phase (an environment build...)."""
    if not d.phase or d.phase_started_at is None:
        return None
    return max(0, int((timezone.now() - d.phase_started_at).total_seconds()))


def _resources(cpu: float | None, memory_mb: int | None) -> dict:
    return {"cpu": cpu, "memory_mb": memory_mb}


def _add_service_error(form: forms.Form, exc: ApplicationError, fields: dict[str, str]) -> None:
    """Show a service refusal next to the field it is about, else above the form."""
    field = fields.get(exc.code)
    form.add_error(field if field in form.fields else None, exc.message)


# --- list and create ---------------------------------------------------------------------


@requires(Right.READ)
@require_GET
def deployment_list(request: HttpRequest) -> HttpResponse:
    rows = []
    deployments = list(selectors.deployment_list())
    alias_versions = _alias_versions(deployments)
    for d in deployments:
        ready, total = _instance_counts(d)
        rows.append(
            {
                "d": d,
                "badge": _badge(d.status),
                "current": _current(d, alias_versions),
                "ready": ready,
                "total": total,
            }
        )
    return render(request, "deployments/deployment_list.html", {"rows": rows})


class CreateForm(forms.Form):
    name = forms.CharField(
        max_length=63,
        help_text="Lowercase letters, digits and '-'; it names the deployment in the API and the UI.",
        widget=forms.TextInput(attrs={"placeholder": "churn-prod", "autocomplete": "off"}),
    )
    model = forms.ChoiceField(label="Model")
    version = forms.CharField(
        required=False,
        max_length=20,
        help_text="A fixed version number…",
        widget=forms.TextInput(attrs={"placeholder": "e.g. 3"}),
    )
    alias = forms.CharField(
        required=False,
        max_length=255,
        help_text="…or an alias to follow: the deployment rolls out by itself when the alias moves.",
        widget=forms.TextInput(
            attrs={"placeholder": "e.g. production", "list": "alias-suggestions"}
        ),
    )
    runtime = forms.ChoiceField(choices=[(r, r) for r in RUNTIMES])
    replicas = forms.IntegerField(min_value=1, max_value=services.MAX_REPLICAS, initial=1)
    cpu = forms.FloatField(label="CPU limit (cores)", required=False, help_text="Empty: no limit.")
    memory_mb = forms.IntegerField(
        label="Memory limit (MB)", required=False, help_text="Empty: no limit."
    )
    environment, predict_method = _environment_fields().values()

    def __init__(self, *args: Any, models: list, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        choices = [("", "— choose —")]
        for m in models:
            aliases = ", ".join(f"@{a.name}→v{a.version.version}" for a in m.aliases.all())
            label = f"{m.name} (latest v{m.latest_version}{'; ' + aliases if aliases else ''})"
            choices.append((m.name, label))
        self.fields["model"].choices = choices


# Which form field a service refusal is about (by error code).
CREATE_ERROR_FIELDS = {
    "invalid_name": "name",
    "deployment_exists": "name",
    "model_not_found": "model",
    "invalid_target": "version",
    "invalid_version": "version",
    "version_not_found": "version",
    "version_archived": "version",
    "alias_not_found": "alias",
    "invalid_runtime": "runtime",
    "invalid_replicas": "replicas",
    "invalid_resources": "cpu",
    "invalid_environment": "environment",
    "invalid_predict_method": "predict_method",
}


@requires(Right.DEPLOY)
@_ui
@require_http_methods(["GET", "POST"])
def deployment_create(request: HttpRequest) -> HttpResponse:
    models = list(registered_model_list().filter(version_count__gt=0))
    if request.method == "POST":
        form = CreateForm(request.POST, models=models)
        if form.is_valid():
            data = form.cleaned_data
            try:
                d = services.deployment_create(
                    name=data["name"].strip(),
                    model_name=data["model"],
                    version=data["version"].strip() or None,
                    alias=data["alias"].strip() or None,
                    runtime=data["runtime"],
                    replicas=data["replicas"],
                    resources=_resources(data["cpu"], data["memory_mb"]),
                    environment=data["environment"] or None,
                    predict_method=data["predict_method"].strip() or None,
                    actor=request.user,
                )
            except ApplicationError as exc:
                _add_service_error(form, exc, CREATE_ERROR_FIELDS)
            else:
                messages.success(request, f"Deployment {d.name} created: rolling out revision 1.")
                return redirect(_detail_url(d.name))
    else:
        form = CreateForm(
            models=models,
            initial={
                "model": request.GET.get("model", "")[:256],
                "version": request.GET.get("version", "")[:20],
                "alias": request.GET.get("alias", "")[:255],
                "runtime": settings.CONTROLPLANE_DEFAULT_RUNTIME,
                "environment": settings.CONTROLPLANE_DEFAULT_ENVIRONMENT,
            },
        )
    aliases = sorted({a.name for m in models for a in m.aliases.all()} | {"staging", "production"})
    return render(
        request,
        "deployments/deployment_create.html",
        {"form": form, "has_models": bool(models), "alias_suggestions": aliases},
        status=400 if form.errors else 200,
    )


# --- the deployment page ---------------------------------------------------------------------


@requires(Right.READ)
@_ui
@require_GET
def deployment_detail(request: HttpRequest, name: str) -> HttpResponse:
    d = selectors.deployment_get(name=name)
    revisions = list(selectors.revision_list(deployment=d))
    for r in revisions:
        r.badge = _badge(r.state)
        r.can_roll_back_to = (
            r.pk != d.desired_revision_id and r.model_version.status == ModelVersion.Status.READY
        )
    events = selectors.event_list(deployment=d, limit=EVENTS_SHOWN)
    instances = sorted(d.instances.all(), key=lambda i: (-i.revision.number, i.ordinal))
    for i in instances:
        i.badge = _badge(i.state)
    ready, total = _instance_counts(d)
    serving = d.serving_revision or d.desired_revision
    curl, curl_is_example = _curl_example(d, serving.model_version if serving else None)
    settled = _settled_statuses(d)
    from monitoring.staticfiles import PLOTLY_JS, PLOTLY_VERSION

    from .rollout_chart import rollout_chart
    from .rollouts import rollout_summary

    rollout = rollout_summary(d)
    return render(
        request,
        "deployments/deployment_detail.html",
        {
            "rollout": rollout,
            "rollout_chart": rollout_chart(rollout),
            "rollout_actions": {
                "running": ["pause", "promote", "abort"],
                "paused": ["resume", "promote", "abort"],
                "promoting": ["abort"],
            }.get(rollout["state"] if rollout else "", []),
            "plotly_js": PLOTLY_JS,
            "plotly_version": PLOTLY_VERSION,
            "d": d,
            "badge": _badge(d.status),
            "current": _current(d),
            "rolling_out": d.status in UNSETTLED and not d.stopped,
            "polling": d.status not in settled,
            "steps": _rollout_steps(d),
            "phase_seconds": _phase_seconds(d),
            "revisions": revisions,
            "events": events,
            "instances": instances,
            "ready": ready,
            "total": total,
            "curl": curl,
            "curl_is_example": curl_is_example,
            "other_calls": call_examples(
                endpoint=d.endpoint,
                model_name=d.model.name,
                payload=_example_payload(serving.model_version if serving else None),
            ),
            "isolation_warning": isolation_warning(d.runtime),
            "autoscaling": autoscaling_view(d),
            "logs": selectors.deployment_logs(deployment=d, tail=LOG_LINES_ON_PAGE),
            "shadow": shadow_panel(d),
            "live": {
                "url": reverse("api:api-deployment", kwargs={"name": d.name}),
                "badges": BADGES,
                "settled": settled,
                "rolling_out": sorted(UNSETTLED),
                "steps": _steps(d.runtime),
            },
        },
    )


@requires(Right.READ)
@_ui
@require_GET
def deployment_logs(request: HttpRequest, name: str) -> HttpResponse:
    d = selectors.deployment_get(name=name)
    try:
        tail = min(max(int(request.GET.get("tail", LOG_LINES_DEFAULT)), 1), LOG_LINES_MAX)
    except ValueError:
        tail = LOG_LINES_DEFAULT
    return render(
        request,
        "deployments/deployment_logs.html",
        {"d": d, "tail": tail, "logs": selectors.deployment_logs(deployment=d, tail=tail)},
    )


# --- update and scale --------------------------------------------------------------------------


class UpdateForm(forms.Form):
    version = forms.CharField(
        required=False, max_length=20, widget=forms.TextInput(attrs={"placeholder": "e.g. 4"})
    )
    alias = forms.CharField(
        required=False,
        max_length=255,
        widget=forms.TextInput(attrs={"placeholder": "e.g. production"}),
    )
    replicas = forms.IntegerField(min_value=1, max_value=services.MAX_REPLICAS)
    cpu = forms.FloatField(label="CPU limit (cores)", required=False, help_text="Empty: no limit.")
    memory_mb = forms.IntegerField(
        label="Memory limit (MB)", required=False, help_text="Empty: no limit."
    )
    environment, predict_method = _environment_fields().values()


class ScaleForm(forms.Form):
    replicas = forms.IntegerField(
        min_value=1,
        max_value=services.MAX_REPLICAS,
        help_text="Fixed replicas: used while autoscaling is off.",
    )
    autoscale = forms.BooleanField(
        required=False, label="Autoscale on in-flight requests (replaces the fixed count)"
    )
    min_replicas = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=services.MAX_REPLICAS,
        help_text="0 scales to zero when idle: the first request then waits for a cold start.",
    )
    max_replicas = forms.IntegerField(required=False, min_value=1, max_value=services.MAX_REPLICAS)
    target_in_flight = forms.FloatField(
        required=False, min_value=0.01, help_text="In-flight requests per replica to aim for."
    )

    def autoscaling(self) -> dict | None:
        """The policy the form asks for (None: off); the service validates it."""
        data = self.cleaned_data
        if not data.get("autoscale"):
            return None
        policy = {
            "min_replicas": data.get("min_replicas"),
            "max_replicas": data.get("max_replicas"),
            "target_in_flight": data.get("target_in_flight"),
        }
        if policy["target_in_flight"] is not None and policy["target_in_flight"].is_integer():
            policy["target_in_flight"] = int(policy["target_in_flight"])
        return {k: v for k, v in policy.items() if v is not None}


UPDATE_ERROR_FIELDS = {
    "invalid_target": "version",
    "invalid_version": "version",
    "version_not_found": "version",
    "version_archived": "version",
    "alias_not_found": "alias",
    "invalid_replicas": "replicas",
    "invalid_resources": "cpu",
    "invalid_environment": "environment",
    "invalid_predict_method": "predict_method",
    "invalid_autoscaling": "autoscale",
}


def _autoscaling_text(policy: dict | None) -> str:
    if not policy:
        return "off (fixed replicas)"
    return (
        f"{policy.get('min_replicas', 1)}–{policy.get('max_replicas')} replicas, "
        f"target {policy.get('target_in_flight')} in flight"
    )


def _changes(d: Deployment, data: dict) -> list[dict]:
    """What the update would change, for the review page."""
    current = _current(d)
    rows = []
    if data.get("version") or data.get("alias"):
        new = f"@{data['alias']}" if data.get("alias") else f"v{data['version']}"
        if data.get("version") and data.get("alias"):
            new = f"v{data['version']} and @{data['alias']} (choose one)"
        rows.append({"what": "Target", "before": current["target"], "after": new})
    if data["replicas"] != current["replicas"]:
        rows.append({"what": "Replicas", "before": current["replicas"], "after": data["replicas"]})
    if "autoscaling" in data and data["autoscaling"] != d.autoscaling:
        rows.append(
            {
                "what": "Autoscaling",
                "before": _autoscaling_text(d.autoscaling),
                "after": _autoscaling_text(data["autoscaling"]),
            }
        )
    for key, label in (("cpu", "CPU limit (cores)"), ("memory_mb", "Memory limit (MB)")):
        if key in data and data[key] != current[key]:
            rows.append(
                {
                    "what": label,
                    "before": current[key] or "no limit",
                    "after": data[key] or "no limit",
                }
            )
    if data.get("environment") and data["environment"] != current["environment"]:
        rows.append(
            {"what": "Environment", "before": current["environment"], "after": data["environment"]}
        )
    if "predict_method" in data and data["predict_method"] != current["predict_method"]:
        rows.append(
            {
                "what": "Prediction method",
                "before": current["predict_method"] or "default",
                "after": data["predict_method"] or "default",
            }
        )
    return rows


def _update(request: HttpRequest, name: str, *, scale: bool) -> HttpResponse:
    """Two steps: the form, then a review page; only the confirmed POST calls the service."""
    d = selectors.deployment_get(name=name)
    form_class = ScaleForm if scale else UpdateForm
    status = 200
    if request.method == "POST":
        form = form_class(request.POST)
        if form.is_valid():
            data = {"version": "", "alias": "", **form.cleaned_data}
            data["version"], data["alias"] = data["version"].strip(), data["alias"].strip()
            if "predict_method" in data:
                data["predict_method"] = data["predict_method"].strip()
            if scale:
                # the form sets bounds and target; windows set through the API are kept
                policy = form.autoscaling()
                data["autoscaling"] = {**(d.autoscaling or {}), **policy} if policy else None
            if request.POST.get("confirm") != "yes":
                return render(
                    request,
                    "deployments/update_confirm.html",
                    {
                        "d": d,
                        "form": form,
                        "scale": scale,
                        "changes": _changes(d, data),
                        "data": data,
                    },
                )
            before = d.desired_revision_id
            policy_before = d.autoscaling
            try:
                d = services.deployment_update(
                    deployment=d,
                    version=data["version"] or None,
                    alias=data["alias"] or None,
                    replicas=data["replicas"],
                    resources=None if scale else _resources(data["cpu"], data["memory_mb"]),
                    **(
                        {"autoscaling": data["autoscaling"]}
                        if scale
                        else {
                            "environment": data["environment"] or None,
                            "predict_method": data["predict_method"] or None,
                        }
                    ),
                    actor=request.user,
                )
            except ApplicationError as exc:
                _add_service_error(form, exc, UPDATE_ERROR_FIELDS)
            else:
                if d.desired_revision_id == before and d.autoscaling != policy_before:
                    messages.success(request, "Autoscaling updated: no new revision.")
                elif d.desired_revision_id == before:
                    messages.info(request, "Nothing changed: no new revision.")
                else:
                    messages.success(
                        request, f"Revision {d.desired_revision.number} created: rolling it out."
                    )
                return redirect(_detail_url(d.name))
        status = 400
    else:
        current = _current(d)
        form = form_class(
            initial={
                "replicas": current["replicas"],
                "cpu": current["cpu"],
                "memory_mb": current["memory_mb"],
                "environment": current["environment"],
                "predict_method": current["predict_method"],
                "autoscale": bool(d.autoscaling),
                **{
                    key: (d.autoscaling or {}).get(key, default)
                    for key, default in (
                        ("min_replicas", 1),
                        ("max_replicas", max(current["replicas"], 4)),
                        ("target_in_flight", 8),
                    )
                },
            }
        )
    return render(
        request,
        "deployments/update.html",
        {"d": d, "form": form, "scale": scale, "current": _current(d)},
        status=status,
    )


@requires(Right.DEPLOY)
@_ui
@require_http_methods(["GET", "POST"])
def deployment_update(request: HttpRequest, name: str) -> HttpResponse:
    return _update(request, name, scale=False)


@requires(Right.DEPLOY)
@_ui
@require_http_methods(["GET", "POST"])
def deployment_scale(request: HttpRequest, name: str) -> HttpResponse:
    return _update(request, name, scale=True)


# --- rollback, stop, start, delete ---------------------------------------------------------------


@requires(Right.DEPLOY)
@_ui
@require_http_methods(["GET", "POST"])
def deployment_rollback(request: HttpRequest, name: str) -> HttpResponse:
    """GET: the confirmation page (previous good revision, or one chosen). POST: roll back."""
    d = selectors.deployment_get(name=name)
    if request.method == "POST":
        raw = request.POST.get("revision", "").strip()
        try:
            revision = int(raw) if raw else None
        except ValueError:
            messages.error(request, f"{raw!r} is not a revision number.")
            return redirect(_detail_url(d.name))
        try:
            d = services.deployment_rollback(
                deployment=d,
                revision=revision,
                actor=request.user,
                reason=request.POST.get("reason", "").strip()[:2000],
            )
        except ApplicationError as exc:
            messages.error(request, f"Rollback refused: {exc.message}")
        else:
            messages.success(request, f"Rolling back to revision {d.desired_revision.number}.")
        return redirect(_detail_url(d.name))
    choices = [
        r
        for r in selectors.revision_list(deployment=d)
        if r.pk != d.desired_revision_id and r.model_version.status == ModelVersion.Status.READY
    ]
    for r in choices:
        r.badge = _badge(r.state)
    chosen = request.GET.get("revision", "")
    return render(
        request,
        "deployments/rollback_confirm.html",
        {"d": d, "choices": choices, "chosen": chosen},
    )


LIFECYCLE = {
    "stop": (
        services.deployment_stop,
        "Stopping {name}: its instances and endpoint are shut down.",
    ),
    "start": (services.deployment_start, "Starting {name} again."),
    "delete": (
        services.deployment_delete,
        "Deleting {name}: everything it runs is stopped, then it is removed.",
    ),
}


@requires(Right.DEPLOY)
@_ui
@require_http_methods(["GET", "POST"])
def deployment_lifecycle(request: HttpRequest, name: str, action: str) -> HttpResponse:
    """GET: the confirmation page. POST: stop, start or delete."""
    d = selectors.deployment_get(name=name)
    service, done = LIFECYCLE[action]
    if request.method == "POST":
        try:
            service(deployment=d, actor=request.user)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, done.format(name=d.name))
            if action == "delete":
                return redirect("deployments:deployment-list")
        return redirect(_detail_url(d.name))
    ready, total = _instance_counts(d)
    return render(
        request,
        "deployments/lifecycle_confirm.html",
        {"d": d, "action": action, "badge": _badge(d.status), "ready": ready, "total": total},
    )


@requires(Right.DEPLOY)
@_ui
@require_http_methods(["GET", "POST"])
def deployment_rollout(request: HttpRequest, name: str, action: str) -> HttpResponse:
    """POST: promote, abort, pause or resume the rollout in progress (the panel's buttons).
    GET: back to the deployment page, where the buttons are."""
    from .rollouts import rollout_control

    d = selectors.deployment_get(name=name)
    if request.method == "GET":
        return redirect(_detail_url(d.name))
    try:
        rollout_control(
            deployment=d,
            action=action,
            actor=request.user,
            reason=request.POST.get("reason", "").strip()[:2000],
        )
    except ApplicationError as exc:
        messages.error(request, f"Rollout {action} refused: {exc.message}")
    else:
        messages.success(request, f"Rollout: {action} requested.")
    return redirect(_detail_url(d.name))
