"""Fixtures for monitoring tests.

Most tests need a deployment's database rows, not running servers: ``fleet`` makes them
(registry mirror rows, a deployment, its revisions and instances). The model server's own
code renders the /metrics text (``serving.metrics.Metrics``) and prediction log pages have
its documented shape. The end-to-end tests start real servers (test_end_to_end.py).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from django.utils import timezone

from deployments.models import Deployment, Instance, Revision
from registry.models import ModelVersion, RegisteredModel
from serving.metrics import Metrics

_ports = itertools.count(41000)
SPEC = {"runtime": "local", "replicas": 1, "cpu": None, "memory_mb": None, "env": {}}
FEATURES = ["f0", "f1"]
EXAMPLE = {"columns": FEATURES, "data": [[0.1, 1.0], [0.5, 2.0], [0.9, 3.0], [0.3, 4.0]]}


@dataclass
class Fleet:
    deployment: Deployment
    revisions: dict[int, Revision]
    instances: dict[int, Instance]

    def instance(self, version: int = 1) -> Instance:
        return self.instances[version]


@pytest.fixture
def make_deployment(db):
    def make(name: str = "churn", versions: tuple[int, ...] = (1,), *, example=EXAMPLE) -> Fleet:
        model, _ = RegisteredModel.objects.get_or_create(name=f"{name}-model")
        d = Deployment.objects.create(
            name=name,
            model=model,
            target_version=versions[-1],
            runtime="local",
            port=next(_ports),
            status=Deployment.Status.READY,
        )
        revisions, instances = {}, {}
        for number, v in enumerate(versions, 1):
            mv = ModelVersion.objects.create(
                model=model,
                version=v,
                source=f"models:/{model.name}/{v}",
                input_example=example,
                signature=None,
            )
            rev = Revision.objects.create(
                deployment=d,
                number=number,
                model_version=mv,
                spec=SPEC,
                reason="test",
                state=Revision.State.LIVE,
                live_at=timezone.now(),
            )
            revisions[v] = rev
            instances[v] = Instance.objects.create(
                deployment=d,
                revision=rev,
                ordinal=0,
                runtime="local",
                runtime_id=f"{1000 + number}:1:{name}-r{number}-0",
                port=next(_ports),
                state=Instance.State.READY,
            )
        d.desired_revision = d.serving_revision = revisions[versions[-1]]
        d.save()
        return Fleet(d, revisions, instances)

    return make


@pytest.fixture
def fleet(make_deployment) -> Fleet:
    return make_deployment("churn", (1, 2))


class FakeServer:
    """The /metrics text of a model server process, rendered by the server's own code."""

    def __init__(self, version: str = "1", start: float | None = None) -> None:
        self.metrics = Metrics("m", version)
        if start is not None:
            self.metrics.start_time = start

    def serve(
        self, n: int, *, status: int = 200, seconds: float = 0.004, endpoint: str = "/invocations"
    ) -> None:
        for _ in range(n):
            self.metrics.observe_request(endpoint, status, seconds)

    def text(self) -> str:
        return self.metrics.render().decode()


@pytest.fixture
def server():
    return FakeServer


def record(
    seq: int, request_id: str, ts: float, outputs, *, version: str = "1", inputs=None
) -> dict:
    """One prediction log record, as GET /predictions returns it (PREDICTION_LOG.md)."""
    return {
        "v": 1,
        "seq": seq,
        "request_id": request_id,
        "ts": ts,
        "model": "m",
        "version": version,
        "endpoint": "/invocations",
        "latency_ms": 1.5,
        "n_rows": len(outputs),
        "outputs": outputs,
        "inputs": inputs,
    }


def page(records: list[dict], *, boot_id: str = "boot-1", after: int = 0) -> dict:
    return {
        "boot_id": boot_id,
        "next": records[-1]["seq"] if records else after,
        "dropped": 0,
        "records": records,
    }


def epoch(*args) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_minute() -> int:
    return int(time.time()) // 60 * 60


def ingest(instance: Instance, records: list[dict], *, boot_id: str | None = None) -> int:
    """Feed records to the collector as if pulled from the instance's GET /predictions."""
    from monitoring import services
    from monitoring.models import PullState

    boot_id = boot_id or f"boot-{instance.pk}"
    state = PullState.objects.filter(instance=instance).first()
    after = state.cursor if state and state.boot_id == boot_id else 0
    return services.predictions_ingest(
        instance_id=instance.pk,
        boot_id=boot_id,
        after=after,
        page=page(records, boot_id=boot_id, after=after),
    )
