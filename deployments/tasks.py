from celery import shared_task

from .models import Deployment
from .reconciler import reconcile as reconcile_deployment
from .reconciler import sweep_strays


@shared_task(name="deployments.tasks.reconcile", ignore_result=True, acks_late=True)
def reconcile(deployment_id: int) -> bool:
    """Converge one deployment; idempotent, safe to deliver twice."""
    done = reconcile_deployment(deployment_id)
    # Not converged yet: follow up. Another worker on it (None): that one follows up, and
    # the periodic pass takes over should it die. Following up on a held lease too would
    # start a new endless chain of messages with every periodic pass while it is held.
    if done is False and Deployment.objects.filter(pk=deployment_id).exists():
        reconcile.apply_async(args=[deployment_id], countdown=0.5, expires=30)
    return bool(done)


@shared_task(name="deployments.tasks.reconcile_all", ignore_result=True)
def reconcile_all() -> int:
    """Periodic: every deployment gets a pass; strays are swept."""
    ids = list(Deployment.objects.values_list("pk", flat=True))
    for pk in ids:
        reconcile.apply_async(args=[pk], expires=30)
    sweep_strays()
    return len(ids)


@shared_task(name="deployments.tasks.environments_cleanup", ignore_result=True)
def environments_cleanup() -> int:
    """Periodic: remove the local environments no revision uses, after their retention."""
    from .reconciler import cleanup_environments

    return len(cleanup_environments())


@shared_task(name="deployments.tasks.docker_images_cleanup", ignore_result=True)
def docker_images_cleanup() -> int:
    """Periodic: remove serving images no container used for their retention period."""
    from .reconciler import cleanup_docker_images

    return len(cleanup_docker_images())


@shared_task(name="deployments.tasks.autoscale_all", ignore_result=True)
def autoscale_all() -> int:
    """Periodic (CONTROLPLANE_AUTOSCALE_INTERVAL, 1 s): poll the routers of autoscaled
    deployments and apply the autoscaler's decisions (deployments/scaling.py)."""
    from .scaling import autoscale_all as run

    return run()


@shared_task(name="deployments.tasks.autoscale_samples_prune", ignore_result=True)
def autoscale_samples_prune() -> int:
    """Periodic (hourly): drop autoscaler samples past CONTROLPLANE_AUTOSCALE_SAMPLE_RETENTION_HOURS."""
    from .scaling import samples_prune

    return samples_prune()
