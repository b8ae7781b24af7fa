"""The model server, through its HTTP interface, against real scikit-learn and ONNX models."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

FEATURES = [f"f{i}" for i in range(20)]
REPO = Path(__file__).resolve().parents[2]


def rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, 20)), columns=FEATURES)


def post(proc, path: str, payload, headers=None) -> requests.Response:
    return requests.post(proc.url(path), json=payload, headers=headers, timeout=10)


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def pyfunc_models(models):
    import mlflow.pyfunc

    return {
        "sklearn": mlflow.pyfunc.load_model(str(models["sklearn"])),
        "onnx": mlflow.pyfunc.load_model(str(models["onnx"])),
    }


# --- scoring protocol ---------------------------------------------------------------------


def test_every_invocations_format_returns_the_models_own_predictions(fleet, models, pyfunc_models):
    df = rows(7, seed=1)
    expected = models["estimator"].predict(df).tolist()
    assert expected == pyfunc_models["sklearn"].predict(df).tolist()
    assert len(set(expected)) == 2, "the test rows should get both classes"
    shuffled = df[FEATURES[::-1]]
    payloads = [
        {"dataframe_split": json.loads(df.to_json(orient="split", index=False))},
        {"dataframe_split": json.loads(shuffled.to_json(orient="split", index=False))},
        {"dataframe_records": df.to_dict(orient="records")},
        {"instances": df.to_numpy().tolist()},
        {"instances": df.to_dict(orient="records")},
        {"inputs": df.to_dict(orient="list")},
        {"inputs": df.to_numpy().tolist()},
    ]
    for payload in payloads:
        response = post(fleet["sklearn"], "/invocations", payload)
        assert response.status_code == 200, (payload.keys(), response.text)
        assert response.json() == {"predictions": expected}, list(payload)

    csv = requests.post(
        fleet["sklearn"].url("/invocations"),
        data=df.to_csv(index=False),
        headers={"Content-Type": "text/csv"},
        timeout=10,
    )
    assert csv.status_code == 200, csv.text
    assert csv.json() == {"predictions": expected}


def test_onnx_model_answers_exactly_like_mlflow_pyfunc(fleet, pyfunc_models):
    df = rows(5, seed=2)
    reference = pyfunc_models["onnx"].predict(df).to_dict(orient="records")
    expected = json.loads(json.dumps(reference, default=float))
    response = post(fleet["onnx"], "/invocations", {"dataframe_split": df.to_dict(orient="split")})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": expected}
    probabilities = [p["output_probability"]["1"] for p in response.json()["predictions"]]
    assert len(set(probabilities)) == 5


def test_a_signature_with_string_and_integer_columns(fleet, models):
    proc = fleet["mixed"]
    df = pd.DataFrame(
        {
            "city": ["oslo", "lima", "pune", "oslo"],
            "visits": [1, 9, 3, 0],
            "spend": [0.2, -1.5, 0.7, -0.4],
        }
    )
    expected = models["pipeline"].predict(df).tolist()
    assert len(set(expected)) == 2
    records = post(proc, "/invocations", {"dataframe_records": df.to_dict(orient="records")})
    assert records.status_code == 200, records.text
    assert records.json() == {"predictions": expected}
    csv = requests.post(
        proc.url("/invocations"),
        data=df.to_csv(index=False),
        headers={"Content-Type": "text/csv"},
        timeout=5,
    )
    assert csv.json() == {"predictions": expected}
    v2 = {
        "inputs": [
            {"name": "city", "shape": [4], "datatype": "BYTES", "data": df["city"].tolist()},
            {"name": "visits", "shape": [4], "datatype": "INT64", "data": df["visits"].tolist()},
            {"name": "spend", "shape": [4, 1], "datatype": "FP64", "data": df["spend"].tolist()},
        ]
    }
    response = post(proc, "/v2/models/mixed/infer", v2)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == expected

    for bad, column in (
        ({"city": 5}, "city"),
        ({"visits": 2.5}, "visits"),
        ({"spend": "x"}, "spend"),
        ({"spend": True}, "spend"),
        ({"visits": False}, "visits"),
    ):
        # after a valid record, so that numpy would make the column's values all strings
        # (["oslo", 5] -> ["oslo", "5"]) or numbers (True -> 1.0)
        record = {**df.iloc[0].to_dict(), **bad}
        response = post(proc, "/invocations", {"dataframe_records": [df.iloc[1].to_dict(), record]})
        assert response.status_code == 400, bad
        assert response.json()["error"]["code"] == "wrong_type"
        assert f"'{column}'" in response.json()["error"]["message"]


def test_tf_serving_v1_predict_and_status(fleet, models):
    df = rows(4, seed=3)
    expected = models["estimator"].predict(df).tolist()
    # TF Serving answers the row format with `predictions`, the columnar one with `outputs`
    for payload, key in (
        ({"instances": df.to_numpy().tolist()}, "predictions"),
        ({"inputs": df.to_dict(orient="list")}, "outputs"),
    ):
        response = post(fleet["sklearn"], "/v1/models/churn:predict", payload)
        assert response.status_code == 200, response.text
        assert response.json() == {key: expected}
    status = requests.get(fleet["sklearn"].url("/v1/models/churn"), timeout=5).json()
    assert status["model_version_status"][0]["version"] == "3"
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    other = post(fleet["sklearn"], "/v1/models/someone-else:predict", {"instances": []})
    assert other.status_code == 404


def test_open_inference_protocol_v2_tabular_inputs(fleet, models):
    df = rows(3, seed=4)
    expected = models["estimator"].predict(df).tolist()
    per_column = {
        "id": "req-42",
        "inputs": [
            {"name": c, "shape": [3], "datatype": "FP64", "data": df[c].tolist()} for c in FEATURES
        ],
    }
    one_tensor = {
        "inputs": [
            {
                "name": "x",
                "shape": [3, 20],
                "datatype": "FP64",
                "data": df.to_numpy().ravel().tolist(),
            }
        ]
    }
    response = post(fleet["sklearn"], "/v2/models/churn/infer", per_column)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "churn" and body["model_version"] == "3"
    assert body["id"] == "req-42"
    assert body["outputs"] == [
        {"name": "predict", "datatype": "INT64", "shape": [3], "data": expected}
    ]
    response = post(fleet["sklearn"], "/v2/models/churn/infer", one_tensor, {"X-Request-Id": "r-1"})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == expected
    assert response.json()["id"] == "r-1"

    meta = requests.get(fleet["sklearn"].url("/v2/models/churn"), timeout=5).json()
    assert meta["name"] == "churn" and meta["versions"] == ["3"]
    assert [i["name"] for i in meta["inputs"]] == FEATURES
    assert meta["inputs"][0]["datatype"] == "FP64"
    ready = requests.get(fleet["sklearn"].url("/v2/models/churn/ready"), timeout=5)
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_health_and_version_endpoints(fleet):
    proc = fleet["sklearn"]
    for path in ("/ping", "/health", "/v2/health/live", "/v2/health/ready"):
        assert requests.get(proc.url(path), timeout=5).status_code == 200, path
    version = requests.get(proc.url("/version"), timeout=5).json()
    assert version["model"] == "churn" and version["model_version"] == "3"


def test_prediction_responses_carry_model_and_request_id_headers(fleet):
    payload = {"instances": rows(1, seed=5).to_numpy().tolist()}
    mine = post(fleet["sklearn"], "/invocations", payload, {"X-Request-Id": "client-id-7"})
    assert mine.headers["X-Request-Id"] == "client-id-7"
    assert mine.headers["X-Model-Name"] == "churn"
    assert mine.headers["X-Model-Version"] == "3"
    first = post(fleet["sklearn"], "/invocations", payload).headers["X-Request-Id"]
    second = post(fleet["sklearn"], "/invocations", payload).headers["X-Request-Id"]
    assert first and second and first != second


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code", "named"),
    [
        ({"dataframe_records": [{c: 1.0 for c in FEATURES[:-1]}]}, "missing_column", "f19"),
        (
            {"dataframe_split": {"columns": FEATURES[1:], "data": [[1.0] * 19]}},
            "missing_column",
            "f0",
        ),
        ({"instances": [[1.0] * 5 + ["high"] + [1.0] * 14]}, "wrong_type", "f5"),
        ({"inputs": {**{c: [1.0] for c in FEATURES}, "f3": [True]}}, "wrong_type", "f3"),
        # numpy would read these booleans as 1.0
        ({"instances": [[1.0] * 4 + [True] + [1.0] * 15]}, "wrong_type", "f4"),
        ({"inputs": {**{c: [1.0, 2.0] for c in FEATURES}, "f6": [1.0, False]}}, "wrong_type", "f6"),
        ({"dataframe_records": [{**{c: 1 for c in FEATURES}, "f8": True}]}, "wrong_type", "f8"),
        (
            {"inputs": {**{c: [[1.0], [2.0]] for c in FEATURES}, "f9": [[1.0], [True]]}},
            "wrong_type",
            "f9",
        ),
        ({"inputs": {**{c: [1.0] for c in FEATURES}, "f7": [None]}}, "missing_value", "f7"),
        ({"instances": [[1.0] * 19]}, "bad_shape", "20 values"),
        ({"instance": [[1.0] * 20]}, "unknown_key", "instance"),
        ({"instances": [[1.0] * 20], "extra": 1}, "unknown_key", "extra"),
        ({"instances": [[1.0] * 20], "inputs": [[1.0] * 20]}, "bad_payload", "exactly one"),
        ([[1.0] * 20], "bad_payload", "JSON object"),
    ],
)
def test_input_that_does_not_fit_the_signature_is_a_400_naming_the_problem(
    fleet, payload, code, named
):
    response = post(fleet["sklearn"], "/invocations", payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert named in error["message"]


def test_malformed_json_and_bad_v2_tensors_are_400(fleet):
    proc = fleet["sklearn"]
    response = requests.post(
        proc.url("/invocations"),
        data=b'{"instances": [[1, 2,',
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    bad_tensor = {
        "inputs": [{"name": "x", "shape": [2, 20], "datatype": "FP64", "data": [1.0] * 20}]
    }
    response = post(proc, "/v2/models/churn/infer", bad_tensor)
    assert response.status_code == 400
    # OIP v2 errors: {"error": "<message>"}, the code in a header
    assert "40 values" in response.json()["error"]
    assert response.headers["x-error-code"] == "bad_shape"
    wrong_type = {
        "inputs": [
            {"name": c, "shape": [1], "datatype": "BYTES" if c == "f2" else "FP64",
             "data": ["a"] if c == "f2" else [1.0]}
            for c in FEATURES
        ]
    }  # fmt: skip
    response = post(proc, "/v2/models/churn/infer", wrong_type)
    assert response.status_code == 400 and "f2" in response.json()["error"]
    booleans = {
        "inputs": [{"name": "x", "shape": [1, 20], "datatype": "FP64", "data": [True] + [1.0] * 19}]
    }
    response = post(proc, "/v2/models/churn/infer", booleans)
    assert response.status_code == 400
    assert response.headers["x-error-code"] == "wrong_type"


def test_body_over_the_limit_is_413_and_unknown_content_type_is_415(fleet):
    proc = fleet["sklearn"]  # --max-body-bytes 16000
    big = {"instances": [[0.5] * 20] * 200}
    assert len(json.dumps(big)) > 16000
    response = post(proc, "/invocations", big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert post(proc, "/invocations", {"instances": [[0.5] * 20]}).status_code == 200
    response = requests.post(
        proc.url("/invocations"),
        data=b"<xml/>",
        headers={"Content-Type": "application/xml"},
        timeout=5,
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert requests.get(proc.url("/nowhere"), timeout=5).status_code == 404
    wrong_method = requests.get(proc.url("/invocations"), timeout=5)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"


def test_a_chunked_body_over_the_limit_is_413_before_it_ends(fleet):
    proc = fleet["sklearn"]  # --max-body-bytes 16000
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 6000
        for _ in range(3):  # 18000 bytes, and the body has not ended
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        reply = sock.recv(1000)  # times out (an error) if the server waits for the end
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert b"connection: close" in reply.lower()
    assert post(proc, "/invocations", {"instances": [[0.5] * 20]}).status_code == 200


def test_a_failure_inside_the_model_is_a_500_with_an_error_id_in_the_log(fleet):
    proc = fleet["sklearn"]
    # JSON's NaN passes the type check (it is a double) but LogisticRegression refuses it.
    body = '{"instances": [[NaN' + ", 1.0" * 19 + "]]}"
    response = requests.post(
        proc.url("/invocations"), data=body, headers={"Content-Type": "application/json"}, timeout=5
    )
    assert response.status_code == 500
    error_id = response.json()["error"]["error_id"]
    assert error_id in response.json()["error"]["message"]
    deadline = time.monotonic() + 5
    while error_id not in proc.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = proc.log()
    assert f"error {error_id}" in log
    assert "Traceback" in log[log.index(error_id) :]
    # and the server still answers
    assert post(proc, "/invocations", {"instances": [[0.0] * 20]}).status_code == 200


def test_garbage_on_the_wire_does_not_kill_the_server(fleet):
    proc = fleet["sklearn"]
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as sock:
        sock.sendall(b"\x00\x01 NOT HTTP AT ALL\r\n\r\n")
        reply = sock.recv(1000)
    assert reply.startswith(b"HTTP/1.1 400")
    assert requests.get(proc.url("/ping"), timeout=5).status_code == 200


# --- batching and metrics -----------------------------------------------------------------


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_rows(fleet, pyfunc_models):
    proc = fleet["onnx"]
    before = requests.get(proc.url("/metrics"), timeout=5).text
    socks = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(32)]
    sent = 0
    for round_ in range(15):
        frames = [rows(1 + i % 3, seed=1000 * round_ + i) for i in range(len(socks))]
        wire = []
        for df in frames:
            body = json.dumps({"dataframe_split": df.to_dict(orient="split")}).encode()
            wire.append(
                b"POST /invocations HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        for sock, data in zip(socks, wire, strict=False):  # all 32 requests in flight at once
            sock.sendall(data)
        for sock, df in zip(socks, frames, strict=False):
            response = http.client.HTTPResponse(sock)
            response.begin()
            got = json.loads(response.read())
            assert response.status == 200, got
            expected = pyfunc_models["onnx"].predict(df)
            assert [p["output_label"] for p in got["predictions"]] == expected[
                "output_label"
            ].tolist()
            # float32 matrix kernels sum in a batch-size dependent order: the last bits of a
            # batched prediction may differ from the same row predicted alone.
            got_p1 = [p["output_probability"]["1"] for p in got["predictions"]]
            want_p1 = [p[1] for p in expected["output_probability"]]
            np.testing.assert_allclose(got_p1, want_p1, rtol=1e-5, atol=1e-6)
            sent += len(df)
    for sock in socks:
        sock.close()
    after = requests.get(proc.url("/metrics"), timeout=5).text
    rows_predicted = metric(after, "serving_batch_size_sum") - metric(
        before, "serving_batch_size_sum"
    )
    model_calls = metric(after, "serving_batch_size_count") - metric(
        before, "serving_batch_size_count"
    )
    single_row_calls = metric(after, "serving_batch_size_bucket", 'le="1"') - metric(
        before, "serving_batch_size_bucket", 'le="1"'
    )
    assert rows_predicted == sent
    assert model_calls < 15 * 32, "no request was batched with another"
    assert model_calls - single_row_calls > 0
    assert rows_predicted / model_calls > 1.5, (rows_predicted, model_calls)


def test_metrics_count_requests_rows_and_latency(fleet):
    proc = fleet["sklearn"]
    before = requests.get(proc.url("/metrics"), timeout=5).text
    for n in (1, 2, 3):
        assert post(proc, "/invocations", {"instances": rows(n, seed=n).to_numpy().tolist()}).ok
    assert post(proc, "/invocations", {"nope": 1}).status_code == 400
    response = requests.get(proc.url("/metrics"), timeout=5)
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    after = response.text
    ok = 'endpoint="/invocations",status="200"'
    bad = 'endpoint="/invocations",status="400"'
    assert (
        metric(after, "serving_requests_total", ok) - metric(before, "serving_requests_total", ok)
        == 3
    )
    assert (
        metric(after, "serving_requests_total", bad) - metric(before, "serving_requests_total", bad)
        == 1
    )
    assert (
        metric(after, "serving_predictions_total") - metric(before, "serving_predictions_total")
        == 6
    )
    latency = 'endpoint="/invocations"'
    assert (
        metric(after, "serving_request_duration_seconds_count", latency)
        - metric(before, "serving_request_duration_seconds_count", latency)
        == 4
    )
    assert (
        metric(
            after, "serving_request_duration_seconds_bucket", 'endpoint="/invocations",le="+Inf"'
        )
        > 0
    )
    assert metric(after, "serving_model_info", 'name="churn",version="3"') == 1
    assert metric(after, "serving_inflight_requests") == 1  # this very request
    assert metric(after, "serving_model_load_seconds") > 0
    start = metric(after, "serving_process_start_time_seconds")
    assert time.time() - 600 < start < time.time()
    assert "# TYPE serving_batch_size histogram" in after
    assert "# TYPE serving_prediction_log_dropped_total counter" in after


# --- lifecycle ----------------------------------------------------------------------------


def test_workers_are_separate_processes_sharing_one_port(fleet):
    proc = fleet["victim"]  # --workers 2
    boot_ids = set()
    for _ in range(200):
        # a new connection each time: the kernel spreads connections over the workers
        boot_ids.add(requests.get(proc.url("/predictions"), timeout=5).json()["boot_id"])
        if len(boot_ids) == 2:
            break
    assert len(boot_ids) == 2
    for _ in range(10):
        assert post(proc, "/invocations", {"instances": [[0.0] * 20]}).status_code == 200


def test_sigterm_finishes_in_flight_requests_then_exits_0(fleet):
    proc = fleet["victim"]
    body = json.dumps({"instances": [[0.25] * 20]}).encode()
    head = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    idle = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
    in_flight = socket.create_connection(("127.0.0.1", proc.port), timeout=5)
    in_flight.sendall(head + body[:10])  # the request has started arriving
    time.sleep(0.2)
    proc.proc.send_signal(15)
    time.sleep(0.3)
    assert proc.proc.poll() is None, "exited with a request in flight"
    in_flight.sendall(body[10:])
    reply = in_flight.recv(10000)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert b"connection: close" in reply.lower()
    assert b'"predictions"' in reply
    assert idle.recv(100) == b"", "idle keep-alive connections are closed"
    assert proc.proc.wait(timeout=10) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(proc.url("/ping"), timeout=2)
    in_flight.close()
    idle.close()


def test_live_at_once_but_ready_and_predicting_only_after_warm_up(fleet):
    # what the servers answered while their models were loading (see Proc.wait_ready)
    seen = set().union(*(fleet[k].before_ready for k in ("sklearn", "onnx", "victim", "old")))
    assert ("/v2/health/ready", 503) in seen
    assert ("live", 200) in seen
    assert ("predict", 503) in seen
    for name in ("sklearn", "onnx"):
        assert requests.get(fleet[name].url("/ping"), timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "m", "--version", "1"], "--model-dir"),
        (["--model-dir", "/nonexistent", "--name", "m", "--version", "1"], "not an MLflow model"),
        (["--model-dir", "{model}", "--version", "1"], "--name"),
        (["--model-dir", "{model}", "--name", "m", "--version", "1", "--port", "http"], "--port"),
        (
            ["--model-dir", "{model}", "--name", "m", "--version", "1", "--workers", "0"],
            "--workers",
        ),
        (
            [
                "--model-dir",
                "{model}",
                "--name",
                "m",
                "--version",
                "1",
                "--max-batch-delay-ms",
                "-1",
            ],
            "--max-batch-delay-ms must be",
        ),
    ],
)
def test_invalid_settings_exit_2_with_a_clear_message(models, args, message):
    args = [a.replace("{model}", str(models["sklearn"])) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "serving", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_environment_settings_apply_and_the_command_line_wins(fleet):
    headers = requests.get(fleet["new"].url("/ping"), timeout=5).headers
    assert headers["X-Model-Name"] == "churn"  # --name beats SERVING_MODEL_NAME
    assert headers["X-Model-Version"] == "2"  # from SERVING_MODEL_VERSION
