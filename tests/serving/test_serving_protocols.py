"""Real clients, unchanged, against the model server: tritonclient (HTTP and gRPC), TF Serving's
documented REST JSON (with `requests`), MLflow's scoring client; and the content types, error
shapes and JSON codec they rely on.

tritonclient runs in its own virtualenv (tests/serving/clients/requirements.txt), built once
per requirements file under ~/.cache: its pins (protobuf<7, ml-dtypes<=0.5.4, greenlet<3.4)
cannot live in the project's environment.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import FEATURES, Proc, training_data

from serving import fastjson
from serving import grpc_predict_v2_pb2 as pb

CLIENTS = Path(__file__).parent / "clients"
# Servers these tests start themselves listen in this range (HTTP and gRPC).
PORTS = (37000, 37999)


def port_in_range() -> int:
    for _ in range(200):
        port = random.randint(*PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


def start(
    model_dir: Path,
    name: str,
    version: str,
    log_dir: Path,
    *extra: str,
    grpc_on: bool = True,
    launch: bool = True,
) -> Proc:
    args = ["serving", "--model-dir", str(model_dir), "--name", name, "--version", version]
    proc = Proc([*args, *extra], log_dir / f"{name}.log")
    proc.port = port_in_range()
    proc.args[-1] = str(proc.port)
    proc.grpc_port = None
    if grpc_on:
        proc.grpc_port = port_in_range()
        proc.args += ["--grpc-port", str(proc.grpc_port)]
    return proc.start() if launch else proc


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clients_python() -> Path:
    """The Python of a virtualenv holding the real clients (built once, then reused)."""
    requirements = CLIENTS / "requirements.txt"
    key = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = root / "controlplane" / f"serving-clients-{key}"
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (pytest-xdist workers, parallel runs)
    with open(venv.parent / f".serving-clients-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
                check=True,
                timeout=600,
            )
            (venv / ".complete").touch()
    return python


@pytest.fixture(scope="module")
def labels_model(tmp_path_factory):
    """A classifier answering string labels (BYTES outputs)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    X, y = training_data(seed=5)
    labels = np.where(y == 1, "churn", "stay")
    model = LogisticRegression(max_iter=500).fit(X, labels)
    path = tmp_path_factory.mktemp("labels") / "model"
    mlflow.sklearn.save_model(
        model,
        str(path),
        signature=infer_signature(X, model.predict(X)),
        input_example=X.iloc[:2],
        pip_requirements=["mlflow", "scikit-learn"],
    )
    return path, model


@pytest.fixture(scope="module")
def servers(models, labels_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("protocol-logs")
    procs = {
        "sklearn": start(models["sklearn"], "churn", "3", logs),
        "mixed": start(models["mixed"], "mixed", "1", logs),
        "labels": start(labels_model[0], "labels", "1", logs),
        "unbatched": start(models["sklearn"], "unbatched", "1", logs, "--max-batch-size", "1"),
    }
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.kill()


def features(n: int, seed: int, datatype: str = "FP64") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if datatype == "INT64":
        return rng.integers(-3, 4, size=(n, len(FEATURES))).astype(np.int64)
    # quarters: exact in float32 too, so FP32 requests predict the very same values
    return (np.round(rng.normal(size=(n, len(FEATURES))) * 4) / 4).astype(
        np.float32 if datatype == "FP32" else np.float64
    )


def mixed_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "city": rng.choice(["oslo", "lima", "pune"], n),
            "visits": rng.integers(0, 10, n),
            "spend": np.round(rng.normal(size=n), 3),
        }
    )


