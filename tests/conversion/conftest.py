"""Models to convert, registered once per session, and the helpers the conversion tests share.

scikit-learn models are trained here (the control plane's venv has scikit-learn; the test
trains them, so loading its own objects is fine); XGBoost, LightGBM and PyTorch models come
from tests/frameworks' trainers (their own venvs, cached between sessions)."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import with_roles, zip_dir

FEATURES = [f"f{i}" for i in range(6)]


@pytest.fixture(scope="session", autouse=True)
def conversion_environments():
    """Conversion environments (model requirements + converters, byte-compiled) kept between
    sessions under the test cache: built and compiled once, not in every session."""
    from registry.conversion import runner
    from tests.frameworks.conftest import cache_root

    root = cache_root().parent / "conversion-environments"
    root.mkdir(parents=True, exist_ok=True)
    previous, runner.ENVIRONMENT_ROOT = runner.ENVIRONMENT_ROOT, root
    yield root
    runner.ENVIRONMENT_ROOT = previous


def data(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    y = (X["f0"] - 0.7 * X["f1"] + 0.4 * X["f2"] * X["f3"] > 0).astype(np.int64).to_numpy()
    return X, y


def save_sklearn(model, path: Path, X: pd.DataFrame) -> Path:
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.head(3),
        serialization_format="pickle",
        pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"mlflow=={mlflow.__version__}"],
    )
    return path


@pytest.fixture(scope="session")
def sklearn_models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """name -> (MLflow model dir, the fitted estimator)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = tmp_path_factory.mktemp("convert-models")
    X, y = data(400, 0)
    models = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y),
        "forest": RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0).fit(X, y),
        "hgb": HistGradientBoostingClassifier(max_iter=10).fit(X, y),
    }
    return {name: (save_sklearn(m, root / name, X), m) for name, m in models.items()}


@pytest.fixture
def converter_user(django_user_model):
    user = django_user_model.objects.create_user(username=f"conv-{uuid.uuid4().hex[:6]}")
    return with_roles(user, "model-developer", "deployer")


@pytest.fixture
def register():
    """register(model_dir, user) -> the ModelVersion of a new registered model."""
    from registry import services

    def make(model_dir: Path, user, name: str | None = None):
        name = name or f"conv-{uuid.uuid4().hex[:10]}"
        archive = io.BytesIO(zip_dir(Path(model_dir)))
        return services.model_version_register(
            model_name=name, archive=archive, actor=user, create_model=True
        )

    return make


@pytest.fixture(scope="session")
def framework_model():
    """framework_model("pytorch") -> tests/frameworks' trained model (its own venv, cached)."""
    from tests.frameworks.conftest import cache_root, train

    def get(framework: str):
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        return train(framework, root)

    return get


@pytest.fixture(scope="session")
def keras_flavor_model() -> tuple[Path, list, list]:
    """(model dir, rows, what Keras predicts on them): a Keras 3 model saved with MLflow 3's
    keras flavor, trained in tests/frameworks' TensorFlow venv; kept between sessions."""
    import fcntl
    import hashlib
    import importlib.metadata
    import json
    import os
    import shutil
    import subprocess

    from tests.frameworks.conftest import build_venv, cache_root

    script = Path(__file__).with_name("keras_trainer.py")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(script.read_bytes())
    digest.update(importlib.metadata.version("mlflow-skinny").encode())
    out = root / f"keras-flavor-{digest.hexdigest()[:16]}"
    with open(root / ".tensorflow.lock", "w") as lock:  # the trainer of the same venv
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "expected.json").is_file():
            python = build_venv("tensorflow", root / "venvs")
            building = out.with_suffix(".tmp")
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
            env.pop("VIRTUAL_ENV", None)
            done = subprocess.run(
                [str(python), str(script), str(building)],
                capture_output=True,
                text=True,
                env=env,
                cwd=building,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr[-4000:]
            shutil.rmtree(out, ignore_errors=True)
            building.rename(out)
    doc = json.loads((out / "expected.json").read_text())
    return out / "model", doc["rows"], doc["expected"]
