from __future__ import annotations

from typing import Any

from django.db import transaction

from controlplane.lib.middleware import current_request_id, current_source_address

from .models import AuditEvent


def audit_record(
    *,
    actor: Any,
    action: str,
    object_type: str,
    object_id: str | int,
    object_repr: str = "",
    before: Any = None,
    after: Any = None,
    system: str | None = None,
) -> AuditEvent:
    """Append one audit row. Must be called inside the transaction of the change."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("audit_record must run inside the transaction of the change it records")
    user = actor if getattr(actor, "is_authenticated", False) else None
    label = user.get_username() if user is not None else f"system:{system or 'controlplane'}"
    request_id = current_request_id()
    return AuditEvent.objects.create(
        actor=user,
        actor_label=label,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        object_repr=str(object_repr)[:255],
        before=before,
        after=after,
        request_id="" if request_id == "-" else request_id,
        source_address=current_source_address(),
    )
