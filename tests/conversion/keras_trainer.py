"""Save a small Keras 3 model with MLflow 3's keras flavor (``mlflow.keras``), in the
TensorFlow training venv of tests/frameworks: ``python keras_trainer.py OUT_DIR``. Writes
OUT_DIR/model and OUT_DIR/expected.json (the rows and what Keras predicts on them there)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np


def main(out_dir: str) -> None:
    import keras
    import mlflow.keras
    from mlflow.models import infer_signature

    out = Path(out_dir)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(2)]
    )
    X = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    # mlflow.keras writes the input example before it makes the model's directory
    (out / "model").mkdir(parents=True)
    mlflow.keras.save_model(
        model,
        str(out / "model"),
        signature=infer_signature(X, model.predict(X, verbose=0)),
        input_example=X[:3],
        # exact pins of what is installed here: MLflow's inference (a subprocess) is skipped
        pip_requirements=[f"mlflow=={version('mlflow-skinny')}"]
        + [f"{name}=={version(name)}" for name in ("tensorflow-cpu", "keras", "numpy")],
    )
    rows = np.random.default_rng(1).normal(size=(7, 4)).astype(np.float32)
    expected = model.predict(rows, verbose=0)
    (out / "expected.json").write_text(
        json.dumps({"rows": rows.tolist(), "expected": expected.tolist()})
    )


if __name__ == "__main__":
    main(sys.argv[1])
