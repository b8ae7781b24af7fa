"""The framework matrix end to end: each framework's model, saved with MLflow's own flavor API in
a venv that has the framework, registered through the API, deployed on the `local` runtime with
default settings (environment "auto": the frameworks the control plane lacks get an environment
built from the model's requirements), and called on every protocol through the deployment's
endpoint. Every answer must equal what the framework's own predict gave on the same rows:
labels exactly, floating-point values to within a few units in the last place (ULPs). BLAS
does not promise the same bits from one process to the next (its kernels' summation order
depends on memory layout and alignment, which differ between the trainer and the server): on
an AMD EPYC host a logistic regression's decision_function differed in the last bit of one
value in seven between the training process and the server, though both ran the same
numpy, scikit-learn and OpenBLAS on the same rows.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.conftest import zip_dir
from tests.deployments.conftest import _kill_owned_processes, converge  # noqa: F401
from tests.frameworks.conftest import FRAMEWORKS, SHARED, Trained

pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.timeout(1800)]

MAX_ULP = 8  # float64 or float32: a handful of last-place units, far below any real difference

# What each protocol answered, per framework, for the session's summary (and the report).
RESULTS: dict[str, dict[str, str]] = {}


def call(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def column(predictions):
    """/invocations and v1 answer a single-output ONNX method as records of one column."""
    if predictions and all(isinstance(p, dict) and len(p) == 1 for p in predictions):
        (key,) = predictions[0]
        return [p[key] for p in predictions]
    return predictions


def requests_for(t: Trained, model: str, method: str | None) -> dict[str, tuple[str, dict]]:
    """(path, body) per protocol; method None: the deployment's default."""
    if t.columns is not None:
        invocations = {"dataframe_split": {"columns": t.columns, "data": t.rows}}
    else:
        invocations = {"inputs": t.rows}
    matrix = np.asarray(t.rows, dtype=t.dtype)
    tensor = {
        "name": "input",
        "shape": list(matrix.shape),
        "datatype": "FP32" if matrix.dtype == np.float32 else "FP64",
        "data": matrix.ravel().tolist(),
    }
    v2: dict = {"inputs": [tensor]}
    out = {}
    if method is not None:
        invocations["params"] = {"predict_method": method}
        v2["parameters"] = {"predict_method": method}
    else:
        out["v1"] = (f"/v1/models/{model}:predict", {"instances": t.rows})
    out["invocations"] = ("/invocations", invocations)
    out["v2"] = (f"/v2/models/{model}/infer", v2)
    return out


def same(got, value: np.ndarray) -> bool:
    """``got`` (JSON) is ``value``: equal, or floats within MAX_ULP of it, same shape."""
    if got == value.tolist():
        return True
    if value.dtype.kind != "f":
        return False
    try:
        answer = np.asarray(got, dtype=value.dtype)
    except (TypeError, ValueError):
        return False
    if answer.shape != value.shape or not np.array_equal(np.isnan(answer), np.isnan(value)):
        return False
    finite = ~np.isnan(value)
    try:
        np.testing.assert_array_max_ulp(answer[finite], value[finite], maxulp=MAX_ULP)
    except AssertionError:
        return False
    return True


def check(protocol: str, status: int, body: dict, expected: dict) -> str | None:
    """None if the answer is the framework's own, else what differs."""
    if status != 200:
        return f"HTTP {status}: {json.dumps(body)[:300]}"
    value = np.asarray(expected["value"])
    if protocol == "v2":
        outputs = body["outputs"]
        if len(outputs) != 1:
            return f"{len(outputs)} output tensors"
        got = outputs[0]
        if got["shape"] != list(value.shape):
            return f"shape {got['shape']} != {list(value.shape)}"
        if not same(got["data"], value.ravel()):
            return f"data {got['data'][:4]}... != {value.ravel().tolist()[:4]}..."
        return None
    got = column(body["predictions"])
    if not same(got, value):
        return f"{str(got)[:200]} != {str(value.tolist())[:200]}"
    return None


