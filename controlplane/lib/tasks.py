"""Enqueue Celery tasks only after the surrounding transaction commits."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

logger = logging.getLogger(__name__)


def enqueue_on_commit(task: Any, *args: Any, **kwargs: Any) -> None:
    """Send ``task`` once the current transaction commits.

    A lost message is never a lost change: desired state lives in the database
    and periodic tasks converge on it, so a broker outage only delays work.
    """

    def _send() -> None:
        try:
            task.apply_async(args=args, kwargs=kwargs, retry=False)
        except Exception:  # broker down: the periodic pass picks the work up
            logger.warning(
                "could not enqueue %s; the periodic pass will do it", task.name, exc_info=True
            )

    transaction.on_commit(_send)


def send_on_commit(task_name: str, *args: Any) -> None:
    """Like enqueue_on_commit, by task name: for an app that must not import another."""
    from controlplane.celery import app

    def _send() -> None:
        try:
            app.send_task(task_name, args=args, retry=False, expires=60)
        except Exception:
            logger.warning(
                "could not enqueue %s; the periodic pass will do it", task_name, exc_info=True
            )

    transaction.on_commit(_send)
