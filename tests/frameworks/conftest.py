"""The framework matrix: each framework's model trained and saved in a venv that has the
framework (built once per session with uv, from the shared venv's interpreter), then served by
the control plane, which does not have it.

The venvs find packages as the environment builder does (`deployments.environments.
index_options`: the host's pip configuration, so torch comes from the wheelhouse on disk).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TRAINERS = Path(__file__).resolve().parent / "trainers.py"

# What each framework's training venv installs besides MLflow, numpy, pandas and scipy
# (MLflow infers an ndarray's signature with scipy). torch only
# ever pinned: an unpinned torch resolves to a multi-GB CUDA build.
FRAMEWORKS: dict[str, list[str]] = {
    "xgboost": ["xgboost", "scikit-learn"],
    "lightgbm": ["lightgbm", "scikit-learn", "skops"],
    "pytorch": ["torch==2.13.0"],
    "statsmodels": ["statsmodels"],
    "tensorflow": ["tensorflow-cpu"],
}
# Trained in the control plane's own venv: it has what they need (environment "auto" reuses it).
SHARED = ("sklearn", "onnx", "pyfunc")


def _uv() -> list[str]:
    return [sys.executable, "-m", "uv"]


def build_venv(framework: str, root: Path) -> Path:
    """root/<framework>/bin/python with the framework, MLflow (skinny), numpy and pandas."""
    from deployments.environments import index_options

    venv = root / framework
    python = venv / "bin" / "python"
    if python.exists() and (venv / ".complete").exists():
        return python
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    common = ["--no-config", "--color", "never", "--no-progress", "--quiet"]
    subprocess.run(
        [*_uv(), "venv", str(venv), "--clear", "--python", sys.executable, "--no-project", *common],
        check=True,
        capture_output=True,
        env=env,
    )
    mlflow = importlib.metadata.version("mlflow-skinny")
    requirements = [f"mlflow-skinny=={mlflow}", "numpy", "pandas", "scipy", *FRAMEWORKS[framework]]
    done = subprocess.run(
        [
            *_uv(),
            "pip",
            "install",
            "--python",
            str(python),
            *index_options().uv_args(),
            *common,
            *requirements,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot build the {framework} venv:\n{done.stderr[-3000:]}")
    (venv / ".complete").write_text("")
    return python


class Trained:
    """One framework's saved model and what the framework itself predicts on the test rows."""

    def __init__(self, framework: str, out: Path, seconds: float) -> None:
        self.framework = framework
        self.model_dir = out / "model"
        doc = json.loads((out / "expected.json").read_text())
        self.columns: list[str] | None = doc["columns"]
        self.dtype: str = doc["dtype"]
        self.rows: list[list[float]] = doc["rows"]
        self.expected: dict[str, dict] = doc["expected"]
        self.seconds = seconds


def cache_root() -> Path:
    """Trained models and training venvs kept between sessions (under the system temp dir,
    or CONTROLPLANE_TEST_CACHE): a model trained once is the same model next time. The
    environments the control plane builds to serve them are built anew in every session."""
    default = Path(tempfile.gettempdir()) / "controlplane-test-cache"
    return Path(os.environ.get("CONTROLPLANE_TEST_CACHE") or default) / "frameworks"


def _key(framework: str) -> str:
    """What a trained model depends on: the trainer, the framework's requirements, MLflow, the
    Python version."""
    digest = hashlib.sha256(TRAINERS.read_bytes())
    digest.update(json.dumps([framework, FRAMEWORKS.get(framework), sys.version]).encode())
    digest.update(importlib.metadata.version("mlflow-skinny").encode())
    return f"{framework}-{digest.hexdigest()[:16]}"


def train(framework: str, root: Path) -> Trained:
    # one trainer per framework at a time, across sessions sharing the cache
    with open(root / f".{framework}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train(framework, root)


def _train(framework: str, root: Path) -> Trained:
    started = time.monotonic()
    out = root / _key(framework)
    if (out / "expected.json").is_file():
        return Trained(framework, out, time.monotonic() - started)
    python = sys.executable if framework in SHARED else str(build_venv(framework, root / "venvs"))
    # Trained beside its place and renamed: an interrupted run leaves nothing that looks done.
    shutil.rmtree(out.with_suffix(".tmp"), ignore_errors=True)
    building = out.with_suffix(".tmp")
    building.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [python, str(TRAINERS), framework, str(building)],
        capture_output=True,
        text=True,
        env=env,
        cwd=building,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"training {framework} failed:\n{done.stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    building.rename(out)
    return Trained(framework, out, time.monotonic() - started)


def _needed(items) -> list[str]:
    """The frameworks the selected tests use: their `framework` parameter, else XGBoost."""
    needed = set()
    for item in items:
        if "trained" not in getattr(item, "fixturenames", ()):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        needed.add(params.get("framework", "xgboost"))
    return [name for name in [*SHARED, *FRAMEWORKS] if name in needed]


@pytest.fixture(scope="session")
def trained(request) -> dict[str, Trained | BaseException]:
    """Every framework's model the selected tests use, trained in parallel once per session
    (failures kept per framework, so one that cannot install fails only its own tests)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    names = _needed(request.session.items)
    results: dict[str, Trained | BaseException] = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(train, name, root) for name in names}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as exc:  # reported by that framework's test
                results[name] = exc
    return results
