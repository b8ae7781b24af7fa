"""The deployment page's Shadow panel actions: start (or change the fraction), stop, promote.
Thin: parse, call the one service in deployments/shadow.py, redirect with a message."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from accounts.permissions import Right, requires
from controlplane.lib.errors import ApplicationError
from controlplane.lib.views import error_pages
from registry.models import ModelVersion

from . import selectors, shadow
from .shadow_report import run_summary, shadow_latest

_ui = error_pages("deployments/error.html")


def shadow_panel(d) -> dict:
    """What the Shadow panel shows: the active (or last) shadow with its report, and the
    versions a new shadow can use."""
    run = shadow_latest(deployment=d)
    return {
        "run": run_summary(run) if run is not None else None,
        "active": run is not None and run.state == run.State.ACTIVE,
        "versions": list(
            ModelVersion.objects.filter(model=d.model, status=ModelVersion.Status.READY)
            .order_by("-version")
            .values_list("version", flat=True)[:50]
        ),
    }


@requires(Right.DEPLOY)
@_ui
@require_POST
def deployment_shadow(request: HttpRequest, name: str) -> HttpResponse:
    d = selectors.deployment_get(name=name)
    action = request.POST.get("action", "")
    try:
        if action == "start":
            raw = request.POST.get("fraction", "").strip().rstrip("%")
            try:
                fraction = float(raw) / (100.0 if request.POST.get("percent") else 1.0)
            except ValueError:
                raise ApplicationError(
                    f"{raw!r} is not a number", code="invalid_shadow_fraction"
                ) from None
            run = shadow.shadow_start(
                deployment=d,
                version=request.POST.get("version", "").strip(),
                fraction=fraction,
                actor=request.user,
            )
            messages.success(
                request,
                f"Shadow r{run.revision.number} (v{run.revision.model_version.version}) gets "
                f"{run.fraction:.0%} of the requests once its instances are ready.",
            )
        elif action == "stop":
            if shadow.shadow_stop(deployment=d, actor=request.user) is None:
                messages.info(request, "There is no active shadow.")
            else:
                messages.success(request, "Shadow stopped: its instances are being shut down.")
        elif action == "promote":
            d = shadow.shadow_promote(deployment=d, actor=request.user)
            messages.success(
                request,
                f"Promoting the shadow: r{d.desired_revision.number} rolls out and takes the "
                "traffic once ready.",
            )
        else:
            raise ApplicationError("unknown shadow action", code="invalid_action")
    except ApplicationError as exc:
        messages.error(request, f"Shadow: {exc.message}")
    return redirect(reverse("deployments:deployment-detail", kwargs={"name": d.name}))
