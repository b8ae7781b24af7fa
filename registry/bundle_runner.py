"""Run this ONNX model with onnxruntime and numpy only.

    python run.py [ROWS_JSON]

ROWS_JSON (default: input_example.json) is a list of rows, or an MLflow input example
({"columns": [...], "data": [[...]]} or {"inputs": ...}); with named columns the signature's
order is used. Prints {"outputs": {name: values}} as JSON. Checks MANIFEST.sha256 first."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime

HERE = Path(__file__).resolve().parent


def check_manifest():
    for line in (HERE / "MANIFEST.sha256").read_text().splitlines():
        digest, name = line.split("  ", 1)
        if hashlib.sha256((HERE / name).read_bytes()).hexdigest() != digest:
            sys.exit(f"checksum mismatch: {name}")


def rows_of(doc, signature):
    for key in ("inputs", "instances", "dataframe_split"):
        if isinstance(doc, dict) and set(doc) == {key}:
            doc = doc[key]
    if isinstance(doc, dict) and "data" in doc:
        names = [str(c) for c in doc.get("columns") or []]
        wanted = [c["name"] for c in signature.get("inputs") or [] if c.get("name")]
        if names and wanted:
            return [[row[names.index(c)] for c in wanted] for row in doc["data"]]
        return doc["data"]
    return doc


def main(argv):
    check_manifest()
    source = Path(argv[0]) if argv else HERE / "input_example.json"
    signature = json.loads((HERE / "signature.json").read_text())
    session = onnxruntime.InferenceSession(
        str(HERE / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    first = session.get_inputs()[0]
    dtype = np.float32 if first.type == "tensor(float)" else np.float64
    rows = np.asarray(rows_of(json.loads(source.read_text()), signature), dtype=dtype)
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, {first.name: rows})
    print(
        json.dumps(
            {"outputs": {n: np.asarray(r).tolist() for n, r in zip(names, results, strict=True)}}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