@pytest.mark.parametrize("framework", [*SHARED, *FRAMEWORKS])
def test_a_framework_model_deployed_with_default_settings_answers_like_the_framework(
    framework, trained, api, model_name
):
    t = trained[framework]
    if isinstance(t, BaseException):
        RESULTS[framework] = {"train": f"FAILED: {str(t)[-300:]}"}
        raise t
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    resp = api.upload(f"/api/v1/models/{model_name}/versions", zip_dir(t.model_dir))
    assert resp.status_code == 201, resp.content
    name = f"fw-{framework}"
    resp = api.post(
        "/api/v1/deployments",
        {"name": name, "model": model_name, "version": "1", "runtime": "local"},
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge(name, timeout=900)

    events = [e["message"] for e in api.get(f"/api/v1/deployments/{name}/events").json()]
    environment = " | ".join(m for m in events if m.startswith("environment"))
    if framework in SHARED:
        assert "has all" in environment, events
    else:
        assert "lacks" in environment, events
        top = FRAMEWORKS[framework][0].split("==")[0]
        assert top in environment, events

    results: dict[str, str] = {}
    # ONNX: no method is every output (tested in tests/serving); each method is one output
    methods: list[str | None] = [] if framework == "onnx" else [None]
    methods += list(t.expected)
    for method in methods:
        expected = t.expected[method or "predict"]
        for protocol, (path, body) in requests_for(t, model_name, method).items():
            status, answer = call(d.endpoint + path, body)
            problem = check(protocol, status, answer, expected)
            results[f"{protocol}:{method or 'default'}"] = "ok" if problem is None else problem
    RESULTS[framework] = results
    failed = {k: v for k, v in results.items() if v != "ok"}
    assert not failed, f"{framework}: {json.dumps(failed, indent=1)}"


def test_a_deployment_level_predict_method_is_every_protocols_default(trained, api, model_name):
    t = trained["xgboost"]
    if isinstance(t, BaseException):
        raise t
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    resp = api.upload(f"/api/v1/models/{model_name}/versions", zip_dir(t.model_dir))
    assert resp.status_code == 201, resp.content
    resp = api.post(
        "/api/v1/deployments",
        {
            "name": "fw-proba",
            "model": model_name,
            "version": "1",
            "runtime": "local",
            "predict_method": "predict_proba",
        },
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("fw-proba", timeout=900)
    for protocol, (path, body) in requests_for(t, model_name, None).items():
        status, answer = call(d.endpoint + path, body)
        assert check(protocol, status, answer, t.expected["predict_proba"]) is None, protocol


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    lines = ["", "framework matrix (protocol:method -> result):"]
    for framework, results in RESULTS.items():
        for key, value in results.items():
            lines.append(f"  {framework:12} {key:32} {value}")
    print("\n".join(lines))


def test_a_framework_model_on_the_shared_interpreter_fails_with_the_servers_own_error(
    trained, api, model_name
):
    """The issue's crash-loop, now a failure a user can act on: environment "shared" serves an
    XGBoost model with the control plane's Python, which has no xgboost."""
    from deployments.models import Deployment, Revision

    t = trained["xgboost"]
    if isinstance(t, BaseException):
        raise t
    assert api.post("/api/v1/models", {"name": model_name}).status_code == 201
    resp = api.upload(f"/api/v1/models/{model_name}/versions", zip_dir(t.model_dir))
    assert resp.status_code == 201, resp.content
    resp = api.post(
        "/api/v1/deployments",
        {
            "name": "fw-shared",
            "model": model_name,
            "version": "1",
            "runtime": "local",
            "environment": "shared",
        },
    )
    assert resp.status_code in (201, 202), resp.content
    d = converge("fw-shared", until=lambda d: d.status == Deployment.Status.FAILED, timeout=300)
    failure = Revision.objects.get(pk=d.desired_revision_id).failure
    assert "ModuleNotFoundError: No module named 'xgboost' (during load)" in failure, failure
    logs = api.get("/api/v1/deployments/fw-shared/logs?tail=50").json()["instances"]
    assert any('SERVING-FATAL {"type": "ModuleNotFoundError"' in item["logs"] for item in logs)


def test_answers_match_to_a_few_ulps_and_labels_exactly():
    x = np.array([1.6860242203616422, 3.445779703880862])
    assert same([1.6860242203616422, 3.445779703880863], x)  # one ULP apart
    assert not same([1.6860242203616422, 3.4457797038809], x)  # a real difference
    assert not same([1.6860242203616422], x)  # a value missing
    assert not same([[1.6860242203616422, 3.445779703880862]], x)  # another shape
    assert same([0, 1, 1], np.array([0, 1, 1])) and not same([0, 1, 0], np.array([0, 1, 1]))
    assert not same(["a", "b"], np.array(["a", "c"]))
    assert not same([float("nan"), 1.0], np.array([0.0, 1.0]))
