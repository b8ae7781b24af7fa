"""ModelInfer's answers as serving.grpc_server encodes them without building the message:
byte for byte what protobuf serializes, and the common raw request read as the general path
reads it."""

from __future__ import annotations

import numpy as np
import pytest

from serving import grpc_predict_v2_pb2 as pb
from serving import v2codec
from serving.grpc_server import ResponseEncoder
from serving.inputs import Column, TabularSchema


def built(model_name, model_version, response_id, tensors) -> bytes:
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=response_id
    )
    for name, datatype, shape, arr in tensors:
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(v2codec.raw_from_array(datatype, arr))
    return response.SerializeToString()


CASES = [
    ("churn", "1", "0123456789abcdef0123456789abcdef", [("predict", "INT64", [1], np.array([1]))]),
    ("", "", "", [("predict", "FP64", [0], np.zeros(0))]),  # empty strings and an empty tensor
    ("modèle-ü", "v2 ☃", "id with spaces ✓", [("ñame", "FP32", [2, 3], np.ones((2, 3)))]),
    (
        "m" * 200,  # lengths of two-byte varints
        "7",
        "x" * 300,
        [
            ("probabilities", "FP64", [300, 2], np.random.default_rng(0).normal(size=(300, 2))),
            ("label", "BYTES", [3], np.array(["a", "bé", ""], dtype=object)),
            ("", "BOOL", [3], np.array([True, False, True])),
            ("big", "UINT8", [20_000], np.zeros(20_000, dtype=np.uint8)),
        ],
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_a_raw_answer_is_the_bytes_protobuf_serializes(case):
    encoder = ResponseEncoder()
    for _ in range(2):  # encoded, then from the encoder's reuse of its pieces
        assert encoder.raw_response(*case) == built(*case)
    assert pb.ModelInferResponse.FromString(encoder.raw_response(*case)).id == case[2]


def test_the_encoder_follows_a_new_model_name_and_new_shapes():
    encoder = ResponseEncoder()
    for n in (1, 16, 200, 1):
        tensors = [("predict", "INT64", [n], np.arange(n))]
        assert encoder.raw_response("a", "1", "id", tensors) == built("a", "1", "id", tensors)
        assert encoder.raw_response("b", "2", "id", tensors) == built("b", "2", "id", tensors)


def test_the_common_raw_tensor_is_read_as_the_general_path_reads_it():
    schema = TabularSchema([Column(f"f{i}", "double") for i in range(3)])
    x = np.arange(6, dtype="<f8").reshape(2, 3)
    matrix = schema.v2_raw_matrix("input-0", "FP64", [2, 3], x.tobytes())
    general = schema.from_v2([{"name": "input-0", "datatype": "FP64", "shape": [2, 3], "data": x}])
    assert np.array_equal(schema.from_matrix(matrix).matrix, general.matrix)
    # what the general path must decide (and answer with its own error)
    for name, datatype, shape, raw in [
        ("input-0", "FP64", [2, 3], x.tobytes()[:-1]),  # short
        ("input-0", "FP64", [0, 3], b""),  # no rows
        ("input-0", "FP64", [3, 2], x.tobytes()),  # not [n, k]
        ("input-0", "INT64", [2, 3], x.tobytes()),  # not a float type
        ("input-0", "FP64", [6], x.tobytes()),  # one dimension
    ]:
        assert schema.v2_raw_matrix(name, datatype, shape, raw) is None
