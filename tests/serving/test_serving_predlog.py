"""The prediction log: pulled over GET /predictions, and written as JSONL files."""

from __future__ import annotations

import json
import re
import time
import uuid

import numpy as np
import pandas as pd
import requests

FEATURES = [f"f{i}" for i in range(20)]


def pull(proc, token: str, **params) -> dict:
    response = requests.get(
        proc.url("/predictions"),
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_pulling_the_log_needs_the_admin_token(fleet, admin_token):
    proc = fleet["sklearn"]
    assert requests.get(proc.url("/predictions"), timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer not-it"}
    assert requests.get(proc.url("/predictions"), headers=wrong, timeout=5).status_code == 401
    assert pull(proc, admin_token)["boot_id"]
    # without a token configured the endpoint is open
    assert requests.get(fleet["onnx"].url("/predictions"), timeout=5).status_code == 200


def test_each_prediction_is_one_record_with_inputs_and_outputs(fleet, models, admin_token):
    proc = fleet["sklearn"]
    cursor = pull(proc, admin_token, limit=1)["next"]
    cursor = pull(proc, admin_token, after=cursor, limit=10000)["next"]
    rng = np.random.default_rng(7)
    frames = [pd.DataFrame(rng.normal(size=(n, 20)), columns=FEATURES) for n in (1, 2, 3)]
    ids = [f"log-{uuid.uuid4().hex[:8]}" for _ in frames]
    started = time.time()
    for df, rid in zip(frames[:2], ids[:2], strict=False):
        response = requests.post(
            proc.url("/invocations"),
            json={"dataframe_split": df.to_dict(orient="split")},
            headers={"X-Request-Id": rid},
            timeout=5,
        )
        assert response.status_code == 200
    v2 = {"inputs": [{"name": c, "shape": [3], "datatype": "FP64", "data": frames[2][c].tolist()}
                     for c in FEATURES]}  # fmt: skip
    response = requests.post(
        proc.url("/v2/models/churn/infer"), json=v2, headers={"X-Request-Id": ids[2]}, timeout=5
    )
    assert response.status_code == 200

    page = pull(proc, admin_token, after=cursor, limit=2)
    assert re.fullmatch(r"[0-9a-f-]{36}", page["boot_id"])
    assert [r["request_id"] for r in page["records"]] == ids[:2]
    assert page["next"] == page["records"][-1]["seq"] == cursor + 2
    rest = pull(proc, admin_token, after=page["next"])
    assert [r["request_id"] for r in rest["records"]] == ids[2:]
    assert rest["boot_id"] == page["boot_id"]
    records = page["records"] + rest["records"]
    assert [r["seq"] for r in records] == [cursor + 1, cursor + 2, cursor + 3]
    for record, df in zip(records, frames, strict=False):
        assert record["v"] == 1
        assert record["model"] == "churn" and record["version"] == "3"
        assert record["n_rows"] == len(df)
        assert record["outputs"] == models["estimator"].predict(df).tolist()
        assert record["inputs"] == df.to_dict(orient="list")
        assert started - 1 < record["ts"] < time.time() + 1
        assert 0 < record["latency_ms"] < 5000
    assert [r["endpoint"] for r in records] == [
        "/invocations", "/invocations", "/v2/models/{name}/infer",
    ]  # fmt: skip

    # the same records reach the JSONL file sink
    deadline = time.monotonic() + 5
    found = {}
    while time.monotonic() < deadline and len(found) < 3:
        for path in fleet["sink_dir"].glob("predictions-*.jsonl"):
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record["request_id"] in ids:
                    found[record["request_id"]] = record
        time.sleep(0.1)
    assert [found[rid] for rid in ids] == records
    assert (fleet["sink_dir"] / f"predictions-{page['boot_id']}.jsonl").exists()


def test_a_full_buffer_drops_the_oldest_records_and_counts_them(fleet, admin_token):
    proc = fleet["sklearn"]  # SERVING_LOG_BUFFER=20
    with requests.Session() as session:
        for _ in range(25):
            response = session.post(proc.url("/invocations"), json={"instances": [[0.1] * 20]})
            assert response.status_code == 200
    everything = pull(proc, admin_token, after=0, limit=10000)
    last = everything["next"]
    assert last >= 25
    assert len(everything["records"]) == 20
    assert everything["records"][0]["seq"] == last - 19
    assert everything["dropped"] == last - 20
    metrics = requests.get(proc.url("/metrics"), timeout=5).text
    assert f"serving_prediction_log_dropped_total {last - 20}\n" in metrics
    # a consumer that fell behind resumes at the oldest record still kept
    assert pull(proc, admin_token, after=1, limit=1)["records"][0]["seq"] == last - 19


def test_bad_cursor_parameters_are_400(fleet, admin_token):
    headers = {"Authorization": f"Bearer {admin_token}"}
    for query in ("after=abc", "limit=0", "after=-1"):
        response = requests.get(
            fleet["sklearn"].url(f"/predictions?{query}"), headers=headers, timeout=5
        )
        assert response.status_code == 400, query
