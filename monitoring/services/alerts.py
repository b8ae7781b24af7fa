"""Alert rules: their management, the ok → firing → resolved state machine, notifications
(webhook, e-mail) and the optional rollback."""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from controlplane.lib.errors import ApplicationError
from controlplane.lib.tasks import enqueue_on_commit
from deployments.models import Deployment

from .. import catalog
from ..adapters import AdapterError, Delivery, get_channel
from ..models import (
    AlertEvent,
    AlertNotification,
    AlertRule,
)

logger = logging.getLogger(__name__)

RULE_FIELDS = (
    "name",
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
)


def _rule_snapshot(rule: AlertRule) -> dict:
    return {**{f: getattr(rule, f) for f in RULE_FIELDS}, "deployment": rule.deployment.name}


def _emails(raw: str) -> list[str]:
    return [e.strip() for e in raw.replace(";", ",").split(",") if e.strip()]


def alert_rule_validate(rule: AlertRule) -> None:
    if not rule.name or len(rule.name) > 200:
        raise ApplicationError("name is required (at most 200 characters)", code="invalid_rule")
    if rule.metric not in catalog.METRICS:
        raise ApplicationError(
            f"unknown metric {rule.metric!r}; one of {', '.join(catalog.METRICS)}",
            code="unknown_metric",
        )
    if rule.comparison not in AlertRule.Comparison.values:
        raise ApplicationError("comparison must be one of gt, gte, lt, lte", code="invalid_rule")
    if not isinstance(rule.threshold, int | float) or not math.isfinite(rule.threshold):
        raise ApplicationError("threshold must be a finite number", code="invalid_rule")
    if not 60 <= int(rule.window_s) <= 30 * 86400:
        raise ApplicationError("window_s must be from 60 seconds to 30 days", code="invalid_rule")
    if int(rule.min_samples) < 1:
        raise ApplicationError("min_samples must be at least 1", code="invalid_rule")
    if rule.webhook_url:
        try:
            get_channel("webhook").validate(rule.webhook_url)
        except AdapterError as exc:
            raise ApplicationError(str(exc), code="invalid_webhook") from None
    for email in _emails(rule.email_to):
        try:
            get_channel("email").validate(email)
        except AdapterError as exc:
            raise ApplicationError(str(exc), code="invalid_email") from None
    rule.email_to = ", ".join(_emails(rule.email_to))


