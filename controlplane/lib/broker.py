"""The brokers' transports: kombu's own, each mended where it stops a worker.

**The embedded broker** (filesystem), safe against torn messages.

kombu creates a message file, then writes it: a process killed in between (a worker
SIGKILLed while it enqueues a follow-up task) leaves an empty file, and the worker that
reads it stops with "Unrecoverable error: JSONDecodeError" (celery/kombu#1551), which
stops everything `make run` started. Here a message is written under a hidden name and
renamed into place, so it appears whole or not at all; a message that still cannot be
decoded is logged and dropped: desired state lives in the database, and the periodic
passes redo whatever a lost message would have done.

**Redis**, safe against a late acknowledgement on a lost connection. Tasks are acknowledged
late (CELERY_TASK_ACKS_LATE): a task that finishes while Redis is down acknowledges on a
channel whose connection kombu has already torn down, and kombu's Redis channel then fails
building a new pool from the missing connection (``AttributeError: 'NoneType' object has no
attribute 'hostname'``). That is not one of the transport's connection errors, so Celery
does not log-and-go-on as it does for a failed ack: the exception leaves the event loop and
the worker exits (seen in CI, tests/faults/test_broker_outage.py). Here it is the connection
error it is: the ack is logged as failed and the worker reconnects like after any other
loss. The message stays unacknowledged and Redis redelivers it after the visibility timeout
if it still has it; the task is idempotent, and the periodic passes redo its work anyway.
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic

import redis.exceptions
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

logger = logging.getLogger(__name__)


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # The name kombu gives it (ordered by time); the temporary one does not end in
        # ".<queue>.msg", so no consumer picks it up before the rename.
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        temporary = os.path.join(self.data_folder_out, f".{name}.tmp")
        try:
            with open(temporary, "wb") as fh:
                fh.write(dumps(payload).encode())
            os.replace(temporary, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue):
        while True:  # until a message decodes, or kombu raises Empty
            try:
                return super()._get(queue)
            except ValueError as exc:  # JSONDecodeError: torn by a producer killed mid-write
                logger.error("dropped an undecodable message from queue %s: %s", queue, exc)


class Transport(filesystem.Transport):
    Channel = Channel


class RedisChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous=False):
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError(
                "the broker connection was lost (this channel belongs to a closed connection)"
            )
        return super()._connparams(asynchronous=asynchronous)


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel
