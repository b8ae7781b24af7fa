"""Celery tasks: take ids, call one service. Schedules are in settings.CELERY_BEAT_SCHEDULE."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from . import services


@shared_task(name="monitoring.tasks.collect_all", ignore_result=True)
def collect_all() -> int:
    """Periodic (CONTROLPLANE_METRICS_INTERVAL): scrape and pull every deployment."""
    ids = services.deployments_to_collect()
    expires = settings.CONTROLPLANE_METRICS_INTERVAL * 2
    for pk in ids:
        scrape_deployment.apply_async(args=[pk], expires=expires)
        pull_predictions.apply_async(args=[pk], expires=expires)
    return len(ids)


@shared_task(name="monitoring.tasks.scrape_deployment", ignore_result=True)
def scrape_deployment(deployment_id: int) -> int:
    return services.deployment_scrape(deployment_id=deployment_id)


@shared_task(name="monitoring.tasks.pull_predictions", ignore_result=True)
def pull_predictions(deployment_id: int) -> int:
    return services.deployment_pull(deployment_id=deployment_id)


@shared_task(name="monitoring.tasks.probe_all", ignore_result=True)
def probe_all() -> int:
    """Periodic (CONTROLPLANE_PROBE_INTERVAL): probe every serving deployment."""
    ids = services.deployments_to_probe()
    for pk in ids:
        probe_deployment.apply_async(args=[pk], expires=settings.CONTROLPLANE_PROBE_INTERVAL)
    return len(ids)


@shared_task(name="monitoring.tasks.probe_deployment", ignore_result=True)
def probe_deployment(deployment_id: int) -> bool:
    result = services.deployment_probe(deployment_id=deployment_id)
    return bool(result and result.ok)


@shared_task(name="monitoring.tasks.evaluate_alerts", ignore_result=True)
def evaluate_alerts() -> int:
    """Periodic (CONTROLPLANE_ALERT_INTERVAL): evaluate every enabled alert rule."""
    return services.alert_rules_evaluate()


@shared_task(name="monitoring.tasks.deliver_notification", ignore_result=True, acks_late=True)
def deliver_notification(notification_id: int) -> bool:
    notification = services.notification_deliver(notification_id=notification_id)
    return bool(notification and notification.status == "sent")


@shared_task(name="monitoring.tasks.apply_retention", ignore_result=True)
def apply_retention() -> dict:
    """Periodic (hourly): delete series older than the retention settings."""
    return services.retention_apply()
