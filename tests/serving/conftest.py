"""Fixtures: real MLflow models on disk and real server processes on 127.0.0.1.

Servers are started as subprocesses (`python -m serving`), all at once at the start of the
session so their model loading overlaps, and are killed in teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "s3cret-token"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


N_FEATURES = 20
FEATURES = [f"f{i}" for i in range(N_FEATURES)]


def training_data(n: int = 400, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES))
    y = (X[:, 0] + 0.5 * X[:, 1] - X[:, 2] + rng.normal(scale=0.5, size=n) > 0).astype(np.int64)
    return pd.DataFrame(X, columns=FEATURES), y


def save_sklearn_model(path: Path):
    """LogisticRegression on 20 features, saved with signature and input example."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    X, y = training_data()
    model = LogisticRegression(max_iter=500).fit(X, y)
    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.iloc[:2],
        pip_requirements=["mlflow", "scikit-learn"],  # skips the slow requirement inference
    )
    return model


def save_sklearn_model_with_code(path: Path, estimator, code_dir: Path) -> None:
    """The same estimator with a code path: MLflow puts it on sys.path before loading, so the
    server leaves loading this model to MLflow."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    X, _ = training_data()
    code_dir.mkdir()
    (code_dir / "churn_features.py").write_text("SCALE = 1.0\n")
    mlflow.sklearn.save_model(
        estimator,
        str(path),
        signature=infer_signature(X, estimator.predict(X)),
        input_example=X.iloc[:2],
        pip_requirements=["mlflow", "scikit-learn"],
        code_paths=[str(code_dir / "churn_features.py")],
    )


def save_onnx_model(path: Path):
    """The same kind of classifier converted with skl2onnx, saved with mlflow.onnx."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    X, y = training_data(seed=1)
    model = LogisticRegression(max_iter=500).fit(X.to_numpy(), y)
    onnx_model = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        target_opset=17,
    )
    onnx.checker.check_model(onnx_model)
    mlflow.onnx.save_model(
        onnx_model,
        str(path),
        signature=infer_signature(X, model.predict(X.to_numpy())),
        input_example=X.iloc[:2],
        pip_requirements=["mlflow", "onnx", "onnxruntime"],
    )
    return onnx_model


