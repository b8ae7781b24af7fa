"""The audit log, read-only, for every logged-in user."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from accounts.permissions import Right, requires

from .models import AuditEvent
from .selectors import audit_event_list

PAGE_SIZE = 50


@requires(Right.VIEW_AUDIT)
@require_GET
def audit_list(request: HttpRequest) -> HttpResponse:
    action = request.GET.get("action", "").strip()[:64]
    object_type = request.GET.get("object_type", "").strip()[:64]
    events = audit_event_list(object_type=object_type or None)
    if action:
        events = events.filter(action=action)
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    choices = AuditEvent.objects.order_by()
    return render(
        request,
        "audit/audit_list.html",
        {
            "page": page,
            "action": action,
            "object_type": object_type,
            "actions": choices.values_list("action", flat=True).distinct().order_by("action"),
            "object_types": choices.values_list("object_type", flat=True)
            .distinct()
            .order_by("object_type"),
        },
    )
