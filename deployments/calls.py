"""The "Call it" examples: one request per protocol the model server speaks, built from
the model version's saved input example (serving/README.md has the protocols)."""

from __future__ import annotations

import json
import shlex
from typing import Any


def _rows(payload: dict) -> list[dict] | None:
    if "dataframe_split" in payload:
        split = payload["dataframe_split"]
        columns, data = split.get("columns"), split.get("data")
        if isinstance(columns, list) and isinstance(data, list):
            return [dict(zip(columns, row, strict=False)) for row in data if isinstance(row, list)]
    records = payload.get("dataframe_records")
    if isinstance(records, list) and all(isinstance(r, dict) for r in records):
        return records
    return None


def _datatype(values: list[Any]) -> str | None:
    if all(isinstance(v, bool) for v in values):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "FP64"
    if all(isinstance(v, str) for v in values):
        return "BYTES"
    return None


def v1_body(payload: dict) -> dict:
    """TF Serving / KServe v1 ``:predict``: rows as ``instances``."""
    rows = _rows(payload)
    if rows is not None:
        return {"instances": rows}
    return {"instances": payload.get("instances", payload.get("inputs", []))}


def v2_body(payload: dict) -> dict | None:
    """Open Inference Protocol v2 ``/infer``: one tensor per column (None when the
    example has no named columns of one scalar type each)."""
    rows = _rows(payload)
    if not rows:
        return None
    inputs = []
    for name in rows[0]:
        values = [row.get(name) for row in rows]
        datatype = _datatype(values)
        if datatype is None:
            return None
        inputs.append({"name": name, "shape": [len(values)], "datatype": datatype, "data": values})
    return {"inputs": inputs}


def curl(url: str, body: dict | str) -> str:
    text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"), default=str)
    return (
        f"curl -sS -X POST {shlex.quote(url)} \\\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(text)}"
    )


def call_examples(*, endpoint: str, model_name: str, payload: dict | None) -> list[dict]:
    """[{"id", "label", "command"}] for v1 and v2 (``{name}`` is the model's name); empty
    without an input example to build them from."""
    if payload is None:
        return []
    examples = [
        {
            "id": "curl-v1",
            "label": f"POST {endpoint}/v1/models/{model_name}:predict (TF Serving / KServe v1)",
            "command": curl(f"{endpoint}/v1/models/{model_name}:predict", v1_body(payload)),
        }
    ]
    body = v2_body(payload)
    if body is not None:
        examples.append(
            {
                "id": "curl-v2",
                "label": f"POST {endpoint}/v2/models/{model_name}/infer (Open Inference Protocol v2)",
                "command": curl(f"{endpoint}/v2/models/{model_name}/infer", body),
            }
        )
    return examples
