"""Prediction methods (`predict_method`), multi-output ONNX models and the fatal-error record,
through the HTTP interface of real server processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from tests.serving.conftest import FEATURES, N_FEATURES, REPO, server, training_data

FATAL = "SERVING-FATAL "


def rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, N_FEATURES)), columns=FEATURES)


def split(df: pd.DataFrame) -> dict:
    # not df.to_json: it rounds floats to 10 digits
    return {"columns": list(df.columns), "data": df.to_numpy().tolist()}


def v2_inputs(df: pd.DataFrame) -> list[dict]:
    return [
        {
            "name": "input",
            "shape": list(df.shape),
            "datatype": "FP64",
            "data": df.to_numpy().ravel().tolist(),
        }
    ]


def post(proc, path: str, payload) -> requests.Response:
    return requests.post(proc.url(path), json=payload, timeout=20)


# --- models ---------------------------------------------------------------------------------


def save_onnx_classifier(path: Path):
    """skl2onnx with zipmap=False: a `label` output (n,) and a `probabilities` output (n, 3)."""
    import mlflow.onnx
    from mlflow.models import infer_signature
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    X, _ = training_data(seed=3)
    y = np.digitize(X["f0"] + X["f1"], [-0.5, 0.5])  # three classes
    model = LogisticRegression(max_iter=500).fit(X.to_numpy(np.float32), y)
    onnx_model = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        target_opset=17,
        options={id(model): {"zipmap": False}},
    )
    mlflow.onnx.save_model(
        onnx_model,
        str(path),
        signature=infer_signature(X, model.predict(X.to_numpy(np.float32))),
        input_example=X.iloc[:5],
        pip_requirements=["mlflow", "onnx", "onnxruntime"],
    )
    return onnx_model


def _onnx_graph(outputs: dict[str, np.ndarray]):
    """input (n, 20) float -> one MatMul per output with the given weights (20, k) or (20,)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for name, weights in outputs.items():
        inits.append(numpy_helper.from_array(weights.astype(np.float32), f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["input", f"w_{name}"], [name]))
        shape = [None] if weights.ndim == 1 else [None, weights.shape[1]]
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    graph = helper.make_graph(
        nodes,
        "outputs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, N_FEATURES])],
        outs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_onnx_graph(path: Path, outputs: dict[str, np.ndarray]):
    import mlflow.onnx
    from mlflow.models import infer_signature

    X, _ = training_data(seed=4)
    model = _onnx_graph(outputs)
    mlflow.onnx.save_model(
        model,
        str(path),
        signature=infer_signature(X),
        input_example=X.iloc[:5],
        pip_requirements=["mlflow", "onnx", "onnxruntime"],
    )
    return model


def save_svc(path: Path):
    """An SVC without probability=True: predict and decision_function, no predict_proba."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.svm import SVC

    X, y = training_data()
    model = SVC().fit(X, y)
    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.iloc[:2],
        pip_requirements=["mlflow", "scikit-learn"],
    )
    return model


FAILING_MODELS = """
import mlflow.pyfunc


class FailsAtLoad(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import xgboost_not_installed_here  # noqa: F401

    def predict(self, context, model_input):
        return model_input


class FailsAtWarmUp(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        raise RuntimeError("the example row is refused")


class ChoosesByParam(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        method = (params or {}).get("predict_method", "predict")
        return [f"{method}:{v}" for v in model_input["x"]]
"""


def save_custom_models(root: Path) -> dict[str, Path]:
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    code = root / "custom_models.py"
    code.write_text(FAILING_MODELS)
    sys.path.insert(0, str(root))
    try:
        import custom_models
    finally:
        sys.path.remove(str(root))
    df = pd.DataFrame({"x": [1.0, 2.0]})
    paths = {}
    for name, cls in (
        ("fails_at_load", custom_models.FailsAtLoad),
        ("fails_at_warmup", custom_models.FailsAtWarmUp),
    ):
        paths[name] = root / name
        mlflow.pyfunc.save_model(
            str(paths[name]),
            python_model=cls(),
            code_paths=[str(code)],
            signature=infer_signature(df, df["x"]),
            input_example=df,
            pip_requirements=["mlflow"],
        )
    paths["by_param"] = root / "by_param"
    mlflow.pyfunc.save_model(
        str(paths["by_param"]),
        python_model=custom_models.ChoosesByParam(),
        code_paths=[str(code)],
        signature=infer_signature(df, ["predict:1.0"], params={"predict_method": "predict"}),
        input_example=(df, {"predict_method": "predict"}),
        pip_requirements=["mlflow"],
    )
    return paths


@pytest.fixture(scope="module")
def method_models(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("method-models")
    rng = np.random.default_rng(5)
    saved = {
        "sklearn": models["sklearn"],
        "estimator": models["estimator"],
        "svc_model": save_svc(root / "svc"),
        "svc": root / "svc",
        "classifier_model": save_onnx_classifier(root / "onnx-classifier"),
        "onnx_classifier": root / "onnx-classifier",
    }
    saved["several_weights"] = {
        "score": rng.normal(size=N_FEATURES),
        "embedding": rng.normal(size=(N_FEATURES, 4)),
    }
    save_onnx_graph(root / "onnx-several", saved["several_weights"])
    saved["onnx_several"] = root / "onnx-several"
    saved["logits_weights"] = {"logits": rng.normal(size=(N_FEATURES, 3))}
    save_onnx_graph(root / "onnx-logits", saved["logits_weights"])
    saved["onnx_logits"] = root / "onnx-logits"
    saved.update(save_custom_models(root))
    return saved


@pytest.fixture(scope="module")
def servers(method_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("method-logs")
    procs = {
        "sklearn": server(method_models["sklearn"], "churn", "1", logs),
        "proba_default": server(
            method_models["sklearn"],
            "churn",
            "2",
            logs,
            env={"SERVING_PREDICT_METHOD": "predict_proba"},
        ),
        "svc": server(method_models["svc"], "svc", "1", logs),
        "onnx_classifier": server(method_models["onnx_classifier"], "iris", "1", logs),
        "onnx_several": server(method_models["onnx_several"], "several", "1", logs),
        "onnx_logits": server(method_models["onnx_logits"], "logits", "1", logs),
        "by_param": server(method_models["by_param"], "by-param", "1", logs),
    }
    try:
        for proc in procs.values():
            proc.start()
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.kill()


def onnx_run(model, df: pd.DataFrame) -> dict[str, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, {"input": df.to_numpy(np.float32)})
    return dict(zip(names, results, strict=True))


# --- predict_method on each protocol ------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["predict", "predict_proba", "predict_log_proba", "decision_function"]
)
def test_each_method_of_a_sklearn_model_on_invocations_and_v2(servers, method_models, method):
    df = rows(6, seed=11)
    expected = getattr(method_models["estimator"], method)(df)
    proc = servers["sklearn"]

    answer = post(
        proc, "/invocations", {"dataframe_split": split(df), "params": {"predict_method": method}}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == expected.tolist()

    v2 = post(
        proc,
        "/v2/models/churn/infer",
        {"inputs": v2_inputs(df), "parameters": {"predict_method": method}},
    )
    assert v2.status_code == 200, v2.text
    (tensor,) = v2.json()["outputs"]
    assert tensor["shape"] == list(expected.shape)
    assert tensor["data"] == expected.ravel().tolist()


def test_without_a_method_a_request_gets_the_models_own_predict(servers, method_models):
    df = rows(4, seed=12)
    answer = post(servers["sklearn"], "/invocations", {"dataframe_split": split(df)})
    assert answer.json()["predictions"] == method_models["estimator"].predict(df).tolist()


def test_the_server_default_method_applies_to_every_protocol_and_a_request_overrides_it(
    servers, method_models
):
    df = rows(5, seed=13)
    estimator = method_models["estimator"]
    proba = estimator.predict_proba(df).tolist()
    proc = servers["proba_default"]
    assert post(proc, "/invocations", {"dataframe_split": split(df)}).json()["predictions"] == proba
    v1 = post(proc, "/v1/models/churn:predict", {"instances": df.to_numpy().tolist()})
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"] == proba
    v2 = post(proc, "/v2/models/churn/infer", {"inputs": v2_inputs(df)}).json()
    assert v2["outputs"][0]["shape"] == [5, 2]
    assert v2["outputs"][0]["data"] == np.asarray(proba).ravel().tolist()
    overridden = post(
        proc,
        "/invocations",
        {"dataframe_split": split(df), "params": {"predict_method": "predict"}},
    )
    assert overridden.json()["predictions"] == estimator.predict(df).tolist()


def test_metadata_lists_the_methods_of_the_model(servers):
    meta = requests.get(servers["svc"].url("/v2/models/svc"), timeout=5).json()
    assert meta["parameters"]["predict_methods"] == ["predict", "decision_function"]
    meta = requests.get(servers["proba_default"].url("/v2/models/churn"), timeout=5).json()
    assert meta["parameters"] == {
        "predict_methods": ["predict", "predict_proba", "predict_log_proba", "decision_function"],
        "default_predict_method": "predict_proba",
    }


def test_unknown_or_unsupported_methods_are_400_listing_the_supported_ones(servers, method_models):
    df = rows(3, seed=14)
    proc = servers["svc"]
    for method in ("predict_proba", "fit", "__class__"):
        answer = post(
            proc,
            "/invocations",
            {"dataframe_split": split(df), "params": {"predict_method": method}},
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "unsupported_predict_method"
        assert "supported: predict, decision_function" in error["message"]
        v2 = post(
            proc,
            "/v2/models/svc/infer",
            {"inputs": v2_inputs(df), "parameters": {"predict_method": method}},
        )
        assert v2.status_code == 400
        # OIP v2 errors are {"error": "<message>"}, our code in a header
        assert v2.headers["X-Error-Code"] == "unsupported_predict_method"
        assert "supported: predict, decision_function" in v2.json()["error"]
    for bad in ({"predict_method": 3}, ["predict"]):
        answer = post(proc, "/invocations", {"dataframe_split": split(df), "params": bad})
        assert answer.status_code == 400, answer.text
    # the server still answers, and the SVC's own method is there
    answer = post(
        proc,
        "/invocations",
        {"dataframe_split": split(df), "params": {"predict_method": "decision_function"}},
    )
    assert answer.json()["predictions"] == method_models["svc_model"].decision_function(df).tolist()


def test_concurrent_requests_of_different_methods_are_not_batched_together(servers, method_models):
    estimator = method_models["estimator"]
    methods = ["predict", "predict_proba", "decision_function"]
    results: dict[int, tuple[str, pd.DataFrame, requests.Response]] = {}

    def call(i: int) -> None:
        df = rows(1 + i % 3, seed=100 + i)
        method = methods[i % 3]
        body = {"dataframe_split": split(df), "params": {"predict_method": method}}
        results[i] = (method, df, post(servers["sklearn"], "/invocations", body))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 48
    for method, df, answer in results.values():
        assert answer.status_code == 200, answer.text
        got, expected = answer.json()["predictions"], getattr(estimator, method)(df)
        # the shape says which method answered; a batch of several requests may differ from
        # one request's answer in the last bit (BLAS blocks by batch size)
        assert np.shape(got) == expected.shape
        assert np.allclose(got, expected, rtol=1e-12, atol=0)


def test_a_pyfunc_model_with_a_predict_method_param_gets_it_from_either_field(servers):
    proc = servers["by_param"]
    body = {"dataframe_split": {"columns": ["x"], "data": [[1.0], [2.5]]}}
    assert post(proc, "/invocations", body).json()["predictions"] == ["predict:1.0", "predict:2.5"]
    chosen = post(proc, "/invocations", {**body, "params": {"predict_method": "predict_proba"}})
    assert chosen.json()["predictions"] == ["predict_proba:1.0", "predict_proba:2.5"]


# --- multi-output ONNX models -------------------------------------------------------------


def test_an_onnx_classifier_with_labels_and_2d_probabilities(servers, method_models):
    df = rows(5, seed=15)
    expected = onnx_run(method_models["classifier_model"], df)
    labels, proba = expected["label"], expected["probabilities"]
    assert proba.shape == (5, 3)
    proc = servers["onnx_classifier"]

    answer = post(proc, "/invocations", {"dataframe_split": split(df)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [
        {"label": int(label), "probabilities": p.tolist()}
        for label, p in zip(labels, proba, strict=True)
    ]
    v2 = post(proc, "/v2/models/iris/infer", {"inputs": v2_inputs(df)}).json()
    by_name = {o["name"]: o for o in v2["outputs"]}
    assert by_name["label"] == {
        "name": "label",
        "datatype": "INT64",
        "shape": [5],
        "data": labels.tolist(),
    }
    assert by_name["probabilities"]["datatype"] == "FP32"
    assert by_name["probabilities"]["shape"] == [5, 3]
    assert by_name["probabilities"]["data"] == proba.ravel().tolist()

    label_only = post(
        proc,
        "/invocations",
        {"dataframe_split": split(df), "params": {"predict_method": "predict"}},
    ).json()
    assert label_only["predictions"] == [{"label": int(label)} for label in labels]
    proba_only = post(
        proc,
        "/v2/models/iris/infer",
        {"inputs": v2_inputs(df), "parameters": {"predict_method": "predict_proba"}},
    ).json()
    assert [o["name"] for o in proba_only["outputs"]] == ["probabilities"]
    assert proba_only["outputs"][0]["data"] == proba.ravel().tolist()
    v1 = post(proc, "/v1/models/iris:predict", {"instances": df.to_numpy().tolist()})
    assert v1.status_code == 200, v1.text
    assert v1.json()["predictions"] == answer.json()["predictions"]


def test_an_onnx_model_with_several_outputs_returns_each(servers, method_models):
    df = rows(4, seed=16)
    weights = method_models["several_weights"]
    proc = servers["onnx_several"]
    expected = onnx_run(_onnx_graph(weights), df)
    answer = post(proc, "/invocations", {"dataframe_split": split(df)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [
        {"score": float(s), "embedding": e.tolist()}
        for s, e in zip(expected["score"], expected["embedding"], strict=True)
    ]
    v2 = post(proc, "/v2/models/several/infer", {"inputs": v2_inputs(df)}).json()
    assert [(o["name"], o["shape"], o["datatype"]) for o in v2["outputs"]] == [
        ("score", [4], "FP32"),
        ("embedding", [4, 4], "FP32"),
    ]
    assert v2["outputs"][1]["data"] == expected["embedding"].ravel().tolist()
    only = post(
        proc,
        "/v2/models/several/infer",
        {"inputs": v2_inputs(df), "outputs": [{"name": "embedding"}]},
    )
    assert [o["name"] for o in only.json()["outputs"]] == ["embedding"]


def test_an_onnx_model_with_one_2d_logits_output(servers, method_models):
    df = rows(3, seed=17)
    expected = onnx_run(_onnx_graph(method_models["logits_weights"]), df)["logits"]
    proc = servers["onnx_logits"]
    answer = post(proc, "/invocations", {"dataframe_split": split(df)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == [{"logits": row.tolist()} for row in expected]
    v2 = post(proc, "/v2/models/logits/infer", {"inputs": v2_inputs(df)}).json()
    assert v2["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [3, 3], "data": expected.ravel().tolist()}
    ]
    # concurrent single rows are batched and split back per request
    results = {}

    def call(i: int) -> None:
        results[i] = post(proc, "/invocations", {"dataframe_split": split(df.iloc[[i % 3]])}).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, answer in results.items():
        assert answer["predictions"] == [{"logits": expected[i % 3].tolist()}]


# --- the fatal-error record ---------------------------------------------------------------


def run_to_exit(args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    import os

    done = subprocess.run(
        [sys.executable, "-m", "serving", *args],
        cwd=REPO,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stderr.strip().splitlines()
    assert lines, done
    last = lines[-1]
    assert last.startswith(FATAL), f"last line is not the fatal record:\n{done.stderr[-3000:]}"
    return done.returncode, json.loads(last[len(FATAL) :])


def model_args(path: Path, *extra: str) -> list[str]:
    return ["--model-dir", str(path), "--name", "m", "--version", "1", "--port", "0", *extra]


def test_a_model_that_raises_at_load_exits_with_its_error_as_the_last_record(method_models):
    code, record = run_to_exit(model_args(method_models["fails_at_load"]))
    assert code == 3
    assert record == {
        "type": "ModuleNotFoundError",
        "message": "No module named 'xgboost_not_installed_here'",
        "phase": "load",
    }


def test_a_worker_that_fails_at_load_gives_the_supervisor_its_record(method_models):
    code, record = run_to_exit(model_args(method_models["fails_at_load"], "--workers", "2"))
    assert code == 3
    assert record["type"] == "ModuleNotFoundError"
    assert record["phase"] == "load"


def test_a_failing_warm_up_is_recorded_as_such(method_models):
    code, record = run_to_exit(model_args(method_models["fails_at_warmup"]))
    assert code == 3
    assert record["phase"] == "warmup"
    assert record["type"] == "RuntimeError"
    assert "the example row is refused" in record["message"]


def test_bad_arguments_and_a_default_method_the_model_lacks_are_args_records(method_models):
    code, record = run_to_exit(["--name", "m", "--version", "1"], env={"SERVING_MODEL_DIR": ""})
    assert code == 2
    assert record["phase"] == "args" and record["type"] == "SettingsError"
    assert "--model-dir" in record["message"]
    code, record = run_to_exit(model_args(method_models["sklearn"], "--predict-method", "no such"))
    assert code == 2 and record["phase"] == "args"
    code, record = run_to_exit(
        model_args(method_models["svc"]), env={"SERVING_PREDICT_METHOD": "predict_proba"}
    )
    assert code == 3
    assert record["phase"] == "args"
    assert "supported: predict, decision_function" in record["message"]
