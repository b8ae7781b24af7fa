"""A real Celery worker on the configured broker (Redis in CI, the embedded
filesystem broker otherwise) runs tasks enqueued after commit."""

from __future__ import annotations

import time

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings
from django.db import transaction

from controlplane.celery import app
from controlplane.lib.tasks import enqueue_on_commit
from registry.models import RegisteredModel
from registry.tasks import registry_sync

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_tasks_enqueued_on_commit_run_on_a_real_worker(model_name, logged_run):
    import mlflow

    mlflow.register_model(logged_run["source"], model_name)
    with start_worker(
        app,
        queues=[settings.CELERY_TASK_DEFAULT_QUEUE],
        perform_ping_check=False,
        pool="solo",
        shutdown_timeout=30,
    ):
        with transaction.atomic():
            enqueue_on_commit(registry_sync)
            # Not sent before the commit.
            time.sleep(0.5)
            assert not RegisteredModel.objects.filter(name=model_name).exists()
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and not RegisteredModel.objects.filter(name=model_name).exists()
        ):
            time.sleep(0.2)
    assert RegisteredModel.objects.filter(name=model_name).exists()


def test_a_rolled_back_transaction_enqueues_nothing(monkeypatch):
    sent = []
    monkeypatch.setattr(registry_sync, "apply_async", lambda *a, **k: sent.append(a))
    with pytest.raises(RuntimeError), transaction.atomic():
        enqueue_on_commit(registry_sync)
        raise RuntimeError("boom")
    assert sent == []
