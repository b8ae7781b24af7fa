"""PostgreSQL restarts while the REST API takes concurrent writes: the web app (gunicorn,
as `make run` runs it) answers errors while the database is gone, never crashes, serves
again once it is back, and every write it acknowledged is in the database."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from audit.models import AuditEvent
from registry.models import RegisteredModel
from tests.faults.conftest import postgres_manageable, postgres_stopped, report, wait_for

# serial: it stops a service every test worker shares (make test runs these after the others).
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.serial]


class Writer(threading.Thread):
    """Creates models one after another through the API, retrying each until it is
    acknowledged (201, or 409 for a retry whose first attempt committed unseen)."""

    def __init__(self, base: str, token: str, prefix: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base, self.token, self.prefix, self.stop = base, token, prefix, stop
        self.acked: dict[str, float] = {}  # name -> when acknowledged
        self.acked_on_retry: list[str] = []  # 409 after an error: committed, answer lost
        self.errors: list[tuple[float, str]] = []
        self.unexpected: list[str] = []

    def _create(self, name: str) -> tuple[int | None, str]:
        req = urllib.request.Request(
            f"{self.base}/api/v1/models",
            data=json.dumps({"name": name}).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                return resp.status, ""
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            return exc.code, body
        except OSError as exc:  # refused, reset, timed out
            return None, type(exc).__name__

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            name, tried = f"{self.prefix}{n}", False
            while True:  # retry this write until it is acknowledged
                status, body = self._create(name)
                if status == 201 or (status == 409 and tried and '"model_exists"' in body):
                    self.acked[name] = time.monotonic()
                    if status == 409:
                        self.acked_on_retry.append(name)
                    break
                if status is not None and status < 500:
                    self.unexpected.append(f"{name}: {status} {body[:200]}")
                    break
                self.errors.append((time.monotonic(), str(status or body)))
                tried = True
                time.sleep(0.05)
            n += 1


class Health(threading.Thread):
    """Polls /healthz; records every answer."""

    def __init__(self, base: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base, self.stop = base, stop
        self.seen: list[tuple[float, int | str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as resp:
                    status: int | str = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                status = type(exc).__name__
            self.seen.append((time.monotonic(), status))
            time.sleep(0.05)


def test_no_acknowledged_write_is_lost_when_postgresql_restarts_under_load(
    cluster, user, token_for
):
    reason = postgres_manageable()
    if reason:
        pytest.skip(reason)
    token = token_for(user)
    web, base = cluster.web(workers=2, threads=4)
    web_workers = web.children()
    assert len(web_workers) == 2, web.tail()

    stop = threading.Event()
    writers = [Writer(base, token, f"pg-{i}-", stop) for i in range(6)]
    health = Health(base, stop)
    for thread in [*writers, health]:
        thread.start()
    try:
        wait_for(
            lambda: sum(len(w.acked) for w in writers) >= 30,
            timeout=60,
            what="writes before the restart",
        )
        with postgres_stopped() as pg:
            time.sleep(3)  # the outage; the writers keep writing
        down, up = pg["stopping"], pg["accepting"]
        wait_for(
            lambda: sum(any(t > up for t in w.acked.values()) for w in writers) == len(writers),
            timeout=60,
            what="every writer to be acknowledged again",
            detail=web.tail,
        )
        time.sleep(1)
    finally:
        stop.set()
        for thread in [*writers, health]:
            thread.join(timeout=30)

    acked = {name for w in writers for name in w.acked}
    stored = set(
        RegisteredModel.objects.filter(name__startswith="pg-").values_list("name", flat=True)
    )
    assert acked - stored == set(), "acknowledged writes lost"
    # Atomic with the row: each acknowledged create has its audit event.
    audited = set(
        AuditEvent.objects.filter(action="model.create", object_id__in=acked).values_list(
            "object_id", flat=True
        )
    )
    assert audited == acked
    assert [u for w in writers for u in w.unexpected] == []
    # While the database is gone the API says 503 (retry), never 500 (a bug).
    errors = sorted(e for w in writers for e in w.errors)
    assert "500" not in {kind for _, kind in errors}, Counter(kind for _, kind in errors)
    # No server process crashed (or was replaced): the same master and workers serve on.
    assert web.alive() and web.children() == web_workers, web.tail()
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
        assert resp.status == 200
    # The outage was seen: /healthz said 503 while the database was down, 200 before and after.
    during = [s for t, s in health.seen if down < t < up]
    assert 503 in during, Counter(during)
    assert health.seen[0][1] == 200 and health.seen[-1][1] == 200

    unhealthy = [t for t, s in health.seen if s != 200]
    first_ok_after = min(
        min((t for t in w.acked.values() if t > up), default=float("inf")) for w in writers
    )
    report(
        "PostgreSQL stopped 3 s and started under 6 concurrent API writers",
        postgres_stop_s=pg["stopped"] - pg["stopping"],
        postgres_start_s=pg["accepting"] - pg["starting"],
        postgres_unavailable_s=up - down,
        writes_acked=len(acked),
        acked_on_retry=sum(len(w.acked_on_retry) for w in writers),
        extra_rows_unacked=len(stored - acked),
        api_errors=len(errors),
        api_error_kinds=dict(Counter(kind for _, kind in errors)),
        api_errors_window_s=(errors[-1][0] - errors[0][0]) if errors else 0.0,
        api_errors_after_db_up_s=max(0.0, errors[-1][0] - up) if errors else 0.0,
        first_write_after_db_up_s=first_ok_after - up,
        healthz_non_200=len(unhealthy),
        healthz_kinds=dict(Counter(s for _, s in health.seen)),
    )
