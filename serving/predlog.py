"""The prediction log: one record per prediction request, for monitoring (see PREDICTION_LOG.md).

Records go into a fixed-size ring buffer; when it is full the oldest record is overwritten and
counted as dropped. Adding a record never blocks and costs a tuple: the JSON shape is built
only when a consumer reads it (GET /predictions, or the JSONL file sink thread).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from serving.inputs import Rows
from serving.model import Outputs, _json_default

logger = logging.getLogger("serving.predlog")

FORMAT_VERSION = 1


class PredictionLog:
    """Bounded in-memory buffer of prediction records, addressed by sequence number."""

    def __init__(self, capacity: int, model: str, version: str) -> None:
        self.capacity = capacity
        self.model = model
        self.version = version
        self.boot_id = str(uuid.uuid4())
        self._buf: list[tuple | None] = [None] * capacity
        self.last_seq = 0  # seq of the newest record; records are numbered from 1
        self.dropped = 0
        self.input_names: list[str] = []

    def add(
        self,
        request_id: str,
        ts: float,
        endpoint: str,
        latency_ms: float,
        outputs: Outputs,
        inputs: Any,
    ) -> None:
        """inputs: a `Rows` (rendered as columns), a dict of column lists, or None."""
        seq = self.last_seq + 1
        if seq > self.capacity:
            self.dropped += 1
        # Only atoms, tuples and numpy arrays (which the garbage collector does not track): a
        # full buffer of tracked objects would make every full collection pause for ~100 ms.
        out = outputs.value
        if isinstance(out, dict):
            out = tuple(out.items())
        elif isinstance(out, list):
            out = tuple(out)
        if inputs is not None:
            if isinstance(inputs, Rows):
                inputs = (
                    inputs.matrix if inputs.matrix is not None else tuple(inputs.columns.items())
                )
            elif isinstance(inputs, dict):
                inputs = tuple((k, tuple(v)) for k, v in inputs.items())
        self._buf[seq % self.capacity] = (
            seq, request_id, ts, endpoint, latency_ms, outputs.n, outputs.kind, out, inputs,
        )  # fmt: skip
        self.last_seq = seq

    def __len__(self) -> int:
        return min(self.last_seq, self.capacity)

    def _render(self, entry: tuple) -> dict[str, Any]:
        seq, request_id, ts, endpoint, latency_ms, n_rows, kind, out, inputs = entry
        if kind in ("frame", "dict"):
            out = dict(out)
        elif isinstance(out, tuple):
            out = list(out)
        outputs = Outputs(kind, out, n_rows)
        if isinstance(inputs, np.ndarray):
            inputs = dict(zip(self.input_names, inputs.T.tolist(), strict=False))
        elif inputs is not None:
            inputs = {k: v.tolist() if isinstance(v, np.ndarray) else list(v) for k, v in inputs}
        return {
            "v": FORMAT_VERSION,
            "seq": seq,
            "request_id": request_id,
            "ts": ts,
            "model": self.model,
            "version": self.version,
            "endpoint": endpoint,
            "latency_ms": latency_ms,
            "n_rows": n_rows,
            "outputs": outputs.rows(),
            "inputs": inputs,
        }

    def read(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Records with seq > after, oldest first, at most `limit` of them."""
        last = self.last_seq
        first = max(1, last - self.capacity + 1)
        start = max(after + 1, first)
        records = []
        for seq in range(start, min(last, start + limit - 1) + 1):
            entry = self._buf[seq % self.capacity]
            if entry is None or entry[0] != seq:
                continue  # overwritten meanwhile by a newer record
            records.append(self._render(entry))
        return records

    def dumps(self, record: dict[str, Any]) -> str:
        return json.dumps(record, default=_json_default, separators=(",", ":"))


class FileSink:
    """Background thread appending new records to `<dir>/predictions-<boot_id>.jsonl`."""

    def __init__(self, log: PredictionLog, directory: Path, interval_s: float = 0.5) -> None:
        self.log = log
        self.path = directory / f"predictions-{log.boot_id}.jsonl"
        self.interval_s = interval_s
        self.cursor = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log-sink", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            while not self._stop.wait(self.interval_s):
                self._write(fh)
            self._write(fh)

    def _write(self, fh: Any) -> None:
        try:
            while True:
                records = self.log.read(self.cursor, 1000)
                if not records:
                    return
                fh.write("".join(self.log.dumps(r) + "\n" for r in records))
                fh.flush()
                self.cursor = records[-1]["seq"]
        except Exception:
            logger.exception("writing the prediction log to %s failed", self.path)

    def stop(self) -> None:
        """Write what is left and stop (called on shutdown)."""
        self._stop.set()
        self._thread.join(timeout=10)
