from celery import shared_task

from .services import registry_sync as registry_sync_service
from .services import upload_leftovers_sweep as upload_leftovers_sweep_service


@shared_task(name="registry.tasks.registry_sync", ignore_result=True)
def registry_sync() -> dict:
    """Periodic: converge the mirror on MLflow (idempotent)."""
    result = registry_sync_service()
    return result.__dict__


@shared_task(name="registry.tasks.upload_leftovers_sweep", ignore_result=True)
def upload_leftovers_sweep() -> dict:
    """Periodic: delete MLflow runs and temp files of uploads whose worker died."""
    return upload_leftovers_sweep_service().__dict__
