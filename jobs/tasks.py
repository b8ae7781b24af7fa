from celery import shared_task

from . import services


@shared_task(name="jobs.tasks.job_run", ignore_result=True, acks_late=True)
def job_run(job_id: int) -> str | None:
    """Run or resume one job; a duplicate delivery finds it taken and does nothing."""
    return services.job_run(job_id=job_id)


@shared_task(name="jobs.tasks.jobs_sweep", ignore_result=True)
def jobs_sweep() -> dict:
    """Periodic: resume jobs whose worker died, re-send lost messages, stop stray servers."""
    return services.job_sweep()
