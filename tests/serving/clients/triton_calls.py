"""Run tritonclient (HTTP and gRPC) against a model server, as a user of Triton would.

Runs in the clients' own virtualenv (see requirements.txt beside this file). Reads a JSON spec
on stdin and prints one JSON object: what each call returned, or the exception it raised.

spec: {"http": "127.0.0.1:PORT", "grpc": "127.0.0.1:PORT", "model": NAME, "version": V,
       "cases": [{"id", "protocol": "http"|"grpc", "inputs": [{"name", "datatype", "shape",
                  "data", "binary"}], "outputs": [{"name", "binary"}] | null, "model": NAME?}]}
"""

import json
import sys

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: F401

NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
         "BOOL": np.bool_, "BYTES": np.object_}  # fmt: skip


def outcome(fn):
    try:
        return {"ok": fn()}
    except InferenceServerException as exc:
        return {"error": {"type": "InferenceServerException", "message": exc.message(),
                          "status": exc.status()}}  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}


def jsonable(arr):
    if arr is None:
        return None
    if arr.dtype == np.object_:
        return {"dtype": "object", "shape": list(arr.shape),
                "data": [v.decode() if isinstance(v, bytes) else v for v in arr.ravel().tolist()]}  # fmt: skip
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": arr.ravel().tolist()}


def infer(client, lib, case, default_model):
    inputs = []
    for spec in case["inputs"]:
        arr = np.array(spec["data"], dtype=NUMPY[spec["datatype"]]).reshape(spec["shape"])
        if spec["datatype"] == "BYTES":
            arr = np.array([s.encode() for s in arr.ravel()], dtype=np.object_).reshape(
                spec["shape"]
            )
        tensor = lib.InferInput(spec["name"], spec["shape"], spec["datatype"])
        if lib is thttp:
            tensor.set_data_from_numpy(arr, binary_data=spec.get("binary", True))
        else:
            tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    outputs = None
    if case.get("outputs") is not None:
        outputs = []
        for out in case["outputs"]:
            if lib is thttp:
                outputs.append(
                    lib.InferRequestedOutput(out["name"], binary_data=out.get("binary", True))
                )
            else:
                outputs.append(lib.InferRequestedOutput(out["name"]))
    result = client.infer(case.get("model", default_model), inputs, outputs=outputs,
                          request_id=case["id"])  # fmt: skip
    response = result.get_response()
    if lib is tgrpc:
        names = [o.name for o in response.outputs]
    else:
        names = [o["name"] for o in response["outputs"]]
    return {name: jsonable(result.as_numpy(name)) for name in names}


def main():
    spec = json.load(sys.stdin)
    model, version = spec["model"], spec.get("version", "")
    clients = {"http": (thttp.InferenceServerClient(spec["http"]), thttp),
               "grpc": (tgrpc.InferenceServerClient(spec["grpc"]), tgrpc)}  # fmt: skip
    report = {}
    for proto, (client, lib) in clients.items():
        kwargs = {"as_json": True} if lib is tgrpc else {}
        report[proto] = {
            "live": outcome(client.is_server_live),
            "ready": outcome(client.is_server_ready),
            "model_ready": outcome(lambda c=client: c.is_model_ready(model)),
            "model_ready_version": outcome(lambda c=client: c.is_model_ready(model, version)),
            "model_ready_unknown": outcome(lambda c=client: c.is_model_ready("no-such-model")),
            "server_metadata": outcome(lambda c=client, k=kwargs: c.get_server_metadata(**k)),
            "model_metadata": outcome(lambda c=client, k=kwargs: c.get_model_metadata(model, **k)),
            "model_metadata_unknown": outcome(
                lambda c=client, k=kwargs: c.get_model_metadata("no-such-model", **k)
            ),
        }
    report["cases"] = {}
    for case in spec["cases"]:
        client, lib = clients[case["protocol"]]
        report["cases"][case["id"]] = outcome(
            lambda c=client, lb=lib, cs=case: infer(c, lb, cs, model)
        )
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