# --- tritonclient -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(servers, models, labels_model, clients_python):
    """Every tritonclient call against each server, once; returns (reports, expected)."""
    cases, expected = {}, {}
    for protocol in ("http", "grpc"):
        for datatype in ("FP32", "FP64", "INT64"):
            for n in (1, 5):  # shapes [1, 20] and [k, 20]
                for binary in (True, False) if protocol == "http" else (True,):
                    x = features(n, seed=n * 7 + len(datatype), datatype=datatype)
                    case_id = f"{protocol}-{datatype}-{n}-{'binary' if binary else 'json'}"
                    cases.setdefault("sklearn", []).append(
                        {
                            "id": case_id,
                            "protocol": protocol,
                            "inputs": [
                                {
                                    "name": "input-0",
                                    "datatype": datatype,
                                    "shape": [n, 20],
                                    "data": x.tolist(),
                                    "binary": binary,
                                }
                            ],  # fmt: skip
                            "outputs": [{"name": "predict", "binary": binary}],
                        }
                    )
                    frame = pd.DataFrame(x.astype(np.float64), columns=FEATURES)
                    expected[case_id] = models["estimator"].predict(frame).tolist()
        for n in (1, 4):
            df = mixed_frame(n, seed=n)
            for binary in (True, False) if protocol == "http" else (True,):
                case_id = f"{protocol}-mixed-{n}-{'binary' if binary else 'json'}"
                cases.setdefault("mixed", []).append(
                    {
                        "id": case_id,
                        "protocol": protocol,
                        "inputs": [
                            {
                                "name": "city",
                                "datatype": "BYTES",
                                "shape": [n],
                                "data": df["city"].tolist(),
                                "binary": binary,
                            },
                            {
                                "name": "visits",
                                "datatype": "INT64",
                                "shape": [n],
                                "data": df["visits"].tolist(),
                                "binary": binary,
                            },
                            {
                                "name": "spend",
                                "datatype": "FP64",
                                "shape": [n],
                                "data": df["spend"].tolist(),
                                "binary": binary,
                            },
                        ],  # fmt: skip
                        "outputs": None,  # tritonclient then asks for every output in binary
                    }
                )
                expected[case_id] = models["pipeline"].predict(df).tolist()
        for binary in (True, False) if protocol == "http" else (True,):
            x = features(3, seed=11)
            case_id = f"{protocol}-labels-{'binary' if binary else 'json'}"
            cases.setdefault("labels", []).append(
                {
                    "id": case_id,
                    "protocol": protocol,
                    "inputs": [
                        {
                            "name": "input-0",
                            "datatype": "FP64",
                            "shape": [3, 20],
                            "data": x.tolist(),
                            "binary": binary,
                        }
                    ],  # fmt: skip
                    "outputs": [{"name": "predict", "binary": binary}],
                }
            )
            frame = pd.DataFrame(x, columns=FEATURES)
            expected[case_id] = labels_model[1].predict(frame).tolist()
        bad = {"name": "input-0", "datatype": "FP64", "shape": [2, 19], "data": [[0.0] * 19] * 2}
        cases["sklearn"] += [
            {"id": f"{protocol}-unknown-model", "protocol": protocol, "model": "no-such-model",
             "inputs": [{**bad, "shape": [2, 20], "data": [[0.0] * 20] * 2}], "outputs": None},
            {"id": f"{protocol}-bad-shape", "protocol": protocol, "inputs": [bad], "outputs": None},
        ]  # fmt: skip
    reports = {}
    versions = {"sklearn": "3", "mixed": "1", "labels": "1"}
    for key, model_cases in cases.items():
        proc = servers[key]
        spec = {
            "http": f"127.0.0.1:{proc.port}",
            "grpc": f"127.0.0.1:{proc.grpc_port}",
            "model": {"sklearn": "churn"}.get(key, key),
            "version": versions[key],
            "cases": model_cases,
        }
        done = subprocess.run(
            [str(clients_python), str(CLIENTS / "triton_calls.py")],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        reports[key] = json.loads(done.stdout)
    return reports, expected


def test_tritonclient_health_and_metadata_calls_succeed_over_http_and_grpc(triton):
    reports, _ = triton
    for key, model in (("sklearn", "churn"), ("mixed", "mixed")):
        for protocol in ("http", "grpc"):
            report = reports[key][protocol]
            for call in ("live", "ready", "model_ready", "model_ready_version"):
                assert report[call] == {"ok": True}, (key, protocol, call, report[call])
            assert report["server_metadata"]["ok"]["extensions"] == ["binary_tensor_data"]
            meta = report["model_metadata"]["ok"]
            assert meta["name"] == model
            assert meta["platform"] == "mlflow_sklearn"
            assert meta["outputs"][0]["datatype"] == "INT64"
    names = [t["name"] for t in reports["sklearn"]["http"]["model_metadata"]["ok"]["inputs"]]
    assert names == FEATURES
    mixed = reports["mixed"]["grpc"]["model_metadata"]["ok"]["inputs"]
    assert [(t["name"], t["datatype"]) for t in mixed] == [
        ("city", "BYTES"),
        ("visits", "INT64"),
        ("spend", "FP64"),
    ]


def test_tritonclient_gets_our_message_for_an_unknown_model(triton):
    reports, _ = triton
    http, grpc_report = reports["sklearn"]["http"], reports["sklearn"]["grpc"]
    # tritonclient's HTTP is_model_ready answers False on a 404; gRPC raises NOT_FOUND
    assert http["model_ready_unknown"] == {"ok": False}
    assert grpc_report["model_ready_unknown"]["error"]["type"] == "InferenceServerException"
    assert "StatusCode.NOT_FOUND" in grpc_report["model_ready_unknown"]["error"]["status"]
    for protocol in ("http", "grpc"):
        error = reports["sklearn"][protocol]["model_metadata_unknown"]["error"]
        assert error["type"] == "InferenceServerException", error
        assert error["message"] == "model 'no-such-model' is not served here"
        error = reports["sklearn"]["cases"][f"{protocol}-unknown-model"]["error"]
        assert error["type"] == "InferenceServerException", error
        assert error["message"] == "model 'no-such-model' is not served here"
        assert error["status"] in ("404", "StatusCode.NOT_FOUND")
        error = reports["sklearn"]["cases"][f"{protocol}-bad-shape"]["error"]
        assert error["type"] == "InferenceServerException", error
        assert "must have shape [n, 20], got [2, 19]" in error["message"]
        assert error["status"] in ("400", "StatusCode.INVALID_ARGUMENT")


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT64"])
def test_tritonclient_infers_numeric_tensors_binary_and_json(triton, datatype):
    reports, expected = triton
    cases = reports["sklearn"]["cases"]
    checked = 0
    for case_id, outcome in cases.items():
        if f"-{datatype}-" not in case_id:
            continue
        assert "ok" in outcome, (case_id, outcome)
        out = outcome["ok"]["predict"]
        assert out["dtype"] == "int64"
        assert out["shape"] == [len(expected[case_id])]
        assert out["data"] == expected[case_id], case_id
        checked += 1
    assert checked == 6  # http binary + json, grpc; [1, 20] and [5, 20]


def test_tritonclient_sends_string_columns_and_reads_string_outputs(triton):
    reports, expected = triton
    for case_id, outcome in reports["mixed"]["cases"].items():
        assert "ok" in outcome, (case_id, outcome)
        assert outcome["ok"]["predict"]["data"] == expected[case_id], case_id
    assert len(reports["mixed"]["cases"]) == 6
    for case_id, outcome in reports["labels"]["cases"].items():
        assert "ok" in outcome, (case_id, outcome)
        out = outcome["ok"]["predict"]
        assert out["dtype"] == "object"  # BYTES
        assert out["data"] == expected[case_id]
        assert set(out["data"]) <= {"churn", "stay"}
    assert len(reports["labels"]["cases"]) == 3


# --- HTTP: content types, OIP v2 errors, binary tensors by hand -------------------------------


def test_prediction_routes_read_json_without_a_content_type_or_with_curls_form_type(servers):
    proc = servers["sklearn"]
    x = features(2, seed=1)
    bodies = {
        "/invocations": {"instances": x.tolist()},
        "/v1/models/churn:predict": {"instances": x.tolist()},
        "/v2/models/churn/infer": {
            "inputs": [{"name": "x", "shape": [2, 20], "datatype": "FP64", "data": x.tolist()}]
        },
    }
    for path, body in bodies.items():
        raw = json.dumps(body).encode()
        for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}):
            # requests sends no Content-Type for bytes data unless told
            response = requests.post(proc.url(path), data=raw, headers=headers, timeout=5)
            assert response.status_code == 200, (path, headers, response.text)
        not_json = requests.post(proc.url(path), data=b"f0=1&f1=2", timeout=5)
        assert not_json.status_code == 415, path
        typed = requests.post(
            proc.url(path), data=raw, headers={"Content-Type": "text/plain"}, timeout=5
        )
        assert typed.status_code == 415, path