def save_mixed_model(path: Path):
    """A pipeline over a string, an integer and a float column (no all-numeric fast path)."""
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(2)
    df = pd.DataFrame(
        {
            "city": rng.choice(["oslo", "lima", "pune"], 300),
            "visits": rng.integers(0, 10, 300),
            "spend": rng.normal(size=300),
        }
    )
    y = (df["spend"] + (df["city"] == "oslo") - 0.1 * df["visits"] > 0).astype(np.int64)
    encode = make_column_transformer((OneHotEncoder(), ["city"]), remainder="passthrough")
    pipeline = make_pipeline(encode, LogisticRegression()).fit(df, y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        signature = infer_signature(df, pipeline.predict(df))
    mlflow.sklearn.save_model(
        pipeline,
        str(path),
        signature=signature,
        input_example=df.iloc[:3],
        pip_requirements=["mlflow", "scikit-learn"],
        serialization_format="cloudpickle",
    )
    return pipeline


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A server (or router) subprocess on a free loopback port, logging to a file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.args = [sys.executable, "-m", *args, "--port", str(self.port)]
        self.env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        self._log = open(self.log_path, "wb")
        # Its own process group: with --workers N the server forks, and teardown
        # must take the workers down with it.
        self.proc = subprocess.Popen(
            self.args,
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, path: str = "/v2/health/ready", timeout: float = 90.0) -> Proc:
        """Poll until path answers 200; note what the server said before it was ready."""
        deadline = time.monotonic() + timeout
        self.before_ready: set[tuple[str, int]] = set()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = requests.get(self.url(path), timeout=1).status_code
                if status == 200:
                    return self
                self.before_ready.add((path, status))
                if ("live", 200) not in self.before_ready and path == "/v2/health/ready":
                    live = requests.get(self.url("/v2/health/live"), timeout=1).status_code
                    self.before_ready.add(("live", live))
                    predict = requests.post(
                        self.url("/invocations"), json={"instances": [[0.0] * 20]}, timeout=1
                    )
                    self.before_ready.add(("predict", predict.status_code))
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and any forked workers
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def server(model_dir: Path, name: str, version: str, log_dir: Path, *extra: str, env=None) -> Proc:
    args = ["serving", "--model-dir", str(model_dir), "--name", name, "--version", version, *extra]
    return Proc(args, log_dir / f"{name}-{version}-{free_port()}.log", env=env)


def router(backends_file: Path, log_dir: Path) -> Proc:
    args = ["serving.router", "--backends-file", str(backends_file)]
    return Proc(args, log_dir / f"router-{free_port()}.log")


def write_backends(path: Path, backends: list[str]) -> None:
    """Atomically, as the control plane does: temp file + rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"backends": backends}))
    os.replace(tmp, path)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sklearn_dir, onnx_dir = root / "sklearn", root / "onnx"
    estimator = save_sklearn_model(sklearn_dir)
    save_sklearn_model_with_code(root / "with-code", estimator, root / "code")
    save_onnx_model(onnx_dir)
    pipeline = save_mixed_model(root / "mixed")
    return {
        "sklearn": sklearn_dir,
        "with_code": root / "with-code",
        "onnx": onnx_dir,
        "mixed": root / "mixed",
        "estimator": estimator,
        "pipeline": pipeline,
    }


@pytest.fixture(scope="session")
def fleet(models, tmp_path_factory):
    """Every long-lived server of the session, started together."""
    logs = tmp_path_factory.mktemp("logs")
    sink_dir = tmp_path_factory.mktemp("prediction-log")
    procs = {
        "sklearn": server(
            models["sklearn"],
            "churn",
            "3",
            logs,
            "--prediction-log-dir",
            str(sink_dir),
            "--max-body-bytes",
            "16000",
            env={"SERVING_ADMIN_TOKEN": ADMIN_TOKEN, "SERVING_LOG_BUFFER": "20"},
        ),
        "onnx": server(models["onnx"], "churn-onnx", "7", logs, "--max-batch-size", "64"),
        "mixed": server(models["mixed"], "mixed", "1", logs),
        "with_code": server(models["with_code"], "churn-code", "1", logs),
        # two worker processes on one port; SIGTERMed by a test
        "victim": server(models["sklearn"], "victim", "1", logs, "--workers", "2"),
        "old": server(models["sklearn"], "churn", "1", logs),
        # settings from the environment, the name overridden on the command line
        "new": Proc(
            ["serving", "--name", "churn"],
            logs / "new.log",
            env={
                "SERVING_MODEL_DIR": str(models["onnx"]),
                "SERVING_MODEL_NAME": "from-env",
                "SERVING_MODEL_VERSION": "2",
            },
        ),
    }
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready()
        procs["sink_dir"] = sink_dir
        procs["logs"] = logs
        yield procs
    finally:
        for proc in procs.values():
            if isinstance(proc, Proc):
                proc.kill()


@pytest.fixture
def start_server(models, tmp_path):
    """Factory for a server of this test only: start_server("sklearn", "--flag", ...)."""
    started: list[Proc] = []

    def start(flavor: str, *extra: str, env=None, wait: bool = True) -> Proc:
        proc = server(models[flavor], "adhoc", "1", tmp_path, *extra, env=env).start()
        started.append(proc)
        return proc.wait_ready() if wait else proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def start_process(tmp_path):
    """Factory: start_process(["serving", "--flag", ...], env={...}) -> ready Proc."""
    started: list[Proc] = []

    def start(args: list[str], env=None) -> Proc:
        proc = Proc(args, tmp_path / f"proc-{len(started)}.log", env=env).start()
        started.append(proc)
        return proc.wait_ready()

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def start_router(tmp_path):
    """Factory: start_router(["127.0.0.1:port", ...]) -> (router Proc, backends file)."""
    started: list[Proc] = []

    def start(backends: list[str]) -> tuple[Proc, Path]:
        backends_file = tmp_path / f"backends-{len(started)}.json"
        write_backends(backends_file, backends)
        proc = router(backends_file, tmp_path).start().wait_ready("/__router/health")
        started.append(proc)
        return proc, backends_file

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def backends_writer():
    return write_backends


@pytest.fixture
def admin_token() -> str:
    return ADMIN_TOKEN
