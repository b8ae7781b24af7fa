"""Monitoring UI (the fleet, one deployment's charts, alert rules) and the control plane's
own Prometheus endpoint. Thin: parse, call a selector or a service, render."""

from __future__ import annotations

import hmac
import ipaddress
import math
import time

from django import forms
from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods

from accounts.permissions import Right, requires
from controlplane.lib.errors import ApplicationError
from controlplane.lib.middleware import client_address
from controlplane.lib.views import error_pages
from deployments.selectors import deployment_list

from . import catalog, charts, selectors, services
from .comparison import version_comparison
from .comparison_charts import comparison_charts
from .models import AlertRule
from .replicas import replica_chart
from .staticfiles import PLOTLY_JS, PLOTLY_VERSION

# range name -> (seconds, step seconds): a few hundred points at most per line.
RANGES = {"1h": (3600, 60), "24h": (86400, 300), "7d": (7 * 86400, 1800), "30d": (30 * 86400, 7200)}


# A domain error raised while reading becomes an error page with its status code.
_ui = error_pages("registry/error.html")


@requires(Right.READ)
@require_GET
def overview(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "monitoring/overview.html",
        {
            "rows": selectors.fleet_overview(),
            "firing": [r for r in selectors.alert_rule_list().filter(state=AlertRule.State.FIRING)],
        },
    )


@requires(Right.READ)
@require_GET
@_ui
def deployment_detail(request: HttpRequest, name: str) -> HttpResponse:
    deployment = selectors.deployment_get(name=name)
    end = math.ceil(time.time())
    range_name = request.GET.get("range", "")
    if range_name not in RANGES:
        # The smallest range holding all the deployment's data, not a mostly empty 24 h.
        age = end - selectors.data_since(deployment=deployment)
        range_name = next((r for r, (sec, _) in RANGES.items() if sec >= age), "30d")
    seconds, step = RANGES[range_name]
    # Windows aligned on the step (so rollups answer), ending now.
    start = math.ceil(end / step) * step - seconds
    data = selectors.metric_series(
        deployment_id=deployment.pk,
        names=charts.CHART_METRICS,
        start=start,
        end=end,
        step=step,
        by_version=True,
    )
    markers = selectors.deployment_markers(deployment=deployment, start=start, end=end)
    rules = list(selectors.alert_rule_list(deployment=deployment))
    chart_list = charts.deployment_charts(
        data=data,
        start=start,
        end=end,
        step=step,
        markers=markers,
        task=selectors.model_task(model_version=revision.model_version)
        if (revision := deployment.serving_revision or deployment.desired_revision)
        else None,
    )
    scaled = replica_chart(deployment=deployment, start=start, end=end, step=step, markers=markers)
    if scaled is not None:  # beside traffic: after the throughput chart
        at = next((i + 1 for i, c in enumerate(chart_list) if c.id == "chart-throughput"), 0)
        chart_list.insert(at, scaled)
    ab = version_comparison(deployment=deployment, start=start, end=end)
    return render(
        request,
        "monitoring/deployment.html",
        {
            "deployment": deployment,
            "ranges": list(RANGES),
            "range": range_name,
            "step": step,
            "charts": chart_list,
            "markers": markers,
            "ab": ab,
            "ab_charts": comparison_charts(ab) if ab else [],
            "rules": rules,
            "events": selectors.alert_event_list(deployment=deployment, limit=20),
            "probes": selectors.probe_list(deployment=deployment, limit=10),
            "drift_reference": selectors.drift_reference_status(deployment=deployment),
            "plotly_js": PLOTLY_JS,
            "plotly_version": PLOTLY_VERSION,
        },
    )


class DriftReferenceForm(forms.Form):
    file = forms.FileField(
        label="Reference dataset (CSV with a header row, or JSON)",
        help_text='JSON: {"columns": [...], "data": [[...]]}, a list of records or {column: [values]}',
    )


@requires(Right.MONITORING_WRITE)
@require_http_methods(["POST"])
@_ui
def drift_reference_upload(request: HttpRequest, name: str) -> HttpResponse:
    """Upload the drift reference of the version the deployment serves (the same service as
    PUT /api/v1/models/{name}/versions/{version}/drift-reference)."""
    deployment = selectors.deployment_get(name=name)
    revision = deployment.serving_revision or deployment.desired_revision
    form = DriftReferenceForm(request.POST, request.FILES)
    if revision is None:
        messages.error(request, "The deployment serves no version yet.")
    elif not form.is_valid():
        messages.error(request, "Choose a CSV or JSON file to upload.")
    else:
        upload = form.cleaned_data["file"]
        try:
            dataset = services.dataset_from_file(content=upload.read(), filename=upload.name)
            reference = services.drift_reference_upload(
                model_version=revision.model_version, dataset=dataset, actor=request.user
            )
        except ApplicationError as exc:
            messages.error(request, f"Reference not uploaded: {exc.message}")
        else:
            messages.success(
                request,
                f"Drift reference of v{revision.model_version.version} uploaded: "
                f"{reference.n_rows} rows, {len(reference.profile)} features.",
            )
    return redirect("monitoring:deployment", name=deployment.name)


