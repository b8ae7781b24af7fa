"""The embedded broker: kombu's filesystem transport, safe against torn messages.

kombu creates a message file, then writes it: a process killed in between (a worker
SIGKILLed while it enqueues a follow-up task) leaves an empty file, and the worker that
reads it stops with "Unrecoverable error: JSONDecodeError" (celery/kombu#1551), which
stops everything `make run` started. Here a message is written under a hidden name and
renamed into place, so it appears whole or not at all; a message that still cannot be
decoded is logged and dropped: desired state lives in the database, and the periodic
passes redo whatever a lost message would have done.
"""

from __future__ import annotations

import logging
import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
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