@transaction.atomic
def alert_rule_create(
    *,
    deployment: Deployment,
    name: str,
    metric: str,
    comparison: str,
    threshold: float,
    window_s: int = 300,
    min_samples: int = 1,
    model_version: int | None = None,
    webhook_url: str = "",
    email_to: str = "",
    rollback_on_fire: bool = False,
    enabled: bool = True,
    actor: AbstractBaseUser | None,
) -> AlertRule:
    rule = AlertRule(
        deployment=deployment,
        name=name,
        metric=metric,
        comparison=comparison,
        threshold=threshold,
        window_s=window_s,
        min_samples=min_samples,
        model_version=model_version,
        webhook_url=webhook_url or "",
        email_to=email_to or "",
        rollback_on_fire=rollback_on_fire,
        enabled=enabled,
        webhook_secret=secrets.token_hex(32),
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    alert_rule_validate(rule)
    rule.save()
    audit_record(
        actor=actor,
        action="alert_rule.create",
        object_type="alert_rule",
        object_id=rule.pk,
        object_repr=str(rule),
        after=_rule_snapshot(rule),
        system="monitoring",
    )
    return rule


@transaction.atomic
def alert_rule_update(
    *, rule: AlertRule, actor: AbstractBaseUser | None, rotate_secret: bool = False, **changes: Any
) -> AlertRule:
    rule = AlertRule.objects.select_for_update().select_related("deployment").get(pk=rule.pk)
    before = _rule_snapshot(rule)
    unknown = set(changes) - set(RULE_FIELDS)
    if unknown:
        raise ApplicationError(f"cannot change {', '.join(sorted(unknown))}", code="invalid_rule")
    for key, value in changes.items():
        setattr(rule, key, "" if value is None and key in ("webhook_url", "email_to") else value)
    alert_rule_validate(rule)
    if rotate_secret:
        rule.webhook_secret = secrets.token_hex(32)
    rule.save()
    audit_record(
        actor=actor,
        action="alert_rule.update",
        object_type="alert_rule",
        object_id=rule.pk,
        object_repr=str(rule),
        before=before,
        after={**_rule_snapshot(rule), "secret_rotated": rotate_secret},
        system="monitoring",
    )
    return rule


@transaction.atomic
def alert_rule_delete(*, rule: AlertRule, actor: AbstractBaseUser | None) -> None:
    rule = AlertRule.objects.select_for_update().select_related("deployment").get(pk=rule.pk)
    audit_record(
        actor=actor,
        action="alert_rule.delete",
        object_type="alert_rule",
        object_id=rule.pk,
        object_repr=str(rule),
        before=_rule_snapshot(rule),
        system="monitoring",
    )
    rule.delete()


_COMPARE = {
    "gt": lambda v, t: v > t,
    "gte": lambda v, t: v >= t,
    "lt": lambda v, t: v < t,
    "lte": lambda v, t: v <= t,
}


@dataclass
class Evaluation:
    rule_id: int
    value: float | None
    samples: int
    state: str
    changed: bool = False
    event_id: int | None = None
    notifications: list[int] = field(default_factory=list)


def alert_rule_evaluate(*, rule_id: int, now: datetime | None = None) -> Evaluation | None:
    """Compute the rule's metric over its window and move its state: ok or resolved →
    firing when the condition holds on at least ``min_samples`` samples, firing → resolved
    when it no longer does. Too few samples change nothing."""
    from ..selectors import metric_window

    rule = AlertRule.objects.select_related("deployment").filter(pk=rule_id, enabled=True).first()
    if rule is None:
        return None
    now = now or timezone.now()
    value, samples = metric_window(
        deployment_id=rule.deployment_id,
        name=rule.metric,
        end=now.timestamp(),
        seconds=rule.window_s,
        version=rule.model_version,
    )
    return _alert_transition(rule_id=rule.pk, value=value, samples=samples, now=now)


@transaction.atomic
def _alert_transition(
    *, rule_id: int, value: float | None, samples: int, now: datetime
) -> Evaluation | None:
    rule = AlertRule.objects.select_related("deployment").filter(pk=rule_id).first()
    if rule is None:
        return None
    AlertRule.objects.filter(pk=rule.pk).update(
        last_value=value, last_samples=samples, last_evaluated_at=now
    )
    result = Evaluation(rule_id=rule.pk, value=value, samples=samples, state=rule.state)
    if value is None or samples < rule.min_samples:
        return result
    breached = _COMPARE[rule.comparison](value, rule.threshold)
    old = rule.state
    if breached and old != AlertRule.State.FIRING:
        new = AlertRule.State.FIRING
    elif not breached and old == AlertRule.State.FIRING:
        new = AlertRule.State.RESOLVED
    else:
        return result
    # Compare-and-swap: of two evaluators, one moves the state and notifies.
    if not AlertRule.objects.filter(pk=rule.pk, state=old).update(state=new, state_changed_at=now):
        return result
    symbol = AlertRule.Comparison(rule.comparison).label
    message = (
        f"{rule.metric} = {value:.6g} over the last {rule.window_s}s ({samples} samples); "
        f"threshold {symbol} {rule.threshold:g}"
    )
    if new == AlertRule.State.FIRING and rule.rollback_on_fire:
        message += "; " + _rollback(rule)
    event = AlertEvent.objects.create(
        rule=rule, from_state=old, to_state=new, value=value, samples=samples, message=message
    )
    audit_record(
        actor=None,
        action="alert_rule.fire" if new == AlertRule.State.FIRING else "alert_rule.resolve",
        object_type="alert_rule",
        object_id=rule.pk,
        object_repr=str(rule),
        before={"state": old},
        after={"state": new, "value": value, "samples": samples, "message": message},
        system="monitoring",
    )
    notifications = []
    if rule.webhook_url:
        notifications.append(
            AlertNotification(event=event, channel="webhook", target=rule.webhook_url)
        )
    for email in _emails(rule.email_to):
        notifications.append(AlertNotification(event=event, channel="email", target=email))
    AlertNotification.objects.bulk_create(notifications)
    from ..tasks import deliver_notification

    ids = list(AlertNotification.objects.filter(event=event).values_list("pk", flat=True))
    for pk in ids:
        enqueue_on_commit(deliver_notification, pk)
    result.state, result.changed, result.event_id, result.notifications = new, True, event.pk, ids
    return result


def _rollback(rule: AlertRule) -> str:
    from deployments.services import deployment_rollback

    try:
        d = deployment_rollback(
            deployment=rule.deployment,
            actor=None,
            automatic=True,
            system="monitoring",
            reason=f"alert rule {rule.name!r} fired",
        )
    except ApplicationError as exc:
        return f"rollback refused: {exc.message}"
    return f"rolled back to revision {d.desired_revision.number}"


def notifications_requeue(*, now: datetime | None = None) -> int:
    """Deliveries whose task was lost (broker down when the rule fired) or whose worker died
    while sending: pending ones older than two minutes are sent again, and sending ones
    claimed ten minutes ago (longer than every retry takes) go back to pending first."""
    from ..tasks import deliver_notification

    now = now or timezone.now()
    AlertNotification.objects.filter(
        status=AlertNotification.Status.SENDING, claimed_at__lt=now - timedelta(minutes=10)
    ).update(status=AlertNotification.Status.PENDING)
    ids = list(
        AlertNotification.objects.filter(
            status=AlertNotification.Status.PENDING, created_at__lt=now - timedelta(minutes=2)
        ).values_list("pk", flat=True)[:500]
    )
    for pk in ids:
        try:
            deliver_notification.apply_async(args=[pk], retry=False)
        except Exception:  # broker still down: the next pass tries again
            logger.warning("could not enqueue notification %s", pk, exc_info=True)
            break
    return len(ids)


def alert_rules_evaluate(*, now: datetime | None = None) -> int:
    ids = list(
        AlertRule.objects.filter(enabled=True, deployment__deleted=False).values_list(
            "pk", flat=True
        )
    )
    for pk in ids:
        try:
            alert_rule_evaluate(rule_id=pk, now=now)
        except Exception:  # one broken rule must not stop the others
            logger.exception("evaluating alert rule %s failed", pk)
    notifications_requeue(now=now)
    return len(ids)


def _payload(notification: AlertNotification) -> tuple[str, dict]:
    event = notification.event
    rule = event.rule
    subject = f"[{event.to_state.upper()}] {rule.deployment.name}: {rule.name}"
    return subject, {
        "event_id": event.pk,
        "rule_id": rule.pk,
        "rule": rule.name,
        "deployment": rule.deployment.name,
        "metric": rule.metric,
        "model_version": rule.model_version,
        "state": event.to_state,
        "previous_state": event.from_state,
        "value": event.value,
        "samples": event.samples,
        "threshold": rule.threshold,
        "comparison": rule.comparison,
        "window_s": rule.window_s,
        "message": event.message,
        "at": event.created_at.isoformat(),
    }


def notification_deliver(*, notification_id: int) -> AlertNotification | None:
    """Send one notification (with the channel's retries). Claimed by compare-and-swap, so a
    duplicate task delivery sends nothing twice."""
    if not AlertNotification.objects.filter(
        pk=notification_id, status=AlertNotification.Status.PENDING
    ).update(status=AlertNotification.Status.SENDING, claimed_at=timezone.now()):
        return None
    notification = AlertNotification.objects.select_related("event__rule__deployment").get(
        pk=notification_id
    )
    subject, payload = _payload(notification)
    secret = notification.event.rule.webhook_secret
    if notification.channel == "webhook" and not secret:
        # Unsigned would look like a forgery to the receiver: say why instead.
        delivery = Delivery(
            ok=False,
            status=None,
            attempts=0,
            error="the rule's signing secret cannot be decrypted (SECRET_KEY changed without "
            "SECRET_KEY_FALLBACKS): rotate the secret",
        )
    else:
        delivery = get_channel(notification.channel).send(
            notification.target, subject=subject, payload=payload, secret=secret
        )
    AlertNotification.objects.filter(pk=notification_id).update(
        status=AlertNotification.Status.SENT if delivery.ok else AlertNotification.Status.FAILED,
        attempts=notification.attempts + delivery.attempts,
        response_status=delivery.status,
        last_error=delivery.error[:2000],
        sent_at=timezone.now() if delivery.ok else None,
    )
    notification.refresh_from_db()
    return notification
