"""gRPC calls reach the loop one at a time (grpc.aio), so the batcher is told how many are on
their way: the recent peak of concurrent ModelInfer calls minus those in progress."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np

from serving import grpc_server
from serving.batching import Batcher, Pending
from serving.inputs import Rows


def test_calls_on_their_way_are_the_recent_peak_minus_those_in_progress(monkeypatch):
    app = SimpleNamespace(grpc_expected=lambda: 0)
    service = grpc_server.InferenceService(app)
    assert app.grpc_expected == service.expected
    assert service.expected() == 0  # nothing seen: nothing waits (concurrency 1 adds no delay)
    service.infer_in_flight, service._peak, service._peak_at = 3, 16, time.perf_counter()
    assert service.expected() == 13  # 13 callers just answered are sending their next call
    # the load went down: after the window the old peak is forgotten
    service._peak_at -= grpc_server._PEAK_WINDOW_S * 2
    assert service.expected() == 0 and service._peak == 3


def test_the_batcher_waits_for_expected_calls_and_takes_them_in_one_predict():
    loop = asyncio.new_event_loop()
    try:
        calls: list[int] = []
        expected = [4]  # on their way, the first included

        def predict(rows: Rows):
            calls.append(rows.n)
            return SimpleNamespace(kind="array", slice=lambda a, b: (a, b))

        batcher = Batcher(loop, predict, max_rows=64, max_delay_s=0.05,
                          incoming=lambda: expected[0], on_batch=lambda n: None)  # fmt: skip
        answered = []

        def submit():
            batcher.submit(
                Pending(Rows(1, matrix=np.zeros((1, 2))), lambda o, e: answered.append(o))
            )
            expected[0] -= 1

        for i in range(4):  # one now, three arriving one loop turn after another
            loop.call_later(0.002 * i, submit)
        loop.run_until_complete(asyncio.sleep(0.1))
        assert calls == [4] and len(answered) == 4
    finally:
        loop.close()


def test_a_call_answered_is_off_the_count_before_its_answer_and_not_expected_this_turn():
    scheduled = []
    app = SimpleNamespace(grpc_expected=None, loop=SimpleNamespace(call_soon=scheduled.append))
    service = grpc_server.InferenceService(app)
    service.infer_in_flight, service._peak, service._peak_at = 16, 16, time.perf_counter()
    for _ in range(16):
        service._infer_ended()  # each just before its answer is written
    # the callers' next calls may arrive before this turn ends: they are not counted with the
    # answered ones (no inflated peak), and a batch scheduled already does not wait for them
    assert service.infer_in_flight == 0 and service.expected() == 0 and len(scheduled) == 1
    scheduled[0]()  # the turn ended: the 16 callers are now on their way
    assert service.expected() == 16
