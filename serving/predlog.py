"""The prediction log: one record per prediction request, for monitoring (see PREDICTION_LOG.md).

Records go into a buffer bounded in records and in bytes; when either bound is reached the
oldest records go and are counted as dropped. Adding a record never blocks for long (a lock
held for a deque append, or a slice copy by a reader) and costs a tuple: the JSON shape is
built only when a consumer reads it (GET /predictions, or the JSONL file sink thread).
"""

from __future__ import annotations

import itertools
import logging
import os
import resource
import sys
import threading
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from serving.fastjson import dumps as json_dumps
from serving.inputs import Rows
from serving.model import Outputs

logger = logging.getLogger("serving.predlog")

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# What a record costs besides its arrays: the tuple, the request id, floats, the deque slot.
RECORD_OVERHEAD = 400
# The share of the instance's memory limit the log may take by default.
MEMORY_SHARE = 8
_CGROUP_MAX = Path("/sys/fs/cgroup/memory.max")


def memory_limit_bytes(env: Mapping[str, str] = os.environ) -> int | None:
    """The instance's memory limit, if known: SERVING_MEMORY_LIMIT_MB, else the smaller of the
    cgroup's memory.max (a container's limit) and RLIMIT_DATA (how the local runtime enforces
    memory_mb)."""
    raw = env.get("SERVING_MEMORY_LIMIT_MB")
    if raw:
        try:
            return int(float(raw) * 1024 * 1024)
        except ValueError:
            logger.warning("SERVING_MEMORY_LIMIT_MB is not a number: %r", raw)
    known = []
    try:
        text = _CGROUP_MAX.read_text().strip()
        if text.isdigit():
            known.append(int(text))
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft != resource.RLIM_INFINITY and soft > 0:
        known.append(soft)
    return min(known) if known else None


def default_max_bytes(env: Mapping[str, str] = os.environ) -> int:
    limit = memory_limit_bytes(env)
    return limit // MEMORY_SHARE if limit else DEFAULT_MAX_BYTES


def _nbytes(value: Any) -> int:
    """Roughly what value holds in memory (arrays exactly, Python objects approximately)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return value.nbytes + sum(map(sys.getsizeof, value.ravel().tolist()))
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sys.getsizeof(value) + sum(map(_nbytes, value))
    if value is None:
        return 0
    return sys.getsizeof(value)


def _own(arr: np.ndarray) -> np.ndarray:
    """arr, copied when it is a view of a much larger array (a slice of a batch's outputs),
    so the log does not keep the whole batch alive."""
    base = arr.base
    if isinstance(base, np.ndarray) and base.nbytes > 2 * arr.nbytes:
        return arr.copy()
    return arr


class PredictionLog:
    """Bounded in-memory buffer of prediction records, addressed by sequence number."""

    def __init__(
        self, capacity: int, model: str, version: str, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.model = model
        self.version = version
        self.boot_id = str(uuid.uuid4())
        # (seq, request_id, ts, endpoint, latency_ms, n_rows, kind, outputs, inputs, size)
        self._records: deque[tuple] = deque()
        self._lock = threading.Lock()
        self.bytes = 0
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
        """inputs: a `Rows` (rendered as columns), a dict of column lists, or None (not
        sampled: the caller decides before building or copying anything)."""
        # Only atoms, tuples and numpy arrays (which the garbage collector does not track): a
        # full buffer of tracked objects would make every full collection pause for ~100 ms.
        out = outputs.value
        if isinstance(out, np.ndarray):
            out = _own(out)
        elif isinstance(out, dict):
            out = tuple((k, _own(v) if isinstance(v, np.ndarray) else v) for k, v in out.items())
        elif isinstance(out, list):
            out = tuple(out)
        if inputs is not None:
            if isinstance(inputs, Rows):
                inputs = (
                    _own(inputs.matrix)
                    if inputs.matrix is not None
                    else tuple((k, _own(v)) for k, v in inputs.columns.items())
                )
            elif isinstance(inputs, dict):
                inputs = tuple((k, tuple(v)) for k, v in inputs.items())
        size = RECORD_OVERHEAD + len(request_id) + _nbytes(out) + _nbytes(inputs)
        with self._lock:
            seq = self.last_seq + 1
            self._records.append(
                (seq, request_id, ts, endpoint, latency_ms, outputs.n, outputs.kind, out, inputs, size)
            )  # fmt: skip
            self.last_seq = seq
            self.bytes += size
            records = self._records
            while records and (len(records) > self.capacity or self.bytes > self.max_bytes):
                self.bytes -= records.popleft()[-1]
                self.dropped += 1

    def __len__(self) -> int:
        return len(self._records)

    def _render(self, entry: tuple) -> dict[str, Any]:
        seq, request_id, ts, endpoint, latency_ms, n_rows, kind, out, inputs, _ = entry
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
        with self._lock:
            if not self._records:
                return []
            first = self._records[0][0]
            start = max(after + 1, first) - first
            entries = list(itertools.islice(self._records, start, start + limit))
        return [self._render(entry) for entry in entries]

    def dumps(self, record: dict[str, Any]) -> str:
        return json_dumps(record).decode()


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