def test_v2_errors_follow_the_open_inference_protocol_and_others_keep_theirs(servers):
    proc = servers["sklearn"]
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}]}
    response = requests.post(proc.url("/v2/models/churn/infer"), json=bad, timeout=5)
    assert response.status_code == 400
    assert response.json() == {
        "error": "input 'x': a single tensor must have shape [n, 20], got [1, 3]"
    }
    assert response.headers["x-error-code"] == "bad_shape"
    x = features(1, seed=0).tolist()
    unknown_output = {
        "inputs": [{"name": "x", "shape": [1, 20], "datatype": "FP64", "data": x}],
        "outputs": [{"name": "probabilities"}],
    }
    response = requests.post(proc.url("/v2/models/churn/infer"), json=unknown_output, timeout=5)
    assert response.status_code == 400
    assert response.json() == {
        "error": "unknown output(s) 'probabilities'; the model answers 'predict'"
    }
    missing = requests.get(proc.url("/v2/models/nope"), timeout=5)
    assert missing.status_code == 404
    assert missing.json() == {"error": "model 'nope' is not served here"}
    assert missing.headers["x-error-code"] == "model_not_found"
    for path in ("/invocations", "/v1/models/churn:predict"):
        response = requests.post(proc.url(path), json={"instances": [[1, 2]]}, timeout=5)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "bad_shape"
        assert "x-error-code" not in response.headers


