from celery import shared_task

from .services import registry_sync as registry_sync_service


@shared_task(name="registry.tasks.registry_sync", ignore_result=True)
def registry_sync() -> dict:
    """Periodic: converge the mirror on MLflow (idempotent)."""
    result = registry_sync_service()
    return result.__dict__
