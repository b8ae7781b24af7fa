"""Train and save one framework's model with MLflow's own flavor API, in that framework's venv.

Run as a script by the framework's own interpreter (the control plane's venv does not have the
framework): `python trainers.py FRAMEWORK OUT_DIR`. Writes OUT_DIR/model (signature and input
example included) and OUT_DIR/expected.json: the test rows and, per prediction method, what the
framework's own predict answers on them there. Only numpy, pandas, MLflow and the framework.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

FEATURES = [f"x{i}" for i in range(5)]


def data(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    y = (X["x0"] + 0.5 * X["x1"] - X["x2"] + rng.normal(scale=0.3, size=n) > 0).astype(np.int64)
    return X, y.to_numpy()


def pins(*names: str) -> list[str]:
    """Exact requirements of what is installed here: MLflow's requirement inference (a
    subprocess loading the model, a minute for TensorFlow) is skipped."""
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow-skinny')}"] + [f"{n}=={version(n)}" for n in names]


def signature(inputs, outputs):
    from mlflow.models import infer_signature

    return infer_signature(inputs, outputs)


def xgboost(out: Path):
    import mlflow.xgboost
    import xgboost as xgb

    X, y = data(300, 0)
    model = xgb.XGBClassifier(n_estimators=20, max_depth=3, n_jobs=1).fit(X, y)
    mlflow.xgboost.save_model(
        model,
        str(out),
        signature=signature(X, model.predict(X)),
        input_example=X.head(3),
        pip_requirements=pins("xgboost", "scikit-learn", "numpy", "pandas", "scipy"),
    )
    test, _ = data(7, 1)
    return test, {"predict": model.predict(test), "predict_proba": model.predict_proba(test)}


def lightgbm(out: Path):
    import lightgbm as lgb
    import mlflow.lightgbm

    X, y = data(300, 0)
    model = lgb.LGBMClassifier(n_estimators=20, num_leaves=7, verbose=-1, n_jobs=1).fit(X, y)
    mlflow.lightgbm.save_model(
        model,
        str(out),
        signature=signature(X, model.predict(X)),
        input_example=X.head(3),
        pip_requirements=pins("lightgbm", "scikit-learn", "skops", "numpy", "pandas", "scipy"),
    )
    test, _ = data(7, 1)
    return test, {"predict": model.predict(test), "predict_proba": model.predict_proba(test)}


def pytorch(out: Path):
    import mlflow.pytorch
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    net.eval()
    X = data(300, 0)[0].to_numpy(np.float32)
    with torch.no_grad():
        outputs = net(torch.from_numpy(X)).numpy()
    mlflow.pytorch.save_model(
        net,
        str(out),
        signature=signature(X, outputs),
        input_example=X[:3],
        pip_requirements=pins("torch", "cloudpickle", "numpy"),
    )
    test = data(7, 1)[0].to_numpy(np.float32)
    # The model as saved: MLflow 3 saves it with torch.export ("pt2"), and the reloaded graph
    # answers some float32s 1 ulp away from the eager module's. Torch's own answer for the saved
    # model is the reloaded one's, in a fresh process as a server would (in this process, after
    # the eager run, the reloaded graph gives the eager values).
    code = (
        "import json, sys, numpy as np, torch, mlflow.pytorch\n"
        "model = mlflow.pytorch.load_model(sys.argv[1])\n"
        "x = torch.from_numpy(np.asarray(json.loads(sys.argv[2]), dtype=np.float32))\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(model(x).numpy().tolist()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out), json.dumps(test.tolist())],
        capture_output=True,
        text=True,
        check=True,
    )
    expected = np.asarray(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32)
    return test, {"predict": expected}


def tensorflow(out: Path):
    import keras
    import mlflow.tensorflow

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    X = data(300, 0)[0].to_numpy(np.float32)
    mlflow.tensorflow.save_model(
        model,
        str(out),
        signature=signature(X, model.predict(X, verbose=0)),
        input_example=X[:3],
        pip_requirements=pins("tensorflow-cpu", "keras", "numpy"),
    )
    test = data(7, 1)[0].to_numpy(np.float32)
    return test, {"predict": model.predict(test, verbose=0)}


def statsmodels(out: Path):
    import mlflow.statsmodels
    import statsmodels.api as sm

    X, _ = data(300, 0)
    rng = np.random.default_rng(2)
    y = X @ np.array([1.0, 2.0, -1.0, 0.5, 0.0]) + rng.normal(scale=0.1, size=len(X))
    results = sm.OLS(y, X).fit()
    mlflow.statsmodels.save_model(
        results,
        str(out),
        signature=signature(X, results.predict(X)),
        input_example=X.head(3),
        pip_requirements=pins("statsmodels", "numpy", "pandas", "scipy"),
    )
    test, _ = data(7, 1)
    return test, {"predict": results.predict(test)}


def pyfunc(out: Path):
    import mlflow.pyfunc

    class Scorer(mlflow.pyfunc.PythonModel):
        """A user's own model: defined in __main__, so saved by value."""

        def predict(self, context, model_input, params=None):
            return (2.0 * model_input["x0"] + model_input["x1"] ** 2 - model_input["x4"]).to_numpy()

    X, _ = data(20, 0)
    model = Scorer()
    mlflow.pyfunc.save_model(
        str(out),
        python_model=model,
        signature=signature(X, model.predict(None, X)),
        input_example=X.head(3),
        pip_requirements=pins("cloudpickle", "numpy", "pandas"),
    )
    test, _ = data(7, 1)
    return test, {"predict": model.predict(None, test)}


def sklearn(out: Path):
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = data(300, 0)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    mlflow.sklearn.save_model(
        model,
        str(out),
        signature=signature(X, model.predict(X)),
        input_example=X.head(3),
        pip_requirements=pins("scikit-learn", "skops", "numpy", "pandas", "scipy"),
    )
    test, _ = data(7, 1)
    methods = ("predict", "predict_proba", "predict_log_proba", "decision_function")
    return test, {m: getattr(model, m)(test) for m in methods}


def onnx(out: Path):
    import mlflow.onnx
    import onnxruntime
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    X, y = data(300, 0)
    model = LogisticRegression().fit(X.to_numpy(np.float32), y)
    converted = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, len(FEATURES)]))],
        target_opset=17,
        options={id(model): {"zipmap": False}},
    )
    mlflow.onnx.save_model(
        converted,
        str(out),
        signature=signature(X, model.predict(X.to_numpy(np.float32))),
        input_example=X.head(3),
        pip_requirements=pins("onnx", "onnxruntime", "numpy"),
    )
    test, _ = data(7, 1)
    session = onnxruntime.InferenceSession(converted.SerializeToString())
    label, proba = session.run(["label", "probabilities"], {"input": test.to_numpy(np.float32)})
    return test, {"predict": label, "predict_proba": proba}


def main(framework: str, out_dir: str) -> None:
    out = Path(out_dir)
    test, expected = globals()[framework](out / "model")
    columns = list(test.columns) if isinstance(test, pd.DataFrame) else None
    matrix = np.asarray(test)
    (out / "expected.json").write_text(
        json.dumps(
            {
                "columns": columns,
                "dtype": str(matrix.dtype),
                "rows": matrix.tolist(),
                "expected": {
                    method: {"value": np.asarray(v).tolist(), "dtype": str(np.asarray(v).dtype)}
                    for method, v in expected.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
