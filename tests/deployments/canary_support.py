"""Candidate models for canary tests and bench/canary.py: custom pyfuncs (MLflow models from
code, so nothing is pickled) that answer like the baseline, fail on ~30 % of inputs, sleep,
or flip their labels. Input: one float column ``x`` in [0, 1); output: label ``x > 0.8``
(about 20 % ones, so flipped labels change the label distribution)."""

from __future__ import annotations

import io
import random
import threading
import time
import zipfile
from pathlib import Path

MODEL_CODE = """
import time

import mlflow.models
import mlflow.pyfunc

MODE = {mode!r}
SLEEP_S = {sleep_s!r}


class Model(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        xs = [float(v) for v in model_input["x"]]
        if MODE == "slow":
            time.sleep(SLEEP_S)
        if MODE == "fail" and any(int(v * 1000) % 10 in (3, 4, 5) for v in xs):
            raise ValueError("this candidate cannot handle that input")
        labels = [1 if v > 0.8 else 0 for v in xs]
        if MODE == "flip":
            labels = [1 - v for v in labels]
        return labels


mlflow.models.set_model(Model())
"""

MODES = ("good", "fail", "slow", "flip")


def model_zip(workdir: Path, mode: str, *, sleep_s: float = 0.03) -> bytes:
    """An upload archive of the ``mode`` model (MLmodel at the root)."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import infer_signature

    assert mode in MODES
    path = workdir / f"canary-{mode}"
    source = workdir / f"canary_{mode}_model.py"
    source.write_text(MODEL_CODE.format(mode=mode, sleep_s=sleep_s))
    if not path.exists():
        mlflow.pyfunc.save_model(
            str(path),
            python_model=str(source),
            signature=infer_signature(pd.DataFrame({"x": [0.5]}), [0]),
            pip_requirements=[f"mlflow=={mlflow.__version__}"],
        )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(path.rglob("*")):
            if file.is_file():
                zf.write(file, str(file.relative_to(path)))
    return buf.getvalue()


def body(x: float) -> bytes:
    return b'{"dataframe_split": {"columns": ["x"], "data": [[%r]]}}' % x


class TimedLoad:
    """Concurrent keep-alive clients sending random inputs; records (time, status, version)
    of every response so failures can be placed before or after a decision."""

    def __init__(self, port: int, *, clients: int = 4, seed: int = 0) -> None:
        self.port = port
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.results: list[tuple[float, int, str]] = []  # (wall time, status or 0, version)
        self.threads = [
            threading.Thread(target=self._run, args=(seed + i,), daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> TimedLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def _run(self, seed: int) -> None:
        import http.client

        rng = random.Random(seed)
        conn = None
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request(
                    "POST",
                    "/invocations",
                    body=body(rng.random()),
                    headers={"Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                resp.read()
                row = (time.time(), resp.status, resp.getheader("X-Model-Version", ""))
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception:
                row = (time.time(), 0, "")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
            with self.lock:
                self.results.append(row)

    def snapshot(self) -> list[tuple[float, int, str]]:
        with self.lock:
            return list(self.results)
