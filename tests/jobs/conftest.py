"""Fixtures for the jobs tests: a registered scikit-learn version and input tables."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pandas as pd
import pytest

from deployments.runtimes import process
from jobs.server import owner_label


@pytest.fixture(autouse=True)
def _kill_job_servers():
    """Whatever model server a test's job left behind is gone after it."""
    yield
    for proc in process.find_labelled(owner_label()):
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def scoring_model(api, model_name, model_zip) -> str:
    """A model with one version (the session's logistic regression over f0..f19)."""
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    resp = api.upload(f"/api/v1/models/{model_name}/versions", model_zip)
    assert resp.status_code == 201, resp.content
    return model_name


def features(n: int, *, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, 20)), columns=[f"f{i}" for i in range(20)])
    frame.insert(0, "id", [f"row-{i + 1}" for i in range(n)])
    return frame


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


def expected_labels(sklearn_model_dir, frame: pd.DataFrame) -> list[int]:
    """What the model predicts, computed by the test (never by the worker under test)."""
    import mlflow.sklearn

    model = mlflow.sklearn.load_model(str(sklearn_model_dir))
    return [int(v) for v in model.predict(frame[[f"f{i}" for i in range(20)]])]


@pytest.fixture
def artifacts():
    """Where screenshots go (gitignored): test-artifacts/e2e/."""
    from tests.e2e.conftest import ARTIFACTS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
