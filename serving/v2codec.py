"""Open Inference Protocol (v2) tensors in their binary forms, shared by HTTP and gRPC.

- Triton's binary tensor data extension over HTTP: a JSON header of
  `Inference-Header-Content-Length` bytes, then each binary input's bytes in input order (an
  input says how many with `parameters.binary_data_size`); outputs are answered the same way
  when asked for (`parameters.binary_data` on an output, `parameters.binary_data_output` on the
  request).
- gRPC: `raw_input_contents` / `raw_output_contents` hold the same bytes, one entry per tensor.

Raw layout: little-endian, row-major; BOOL one byte per element; BYTES each element as a 4-byte
little-endian length then its bytes.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from serving.errors import bad_request
from serving.model import Outputs, v2_datatype

RAW_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_LENGTH = struct.Struct("<I")


def shape_of(name: Any, shape: Any) -> list[int]:
    if (
        not isinstance(shape, (list, tuple))
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise bad_request("bad_shape", f"input {name!r}: shape must be a list of sizes")
    return list(shape)


def array_from_raw(name: str, datatype: Any, shape: list[int], raw: bytes) -> np.ndarray:
    """One tensor's raw bytes as an array of its shape (BYTES: an array of str)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        values = []
        offset, end = 0, len(raw)
        while offset < end:
            if offset + 4 > end:
                raise bad_request("bad_tensor", f"input {name!r}: truncated BYTES element")
            (size,) = _LENGTH.unpack_from(raw, offset)
            offset += 4
            if offset + size > end:
                raise bad_request("bad_tensor", f"input {name!r}: truncated BYTES element")
            try:
                values.append(raw[offset : offset + size].decode("utf-8"))
            except UnicodeDecodeError:
                raise bad_request(
                    "wrong_type", f"input {name!r}: BYTES elements must be UTF-8 text"
                ) from None
            offset += size
        if len(values) != count:
            raise bad_request(
                "bad_shape",
                f"input {name!r}: shape {shape} needs {count} values, got {len(values)}",
            )
        return np.array(values, dtype=str).reshape(shape) if values else np.empty(shape, str)
    dtype = RAW_DTYPES.get(datatype)
    if dtype is None:
        raise bad_request("wrong_type", f"input {name!r}: unknown datatype {datatype!r}")
    if len(raw) != count * dtype.itemsize:
        raise bad_request(
            "bad_shape",
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"got {len(raw)}",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def raw_from_array(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in arr.ravel().tolist():
            data = value if isinstance(value, bytes) else text(value).encode("utf-8")
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=RAW_DTYPES[datatype]).tobytes()


def text(value: Any) -> str:
    if isinstance(value, str):
        return value
    from serving.fastjson import dumps

    return dumps(value).decode()


def named_arrays(outputs: Outputs) -> dict[str, np.ndarray]:
    """The output tensors of outputs by name (as `Outputs.v2_outputs` names them)."""
    if outputs.kind == "array":
        return {"predict": np.asarray(outputs.value)}
    if outputs.kind in ("frame", "dict"):
        return dict(outputs.value)
    return {"predict": np.asarray(outputs.predictions(), dtype=object)}


def output_tensors(
    outputs: Outputs, wanted: set[str] | None
) -> list[tuple[str, str, list[int], np.ndarray]]:
    """(name, datatype, shape, array) of each output asked for (all when wanted is None)."""
    named = named_arrays(outputs)
    unknown = sorted(set(wanted or ()) - set(named))
    if unknown:
        raise bad_request(
            "unknown_output",
            f"unknown output(s) {', '.join(map(repr, unknown))}; the model answers "
            f"{', '.join(map(repr, named))}",
        )
    tensors = []
    for name, arr in named.items():
        if wanted is not None and name not in wanted:
            continue
        datatype = v2_datatype(arr.dtype)
        tensors.append((name, datatype, list(arr.shape), arr))
    return tensors


def split_binary_body(body: bytes, header_length: str) -> tuple[bytes, memoryview]:
    """(JSON header, binary rest) of a body with Inference-Header-Content-Length."""
    try:
        size = int(header_length)
    except ValueError:
        size = -1
    if not 0 <= size <= len(body):
        raise bad_request(
            "bad_header",
            f"Inference-Header-Content-Length must be between 0 and the body size "
            f"({len(body)}), got {header_length!r}",
        )
    return body[:size], memoryview(body)[size:]


def attach_binary_inputs(inputs: Any, blob: memoryview) -> None:
    """Give each input with parameters.binary_data_size its data from blob, in order."""
    if not isinstance(inputs, list):
        return
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            continue
        params = tensor.get("parameters")
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            continue
        name = tensor.get("name")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_request("bad_tensor", f"input {name!r}: binary_data_size must be a size")
        if "data" in tensor:
            raise bad_request("bad_tensor", f"input {name!r}: both 'data' and binary data given")
        if offset + size > len(blob):
            raise bad_request(
                "bad_tensor", f"input {name!r}: binary_data_size {size} runs past the body"
            )
        shape = shape_of(name, tensor.get("shape"))
        raw = bytes(blob[offset : offset + size])
        tensor["data"] = array_from_raw(str(name), tensor.get("datatype"), shape, raw)
        offset += size
    if offset != len(blob):
        raise bad_request(
            "bad_tensor",
            f"the body has {len(blob) - offset} bytes after the binary inputs' data",
        )
