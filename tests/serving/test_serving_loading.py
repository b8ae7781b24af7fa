"""How the server loads models: without MLflow when it can load them exactly as MLflow would."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import requests

FEATURES = [f"f{i}" for i in range(20)]


def rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, 20)), columns=FEATURES)


def imported_modules(log: str) -> set[str]:
    """Modules named by `python -X importtime` (PYTHONPROFILEIMPORTTIME=1) in a server log."""
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", log, re.MULTILINE))


def test_each_model_reports_the_loader_that_loaded_it(fleet, models):
    expected = {
        "sklearn": "sklearn-skops",  # mlflow.sklearn's default format
        "mixed": "sklearn-cloudpickle",
        "onnx": "onnx",
        "with_code": "pyfunc",  # a code path: MLflow loads it
    }
    for name, loader in expected.items():
        proc = fleet[name]
        assert requests.get(proc.url("/version"), timeout=5).json()["loader"] == loader, name
        metrics = requests.get(proc.url("/metrics"), timeout=5).text
        assert f'serving_model_loader_info{{loader="{loader}"}} 1' in metrics, name
        assert f"loaded by {loader}, " in proc.log(), name

    # loaded through mlflow.pyfunc, the same estimator answers the same
    df = rows(6, seed=11)
    expected_predictions = models["estimator"].predict(df).tolist()
    for name in ("with_code", "sklearn"):
        response = requests.post(
            fleet[name].url("/invocations"),
            json={"dataframe_split": df.to_dict(orient="split")},
            timeout=10,
        )
        assert response.json() == {"predictions": expected_predictions}, name


def test_a_numeric_scikit_learn_model_is_served_without_importing_mlflow_or_pandas(
    start_server, models
):
    proc = start_server("sklearn", env={"PYTHONPROFILEIMPORTTIME": "1"})
    df = rows(5, seed=12)
    expected = models["estimator"].predict(df).tolist()
    url = proc.url
    bodies = [
        {"instances": df.to_numpy().tolist()},
        {"dataframe_split": json.loads(df.to_json(orient="split", index=False))},
        {"dataframe_records": df.to_dict(orient="records")},
        {"inputs": df.to_dict(orient="list")},
    ]
    for body in bodies:
        response = requests.post(url("/invocations"), json=body, timeout=10)
        assert response.json() == {"predictions": expected}, list(body)
    csv = requests.post(
        url("/invocations"),
        data=df.to_csv(index=False),
        headers={"Content-Type": "text/csv"},
        timeout=10,
    )
    assert csv.json() == {"predictions": expected}
    v1 = requests.post(url("/v1/models/adhoc:predict"), json=bodies[0], timeout=10)
    assert v1.json() == {"predictions": expected}
    v2 = {
        "inputs": [
            {"name": c, "shape": [5], "datatype": "FP64", "data": df[c].tolist()} for c in FEATURES
        ]
    }
    response = requests.post(url("/v2/models/adhoc/infer"), json=v2, timeout=10)
    assert response.json()["outputs"][0]["data"] == expected
    bad = requests.post(url("/invocations"), json={"instances": [["x"] * 20]}, timeout=10)
    assert bad.status_code == 400
    assert requests.get(url("/v2/models/adhoc"), timeout=5).json()["outputs"][0]["name"]
    records = requests.get(url("/predictions"), timeout=5).json()["records"]
    assert records[-1]["outputs"] == expected
    assert requests.get(url("/version"), timeout=5).json()["loader"] == "sklearn-skops"

    modules = imported_modules(proc.log())
    assert "sklearn.linear_model" in modules and "skops.io" in modules, "no import profile"
    assert not {m for m in modules if m == "mlflow" or m.startswith("mlflow.")}
    # scikit-learn tries `import pandas` (and is refused while the model loads); importing
    # pandas for real imports its submodules.
    assert not {m for m in modules if m.startswith("pandas.")}


def test_a_model_mlflow_would_refuse_to_deserialize_is_refused(start_server):
    proc = start_server("sklearn", env={"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}, wait=False)
    assert proc.proc.wait(timeout=180) == 3
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" in proc.log()
    assert "ready:" not in proc.log()


def test_sklearns_finiteness_check_is_skipped_only_for_finite_rows(models, monkeypatch):
    """The fast path tells scikit-learn the rows are finite only after checking it itself, and
    restores the setting: a NaN still gets the estimator's own error, answers are the same."""
    import sklearn
    from sklearn.utils import validation

    from serving.inputs import Rows
    from serving.model import LoadedModel

    checks = []
    check = validation._assert_all_finite

    def counted(*args, **kwargs):  # what scikit-learn's check is told: rows known finite?
        checks.append(sklearn.get_config()["assume_finite"])
        return check(*args, **kwargs)

    monkeypatch.setattr(validation, "_assert_all_finite", counted)
    model = LoadedModel(models["sklearn"])
    assert model.loader.startswith("sklearn")
    x = rows(50, seed=3)
    expected = models["estimator"].predict(x).tolist()
    checks.clear()
    got = model.predict(Rows(50, matrix=x.to_numpy(dtype=np.float64)))
    assert checks and all(checks)  # scikit-learn was told not to check the rows again
    assert got.value.tolist() == expected
    assert sklearn.get_config()["assume_finite"] is False
    bad = x.to_numpy(dtype=np.float64, copy=True)
    bad[7, 2] = np.nan
    checks.clear()
    with pytest.raises(ValueError, match="NaN"):
        model.predict(Rows(50, matrix=bad))
    assert checks[-1] is False  # the estimator's own check ran, and refused the NaN
    assert sklearn.get_config()["assume_finite"] is False
