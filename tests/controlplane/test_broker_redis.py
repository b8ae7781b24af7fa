"""The Redis transport of controlplane/lib/broker.py against a real Redis: a task that
finishes after the broker connection was lost fails its late ack as a connection error
(logged, the worker goes on) instead of an AttributeError that stops the worker."""

from __future__ import annotations

import logging
import uuid

import pytest
from django.conf import settings
from kombu import Connection, Exchange, Queue

from controlplane.celery import app

REDIS_URL = (
    settings.CELERY_BROKER_URL
    if settings.CELERY_BROKER_URL.startswith("redis://")
    else "redis://127.0.0.1:6379/15"
)
OURS = "controlplane.lib.broker:RedisTransport"


def _received_then_connection_lost(transport: str | None):
    """A message taken but not yet acked, then its channel left as the worker's was when
    CI saw the worker exit (tests/faults/test_broker_outage.py, Redis stopped while a task
    ran): the channel's pool dropped and its connection's client cleared, so the late ack
    has to build a pool from a connection that is no longer there."""
    conn = Connection(REDIS_URL, transport=transport)
    name = f"test-late-ack-{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, type="direct")
    queue = Queue(name, exchange, routing_key=name)
    channel = conn.channel()
    bound = queue(channel)
    bound.declare()
    conn.Producer(channel).publish({"n": 1}, exchange=exchange, routing_key=name, declare=[queue])
    message = bound.get(no_ack=False)
    assert message is not None and message.payload == {"n": 1}
    errors = conn.connection_errors
    bound.delete()
    channel.do_restore = False  # nothing to put back at exit: the queue is gone
    channel._disconnect_pools()
    conn.transport.client = None
    return message, errors


def test_kombus_own_redis_transport_stops_on_a_late_ack():
    """Why ours exists: if this starts failing, kombu mended it and ours can go."""
    message, errors = _received_then_connection_lost(None)
    with pytest.raises(AttributeError):
        message.ack_log_error(logging.getLogger("test"), errors)


def test_ours_logs_the_failed_ack_and_goes_on(caplog):
    message, errors = _received_then_connection_lost(OURS)
    with caplog.at_level(logging.CRITICAL, logger="test"):
        message.ack_log_error(logging.getLogger("test"), errors)  # does not raise
    assert "Couldn't ack" in caplog.text
    assert "connection was lost" in caplog.text
    assert message.acknowledged is False


def test_ours_is_what_celery_uses_for_a_redis_broker():
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        assert settings.CELERY_BROKER_TRANSPORT != OURS
        pytest.skip("the broker is not redis:// (CI runs this with CELERY_BROKER_URL=redis://...)")
    with app.connection_for_write() as conn:
        assert type(conn.transport).__module__ == "controlplane.lib.broker"
        assert type(conn.transport).__name__ == "RedisTransport"