def test_v2_binary_tensor_data_by_hand_matches_json(servers, models):
    proc = servers["sklearn"]
    x = features(4, seed=9)
    header = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [4, 20], "datatype": "FP64",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "predict", "parameters": {"binary_data": True}}],
        }
    ).encode()  # fmt: skip
    response = requests.post(
        proc.url("/v2/models/churn/infer"),
        data=header + x.astype("<f8").tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    (out,) = head["outputs"]
    assert out["datatype"] == "INT64" and out["shape"] == [4]
    assert out["parameters"]["binary_data_size"] == 32
    values = np.frombuffer(response.content[length:], dtype="<i8")
    assert (
        values.tolist() == models["estimator"].predict(pd.DataFrame(x, columns=FEATURES)).tolist()
    )
    # a size that runs past the body is a 400 in the OIP shape, not a crash
    short = requests.post(
        proc.url("/v2/models/churn/infer"),
        data=header + b"\0" * 8,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=5,
    )
    assert short.status_code == 400
    assert "runs past the body" in short.json()["error"]


# --- TF Serving REST --------------------------------------------------------------------------


def test_tf_serving_rest_requests_as_documented(servers, models):
    proc = servers["sklearn"]
    x = features(3, seed=2)
    frame = pd.DataFrame(x, columns=FEATURES)
    expected = models["estimator"].predict(frame).tolist()
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
    for path in ("/v1/models/churn:predict", "/v1/models/churn/versions/3:predict"):
        rows = requests.post(
            proc.url(path), data=json.dumps({"instances": x.tolist()}), headers=form, timeout=5
        )
        assert rows.json() == {"predictions": expected}, path
        columnar = requests.post(
            proc.url(path),
            data=json.dumps({"signature_name": "serving_default", "inputs": frame.to_dict("list")}),
            headers=form,
            timeout=5,
        )
        assert columnar.json() == {"outputs": expected}, path
    wrong = requests.post(
        proc.url("/v1/models/churn/versions/9:predict"), json={"instances": x.tolist()}, timeout=5
    )
    assert wrong.status_code == 404
    meta = requests.get(proc.url("/v1/models/churn/metadata"), timeout=5)
    assert meta.status_code == 200, meta.text
    body = meta.json()
    assert body["model_spec"] == {"name": "churn", "signature_name": "", "version": "3"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert list(signature["inputs"]) == FEATURES
    assert signature["inputs"]["f0"]["dtype"] == "DT_DOUBLE"
    assert signature["method_name"] == "tensorflow/serving/predict"
    status = requests.get(proc.url("/v1/models/churn/versions/3"), timeout=5).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"


def test_tf_serving_classify_and_regress_take_examples_with_a_context(servers, models):
    proc = servers["sklearn"]
    x = features(3, seed=6)
    frame = pd.DataFrame(x, columns=FEATURES)
    expected = models["estimator"].predict(frame).tolist()
    context = {name: float(x[0, j]) for j, name in enumerate(FEATURES) if name != "f19"}
    # f0..f18 shared by every example (all equal to row 0's), f19 per example, as a 1-list
    shared = np.repeat(x[:1], 3, axis=0)
    shared[:, 19] = x[:, 19]
    shared_expected = models["estimator"].predict(pd.DataFrame(shared, columns=FEATURES)).tolist()
    body = {"context": context, "examples": [{"f19": [float(v)]} for v in x[:, 19]]}
    classify = requests.post(proc.url("/v1/models/churn:classify"), json=body, timeout=5)
    assert classify.status_code == 200, classify.text
    assert classify.json() == {"result": [[[str(v), 1.0]] for v in shared_expected]}
    examples = {"examples": frame.to_dict("records")}
    regress = requests.post(proc.url("/v1/models/churn:regress"), json=examples, timeout=5)
    assert regress.json() == {"result": [float(v) for v in expected]}
    bad = requests.post(proc.url("/v1/models/churn:regress"), json={"instances": []}, timeout=5)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "bad_payload"


# --- MLflow's scoring client ------------------------------------------------------------------


def test_mlflows_scoring_server_client_works_unchanged(servers, models):
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    proc = servers["sklearn"]
    client = ScoringServerClient("127.0.0.1", proc.port)
    client.wait_server_ready(timeout=10)
    frame = pd.DataFrame(features(5, seed=8), columns=FEATURES)
    response = client.invoke(frame)
    assert (
        response.get_predictions().iloc[:, 0].tolist()
        == models["estimator"].predict(frame).tolist()
    )


# --- gRPC with typed contents, metrics and the prediction log ---------------------------------


def test_grpc_typed_contents_are_answered_in_contents_and_logged_like_http(servers, models):
    proc = servers["sklearn"]
    x = features(2, seed=12)
    request = pb.ModelInferRequest(model_name="churn", id="grpc-typed-1")
    tensor = request.inputs.add(name="x", datatype="FP64", shape=[2, 20])
    tensor.contents.fp64_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        response = infer(request, timeout=5)
        with pytest.raises(grpc.RpcError) as raised:
            bad = pb.ModelInferRequest(model_name="churn")
            bad.inputs.add(name="x", datatype="FP64", shape=[1, 20]).contents.fp32_contents.extend(
                [0.0] * 20
            )
            infer(bad, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(raised.value.trailing_metadata())["x-error-code"] == "bad_shape"
    assert response.id == "grpc-typed-1"
    assert not response.raw_output_contents
    (out,) = response.outputs
    expected = models["estimator"].predict(pd.DataFrame(x, columns=FEATURES)).tolist()
    assert list(out.contents.int64_contents) == expected
    log = requests.get(proc.url("/predictions"), params={"limit": 10000}, timeout=5).json()
    (record,) = [r for r in log["records"] if r["request_id"] == "grpc-typed-1"]
    assert record["endpoint"] == "/inference.GRPCInferenceService/ModelInfer"
    assert record["outputs"] == expected
    assert record["inputs"]["f0"] == x[:, 0].tolist()
    metrics = requests.get(proc.url("/metrics"), timeout=5).text
    assert (
        'serving_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer",status="400"}'
        in metrics
    )


# --- batching off -----------------------------------------------------------------------------


def test_max_batch_size_one_serves_every_request_alone(servers, models):
    proc = servers["unbatched"]
    sizes = [1, 100, 1, 3] * 10
    payloads = [features(n, seed=i) for i, n in enumerate(sizes)]

    def post(x):
        return requests.post(proc.url("/invocations"), json={"instances": x.tolist()}, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, payloads))
    for x, response in zip(payloads, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = models["estimator"].predict(pd.DataFrame(x, columns=FEATURES)).tolist()
        assert response.json() == {"predictions": expected}
    metrics = requests.get(proc.url("/metrics"), timeout=5).text
    values = dict(
        line.split(" ", 1)
        for line in metrics.splitlines()
        if line.startswith("serving_batch_size_")
    )
    # one model call per request, none merged (8 concurrent clients would be batched otherwise)
    assert int(values["serving_batch_size_count"]) == len(sizes)
    assert float(values["serving_batch_size_sum"]) == sum(sizes)


# --- the JSON codec ---------------------------------------------------------------------------

EDGE_BODIES = [
    b'{"a": NaN, "b": Infinity, "c": -Infinity}',
    b"18446744073709551616",
    b"-9223372036854775809",
    b"[9223372036854775807, -9223372036854775808, 18446744073709551615]",
    b'{"id": "12345678901234567890123", "x": 0.000000000000000000001}',
    b"1e400",
    b"-0",
    b"-0.0",
    b'"\\ud800"',
    b'{"a": 1, "a": 2}',
    b"\xef\xbb\xbf{}",
    b" [1, 2.5, true, null] ",
    b"123456789012345678901234567890.5",
    b'{"instances": [[0.1, 0.00012345678901234567, 1e-7, 3]]}',
    '"héllo ☃"'.encode(),
]


@pytest.mark.parametrize("body", EDGE_BODIES)
def test_fast_json_decodes_exactly_as_the_standard_library(body):
    expected = json.loads(body)
    got = fastjson.loads(body)
    assert repr(got) == repr(expected)
    assert [type(v) for v in _leaves(got)] == [type(v) for v in _leaves(expected)]


def test_fast_json_refuses_what_the_standard_library_refuses():
    for body in (b"{", b"[1,]", b"nul", b"\xff"):
        with pytest.raises(ValueError):
            json.loads(body)
        with pytest.raises(ValueError):
            fastjson.loads(body)


EDGE_VALUES = [
    {"predictions": [float("nan"), float("inf"), -float("inf"), 1.5]},
    {"big": 2**70, "neg": -(2**70)},
    {1: "int key"},
    {"f32": np.float32(0.1), "f64": np.float64(0.1), "i": np.int64(7), "b": np.bool_(True)},
    {"arr": np.array([[1.5, 2.0], [3.0, np.nan]]), "ints": np.arange(3)},
    {"s": "null in a string", "none": None},
    {"tiny": 1e-7, "huge": 1e16, "neg0": -0.0},
    ["\ud800"],
]


@pytest.mark.parametrize("value", EDGE_VALUES, ids=range(len(EDGE_VALUES)))
def test_fast_json_encodes_what_the_standard_library_encodes(value):
    expected = fastjson.stdlib_dumps(value)
    got = fastjson.dumps(value)
    # the same document: equal once decoded (orjson writes 1e-7 where json writes 1e-07)
    assert repr(json.loads(got)) == repr(json.loads(expected))
    if b"NaN" in expected or b"Infinity" in expected:
        assert got == expected


def test_fast_json_is_faster_on_a_100_row_body():
    import timeit

    body = json.dumps({"instances": np.random.default_rng(0).normal(size=(100, 20)).tolist()})
    raw = body.encode()
    assert fastjson.loads(raw) == json.loads(raw)
    fast = min(timeit.repeat(lambda: fastjson.loads(raw), number=50, repeat=3))
    slow = min(timeit.repeat(lambda: json.loads(raw), number=50, repeat=3))
    assert fast < slow / 2, (fast, slow)


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


# --- raw tensor layout ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "values", "raw"),
    [
        ("FP32", [1.5, -2.0], b"\x00\x00\xc0\x3f\x00\x00\x00\xc0"),
        ("FP64", [0.5], b"\x00\x00\x00\x00\x00\x00\xe0\x3f"),
        ("INT32", [1, -1], b"\x01\x00\x00\x00\xff\xff\xff\xff"),
        ("INT64", [258], b"\x02\x01\x00\x00\x00\x00\x00\x00"),
        ("BOOL", [True, False, True], b"\x01\x00\x01"),
        (
            "BYTES",
            ["oslo", "", "é"],
            b"\x04\x00\x00\x00oslo\x00\x00\x00\x00\x02\x00\x00\x00\xc3\xa9",
        ),
    ],
)
def test_raw_tensors_use_tritons_layout_both_ways(datatype, values, raw):
    from serving import v2codec

    arr = v2codec.array_from_raw("x", datatype, [len(values)], raw)
    assert arr.tolist() == values
    assert v2codec.raw_from_array(datatype, arr) == raw


def test_raw_tensors_of_the_wrong_size_are_refused_with_the_inputs_name():
    from serving import v2codec
    from serving.errors import ServingError

    with pytest.raises(
        ServingError, match="input 'x': shape \\[3\\] of FP64 needs 24 bytes, got 16"
    ):
        v2codec.array_from_raw("x", "FP64", [3], b"\0" * 16)
    with pytest.raises(ServingError, match="truncated BYTES element"):
        v2codec.array_from_raw("x", "BYTES", [1], b"\x09\x00\x00\x00abc")
    with pytest.raises(ServingError, match="needs 2 values, got 1"):
        v2codec.array_from_raw("x", "BYTES", [2], b"\x01\x00\x00\x00a")
