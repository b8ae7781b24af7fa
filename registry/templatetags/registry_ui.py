"""Template helpers shared by every page that extends base.html."""

from __future__ import annotations

import json
from typing import Any

from django import template

from registry.models import PromotionRequest
from registry.selectors import promotion_request_list

register = template.Library()


@register.simple_tag(takes_context=True)
def pending_approvals_count(context: template.Context) -> int:
    """Pending promotion requests, for the nav badge (one COUNT query per page)."""
    user = context.get("user")
    if user is None or not user.is_authenticated:
        return 0
    return promotion_request_list(status=PromotionRequest.Status.PENDING).count()


@register.filter
def num(value: Any) -> str:
    """A metric value, short: 0.875 -> 0.875, 0.953333333 -> 0.953333, None -> —."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@register.filter
def pretty_json(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value, indent=2, sort_keys=True, default=str)