# --- alert rules ------------------------------------------------------------------------------


class AlertRuleForm(forms.Form):
    name = forms.CharField(max_length=200)
    deployment = forms.ChoiceField()
    metric = forms.ChoiceField(
        choices=[
            (m.name, f"{m.name} ({m.unit}) – {m.description}") for m in catalog.METRICS.values()
        ]
    )
    comparison = forms.ChoiceField(choices=AlertRule.Comparison.choices)
    threshold = forms.FloatField()
    window_s = forms.IntegerField(
        label="Window (seconds)", min_value=60, max_value=30 * 86400, initial=300
    )
    min_samples = forms.IntegerField(
        label="Minimum samples",
        min_value=1,
        initial=20,
        help_text="requests, labeled rows, inputs or probes in the window",
    )
    model_version = forms.IntegerField(
        required=False, min_value=1, help_text="empty: every version"
    )
    webhook_url = forms.CharField(required=False, max_length=2000, label="Webhook URL")
    email_to = forms.CharField(
        required=False, max_length=5000, label="E-mail to", help_text="comma-separated"
    )
    rollback_on_fire = forms.BooleanField(
        required=False, label="Roll the deployment back when the rule fires"
    )
    enabled = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["deployment"].choices = [(d.name, d.name) for d in deployment_list()]


def _rule_fields(data: dict) -> dict:
    return {k: data[k] for k in services.RULE_FIELDS if k in data}


@requires(Right.READ)
@require_GET
def alert_list(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "monitoring/alert_list.html",
        {
            "rules": selectors.alert_rule_list(),
            "events": selectors.alert_event_list(limit=50),
        },
    )


@requires(Right.MONITORING_WRITE)
@require_http_methods(["GET", "POST"])
@_ui
def alert_create(request: HttpRequest) -> HttpResponse:
    form = AlertRuleForm(
        request.POST or None, initial={"deployment": request.GET.get("deployment", "")}
    )
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            rule = services.alert_rule_create(
                deployment=selectors.deployment_get(name=data["deployment"]),
                actor=request.user,
                **_rule_fields(data),
            )
        except ApplicationError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, f"Alert rule “{rule.name}” created.")
            return redirect("monitoring:alert-detail", rule_id=rule.pk)
    return render(request, "monitoring/alert_form.html", {"form": form, "rule": None})


@requires(Right.READ, write=Right.MONITORING_WRITE)
@require_http_methods(["GET", "POST"])
@_ui
def alert_detail(request: HttpRequest, rule_id: int) -> HttpResponse:
    rule = selectors.alert_rule_get(rule_id=rule_id)
    initial = {
        **{f: getattr(rule, f) for f in services.RULE_FIELDS},
        "deployment": rule.deployment.name,
    }
    form = AlertRuleForm(request.POST or None, initial=initial)
    form.fields["deployment"].disabled = True
    if request.method == "POST" and form.is_valid():
        try:
            rule = services.alert_rule_update(
                rule=rule,
                actor=request.user,
                rotate_secret=bool(request.POST.get("rotate_secret")),
                **_rule_fields(form.cleaned_data),
            )
        except ApplicationError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, "Alert rule saved.")
            return redirect("monitoring:alert-detail", rule_id=rule.pk)
    return render(
        request,
        "monitoring/alert_form.html",
        {
            "form": form,
            "rule": rule,
            "events": selectors.alert_event_list(rule=rule, limit=50),
        },
    )


@requires(Right.MONITORING_WRITE)
@require_http_methods(["GET", "POST"])
@_ui
def alert_delete(request: HttpRequest, rule_id: int) -> HttpResponse:
    rule = selectors.alert_rule_get(rule_id=rule_id)
    if request.method == "POST":
        services.alert_rule_delete(rule=rule, actor=request.user)
        messages.success(request, f"Alert rule “{rule.name}” deleted.")
        return redirect("monitoring:alert-list")
    return render(request, "monitoring/alert_delete.html", {"rule": rule})


# --- the control plane's own /metrics ------------------------------------------------------------------


def prometheus_allowed(request: HttpRequest) -> bool:
    token = settings.CONTROLPLANE_PROMETHEUS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return True
    address = client_address(request)
    if address and settings.CONTROLPLANE_PROMETHEUS_ALLOW:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(
            ip in ipaddress.ip_network(n, strict=False)
            for n in settings.CONTROLPLANE_PROMETHEUS_ALLOW
        )
    return False


@require_GET
def prometheus(request: HttpRequest) -> HttpResponse:
    """Fleet gauges for Prometheus. A bearer token (CONTROLPLANE_PROMETHEUS_TOKEN) or an
    allow-listed address (CONTROLPLANE_PROMETHEUS_ALLOW); nobody when neither is set."""
    if not prometheus_allowed(request):
        response = HttpResponse(
            "forbidden: send the Prometheus bearer token or scrape from an allowed address\n",
            status=403,
            content_type="text/plain",
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(
        selectors.prometheus_exposition(), content_type="text/plain; version=0.0.4; charset=utf-8"
    )
