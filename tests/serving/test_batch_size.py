"""Under the default cap on rows per model call, multi-row requests that wait together share
one model call: the real App, model and HTTP protocol, in process (no sockets)."""

from __future__ import annotations

import asyncio
import json

from serving.app import App
from serving.config import load_settings
from serving.httpserver import HttpConnection
from serving.server import _load_and_warm_up
from tests.serving.conftest import training_data


class Transport:
    """Collects what the server writes."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str, default=None):
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    abort = close


def test_four_100_row_requests_read_together_are_one_model_call_under_the_default(models):
    settings = load_settings(
        ["--model-dir", str(models["sklearn"]), "--name", "churn", "--version", "1"], {}
    )
    loop = asyncio.new_event_loop()
    try:
        app = App(settings, loop)
        app.set_model(*_load_and_warm_up(settings))
        X, _ = training_data()
        parts = [X.iloc[100 * i : 100 * (i + 1)] for i in range(4)]
        conns = []
        for part in parts:
            body = json.dumps(
                {"dataframe_split": {"columns": list(X.columns), "data": part.values.tolist()}}
            ).encode()
            conn = HttpConnection(app)
            conn.connection_made(Transport())
            conns.append((conn, body))
        before = (app.metrics.batch_size.sum, app.metrics.batch_size.count)
        for conn, body in conns:  # one loop iteration reads all four
            conn.data_received(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        loop.run_until_complete(asyncio.sleep(0.05))
        calls = (app.metrics.batch_size.sum - before[0], app.metrics.batch_size.count - before[1])
        assert calls == (400, 1)  # with the old default of 64 rows: (400, 4)
        for (conn, _), part in zip(conns, parts, strict=True):
            head, _, answer = conn.transport.data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            predictions = json.loads(answer)["predictions"]
            assert predictions == models["estimator"].predict(part).tolist()
    finally:
        loop.close()
