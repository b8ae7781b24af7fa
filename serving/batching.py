"""Adaptive micro-batching on the event loop.

A submitted request is predicted on the next loop iteration, together with every other request
that arrived in the same iteration (up to `max_rows`). While the model runs the loop cannot
read, so requests that arrive meanwhile queue up and form the next batch: batches grow with
load and stay at one request when there is no concurrency, adding no latency. The delay only
applies while another request is still arriving (headers seen, body incomplete); the batch then
waits for it at most `max_delay_s` after its first request was queued.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from serving.inputs import Rows
from serving.model import Outputs


class Pending:
    """One request waiting for its rows to be predicted; `done(outputs, error)` answers it."""

    __slots__ = ("rows", "done", "queued")

    def __init__(self, rows: Rows, done: Callable[[Outputs | None, BaseException | None], Any]):
        self.rows = rows
        self.done = done
        self.queued = 0.0


def concat(rows: list[Rows]) -> Rows | None:
    """All requests' rows as one batch, or None when they cannot be stacked."""
    n = sum(r.n for r in rows)
    if all(r.matrix is not None for r in rows):
        return Rows(n, matrix=np.concatenate([r.matrix for r in rows]))
    if all(r.columns is not None for r in rows):
        keys = list(rows[0].columns)
        if all(list(r.columns) == keys for r in rows):
            return Rows(n, columns={k: np.concatenate([r.columns[k] for r in rows]) for k in keys})
    return None


class Batcher:
    """Queues requests and predicts them in batches; everything runs on the loop thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        predict: Callable[[Rows], Outputs],
        *,
        max_rows: int,
        max_delay_s: float,
        incoming: Callable[[], int],
        on_batch: Callable[[int], None],
    ) -> None:
        self.loop = loop
        self.predict = predict
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.incoming = incoming
        self.on_batch = on_batch
        self.queue: deque[Pending] = deque()
        self.queued_rows = 0
        self._scheduled: asyncio.Handle | asyncio.TimerHandle | None = None

    def submit(self, item: Pending) -> None:
        item.queued = time.perf_counter()
        self.queue.append(item)
        self.queued_rows += item.rows.n
        if self._scheduled is None:
            self._scheduled = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        queue = self.queue
        if not queue:
            return
        if self.max_delay_s > 0 and self.queued_rows < self.max_rows and self.incoming() > 0:
            wait = queue[0].queued + self.max_delay_s - time.perf_counter()
            if wait > 0:
                self._scheduled = self.loop.call_later(min(wait, 0.0005), self._flush)
                return
        items = [queue.popleft()]
        rows = items[0].rows.n
        while queue and rows + queue[0].rows.n <= self.max_rows:
            item = queue.popleft()
            items.append(item)
            rows += item.rows.n
        self.queued_rows -= rows
        if queue:
            self._scheduled = self.loop.call_soon(self._flush)
        self._run(items)

    def _run(self, items: list[Pending]) -> None:
        if len(items) == 1:
            batch = items[0].rows
        else:
            batch = concat([item.rows for item in items])
            if batch is None:
                for item in items:
                    self._run([item])
                return
        try:
            outputs = self.predict(batch)
            if len(items) > 1 and outputs.kind == "other":
                raise ValueError("the model's outputs cannot be split by rows")
        except Exception as exc:
            if len(items) > 1:
                # Find who made it fail: predict each request alone.
                for item in items:
                    self._run([item])
                return
            items[0].done(None, exc)
            return
        self.on_batch(batch.n)
        if len(items) == 1:
            items[0].done(outputs, None)
            return
        start = 0
        for item in items:
            stop = start + item.rows.n
            item.done(outputs.slice(start, stop), None)
            start = stop
