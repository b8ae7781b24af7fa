"""The default cap on rows per model call lets multi-row requests share one model call."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np

from serving.batching import Batcher, Pending
from serving.config import load_settings
from serving.inputs import Rows


def test_four_waiting_100_row_requests_are_one_model_call_under_the_default(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    settings = load_settings(["--model-dir", str(tmp_path), "--name", "m", "--version", "1"], {})
    loop = asyncio.new_event_loop()
    try:
        calls: list[int] = []

        def predict(rows: Rows):
            calls.append(rows.n)
            return SimpleNamespace(kind="array", slice=lambda a, b: rows.matrix[a:b, 0])

        batcher = Batcher(loop, predict, max_rows=settings.max_batch_size, max_delay_s=0.002,
                          incoming=lambda: 0, on_batch=lambda n: None)  # fmt: skip
        answers: dict[int, np.ndarray] = {}
        for i in range(4):  # four requests read in one loop iteration
            matrix = np.full((100, 3), float(i))
            batcher.submit(Pending(Rows(100, matrix=matrix),
                                   lambda o, e, i=i: answers.__setitem__(i, o)))  # fmt: skip
        loop.run_until_complete(asyncio.sleep(0.01))
        assert calls == [400]
        # each caller gets its own 100 rows back
        assert {i: (a.shape, set(a.tolist())) for i, a in answers.items()} == {
            i: ((100,), {float(i)}) for i in range(4)
        }
    finally:
        loop.close()
