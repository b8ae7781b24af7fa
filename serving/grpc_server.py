"""OIP v2 over gRPC: `inference.GRPCInferenceService` on its own port (`--grpc-port`).

The calls run on the server's event loop, next to the HTTP protocol, and use the same `App`: the same model and batcher (a gRPC request is batched with HTTP ones), the same
metrics (endpoint label `/inference.GRPCInferenceService/<Call>`, status as the HTTP status the
same refusal gets) and the same prediction log. Messages come from `grpc_predict_v2_pb2`,
generated from `proto/grpc_predict_v2.proto`. This module holds the call semantics only; the
transport (HTTP/2 and gRPC's message framing, on the same uvloop as HTTP/1.1) is
`serving/h2grpc.py`, which needs no grpcio.

Tensors come as `raw_input_contents` (what tritonclient sends) or as typed `contents`; the
answer uses the same form (`raw_output_contents` for raw requests).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from serving import grpc_predict_v2_pb2 as pb
from serving import ids, v2codec
from serving.batching import Pending
from serving.errors import ServingError, bad_request
from serving.model import Outputs

if TYPE_CHECKING:
    from serving.app import App

logger = logging.getLogger("serving.grpc")

SERVICE = "inference.GRPCInferenceService"
_PEAK_WINDOW_S = 0.05  # how long a peak of concurrent ModelInfer calls is remembered
# gRPC status codes (grpc/status.h)
OK = 0
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
# the status of a refusal, from the HTTP status the same refusal gets
_STATUS = {
    400: INVALID_ARGUMENT,
    404: NOT_FOUND,
    413: RESOURCE_EXHAUSTED,
    415: INVALID_ARGUMENT,
    503: UNAVAILABLE,
}
# typed contents field of each datatype (FP16 only travels raw)
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


_INFER_ENDPOINT = f"/{SERVICE}/ModelInfer"


class CallError(Exception):
    """A call answered with a gRPC status other than OK (and `x-error-code` in its trailers)."""

    def __init__(self, status: int, message: str, error_code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


Reply = Callable[[Any], None]  # a call's answer: its response message, or a CallError


class InferenceService:
    """The six calls, each answering from `app`'s state."""

    def __init__(self, app: App) -> None:
        self.app = app
        # ModelInfer calls in progress, and their recent peak. While fewer calls are in progress
        # than were a moment ago, the callers just answered are sending their next ones: the
        # batcher waits for them (at most --max-batch-delay-ms, as for an HTTP body still
        # arriving). At concurrency 1 the peak is 1 and nothing waits.
        self.infer_in_flight = 0
        self._peak = 0
        self._peak_at = 0.0
        self._just_ended = 0  # ModelInfer calls answered in this loop turn
        self._encoder = ResponseEncoder()
        app.grpc_expected = self.expected

    def expected(self) -> int:
        """How many ModelInfer calls are likely on their way (recent peak minus in progress,
        and minus those answered in this loop turn)."""
        if time.perf_counter() - self._peak_at > _PEAK_WINDOW_S:
            self._peak = self.infer_in_flight  # the load went down: forget the old peak
            self._peak_at = time.perf_counter()
        return max(0, self._peak - self.infer_in_flight - self._just_ended)

    # --- plumbing -----------------------------------------------------------------------------

    def _call(self, name: str, fn: Callable[[], Any], reply: Reply) -> None:
        """Answer with fn()'s message, with the metrics of one request."""
        metrics = self.app.metrics
        metrics.in_flight += 1
        started = time.perf_counter()
        status = 200
        try:
            result = fn()
        except Exception as exc:
            status, result = self._call_error(name, exc)
        metrics.in_flight -= 1
        metrics.observe_request(f"/{SERVICE}/{name}", status, time.perf_counter() - started)
        reply(result)

    def _call_error(self, name: str, exc: Exception) -> tuple[int, CallError]:
        """(HTTP status for the metrics, the CallError to answer) of a call's failure: a
        ServingError's status, or INTERNAL with an error id (logged with the failure)."""
        if isinstance(exc, ServingError):
            return exc.status, CallError(_STATUS.get(exc.status, INTERNAL), exc.message, exc.code)
        error_id = uuid.uuid4().hex[:16]
        logger.error("error %s on gRPC %s", error_id, name, exc_info=exc)
        return 500, CallError(
            INTERNAL, f"the model failed on this request; error id {error_id}", "internal_error"
        )

    def _check_model(self, name: str, version: str) -> None:
        settings = self.app.settings
        if name != settings.name:
            raise ServingError(404, "model_not_found", f"model {name!r} is not served here")
        if version and version != settings.version:
            raise ServingError(
                404, "model_not_found", f"version {version!r} of the model is not served here"
            )

    def _ready(self) -> bool:
        return self.app.ready and not self.app.closing

    # --- calls --------------------------------------------------------------------------------

    def server_live(self, request: pb.ServerLiveRequest, reply: Reply) -> None:
        self._call("ServerLive", lambda: pb.ServerLiveResponse(live=True), reply)

    def server_ready(self, request: pb.ServerReadyRequest, reply: Reply) -> None:
        self._call("ServerReady", lambda: pb.ServerReadyResponse(ready=self._ready()), reply)

    def model_ready(self, request: pb.ModelReadyRequest, reply: Reply) -> None:
        def run():
            self._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=self._ready())

        self._call("ModelReady", run, reply)

    def server_metadata(self, request: pb.ServerMetadataRequest, reply: Reply) -> None:
        from serving.app import EXTENSIONS, SERVER_VERSION

        def run():
            return pb.ServerMetadataResponse(
                name="mlops-serving", version=SERVER_VERSION, extensions=EXTENSIONS
            )

        self._call("ServerMetadata", run, reply)

    def model_metadata(self, request: pb.ModelMetadataRequest, reply: Reply) -> None:
        def run():
            self._check_model(request.name, request.version)
            meta = self.app.v2_metadata_dict()
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        self._call("ModelMetadata", run, reply)

    def model_infer(self, request: pb.ModelInferRequest, reply: Reply) -> None:
        """Queue the request's rows for the batcher; reply once they are predicted (from the
        batch's own loop turn: no task, no future)."""
        app = self.app
        metrics = app.metrics
        started = time.perf_counter()
        self.infer_in_flight += 1
        if self.infer_in_flight >= self._peak:
            self._peak, self._peak_at = self.infer_in_flight, started
        metrics.in_flight += 1

        def finish(status: int, result: Any) -> None:
            metrics.in_flight -= 1
            metrics.observe_request(_INFER_ENDPOINT, status, time.perf_counter() - started)
            self._infer_ended()
            reply(result)

        try:
            raw, method, rows = self._infer_rows(request)
            logged = rows if app.sample_inputs() else None

            def done(outputs: Outputs | None, error: BaseException | None) -> None:
                try:
                    if error is not None:
                        metrics.model_errors += 1
                        raise error
                    response_id, response = self._infer_response(request, raw, outputs)
                    app.record(response_id, _INFER_ENDPOINT, started, outputs, logged)
                except Exception as exc:
                    finish(*self._call_error("ModelInfer", exc))
                    return
                finish(200, response)

            app._batcher(method).submit(Pending(rows, done))
        except Exception as exc:
            finish(*self._call_error("ModelInfer", exc))

    def _infer_ended(self) -> None:
        """One ModelInfer call fewer in progress (before its answer is written: a caller's
        next call is never counted with its last). Until this loop turn's callbacks ran, the
        calls just answered are not counted as on their way either (`expected`): a batch the
        batcher already scheduled does not wait for them, as it did not when each call was an
        awaiting task answered in a later turn."""
        self.infer_in_flight -= 1
        self._just_ended += 1
        if self._just_ended == 1:
            self.app.loop.call_soon(self._turn_ended)

    def _turn_ended(self) -> None:
        self._just_ended = 0

    def _infer_rows(self, request: pb.ModelInferRequest) -> tuple[Any, str | None, Any]:
        """(raw_input_contents, the prediction method, the request's rows)."""
        self._check_model(request.model_name, request.model_version)
        app = self.app
        model = app._model()
        if model.schema is None:
            raise ServingError(
                400,
                "unsupported_signature",
                "this model has no tabular signature; use /invocations over HTTP",
            )
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise bad_request(
                "bad_tensor",
                f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents",
            )
        inputs = request.inputs
        schema = model.schema
        matrix = None
        if raw and len(inputs) == 1:  # the common case, checked in the same order as below
            tensor = inputs[0]
            matrix = schema.v2_raw_matrix(tensor.name, tensor.datatype, tensor.shape, raw[0])
        tensors = []
        if matrix is None:
            for i, tensor in enumerate(inputs):
                shape = v2codec.shape_of(tensor.name, list(tensor.shape))
                if raw:
                    data = v2codec.array_from_raw(tensor.name, tensor.datatype, shape, raw[i])
                else:
                    data = _from_contents(tensor)
                tensors.append(
                    {"name": tensor.name, "datatype": tensor.datatype, "shape": shape, "data": data}
                )
        requested = None
        if "predict_method" in request.parameters:
            requested = request.parameters["predict_method"].string_param
        method = model.resolve_method(requested)
        rows = schema.from_matrix(matrix) if matrix is not None else schema.from_v2(tensors)
        return raw, method, rows

    def _infer_response(
        self, request: pb.ModelInferRequest, raw: Any, outputs: Outputs
    ) -> tuple[str, pb.ModelInferResponse | bytes]:
        """(the answer's id, the answer): raw outputs for a raw request, serialized here."""
        settings = self.app.settings
        asked = request.outputs
        wanted = {o.name for o in asked} if asked else None  # None: every output
        response_id = request.id or ids.request_id()
        tensors = v2codec.output_tensors(outputs, wanted)
        if raw and all(type(name) is str for name, _, _, _ in tensors):
            return response_id, self._encoder.raw_response(
                settings.name, settings.version, response_id, tensors
            )
        # typed contents, or outputs not named by strings (which protobuf refuses)
        response = pb.ModelInferResponse(
            model_name=settings.name, model_version=settings.version, id=response_id
        )
        for name, datatype, shape, arr in tensors:
            out = response.outputs.add(name=name, datatype=datatype, shape=shape)
            if raw:
                response.raw_output_contents.append(v2codec.raw_from_array(datatype, arr))
            else:
                _to_contents(out.contents, datatype, arr)
        return response_id, response


class ResponseEncoder:
    """A ModelInferResponse with raw outputs, serialized as protobuf would serialize it
    (fields in number order, empty strings left out, shapes packed), a few times cheaper
    than building the message: the model's name and version, and each output's name, datatype
    and shape, are encoded once and reused."""

    _MAX_TENSORS = 256

    def __init__(self) -> None:
        self._head: tuple[str, str, bytes] | None = None
        self._tensors: dict[tuple, bytes] = {}

    def raw_response(
        self, model_name: str, model_version: str, response_id: str, tensors: list
    ) -> bytes:
        head = self._head
        if head is None or head[0] != model_name or head[1] != model_version:
            head = self._head = (
                model_name,
                model_version,
                _string(b"\x0a", model_name) + _string(b"\x12", model_version),
            )
        parts = [head[2], _string(b"\x1a", response_id)]
        raws = []
        for name, datatype, shape, arr in tensors:
            key = (name, datatype, *shape)
            tensor = self._tensors.get(key)
            if tensor is None:
                if len(self._tensors) >= self._MAX_TENSORS:
                    self._tensors.clear()
                packed = b"".join(_varint(d) for d in shape)
                tensor = _string(b"\x0a", name) + _string(b"\x12", datatype)
                if packed:
                    tensor += b"\x1a" + _varint(len(packed)) + packed
                tensor = self._tensors[key] = b"\x2a" + _varint(len(tensor)) + tensor
            parts.append(tensor)
            data = v2codec.raw_from_array(datatype, arr)
            raws.append(b"\x32" + _varint(len(data)))
            raws.append(data)
        return b"".join(parts + raws)


def _varint(value: int) -> bytes:
    """An int64 as protobuf's varint (a negative one in ten bytes, two's complement)."""
    if 0 <= value < 0x80:
        return bytes((value,))
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(tag: bytes, value: str) -> bytes:
    """A string field (left out when empty, as proto3 leaves it)."""
    if not value:
        return b""
    data = value.encode()
    return tag + _varint(len(data)) + data


def _from_contents(tensor: Any) -> np.ndarray:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise bad_request(
            "wrong_type",
            f"input {tensor.name!r}: datatype {tensor.datatype!r} cannot travel in contents",
        )
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        try:
            return np.array([v.decode("utf-8") for v in values], dtype=str)
        except UnicodeDecodeError:
            raise bad_request(
                "wrong_type", f"input {tensor.name!r}: BYTES elements must be UTF-8 text"
            ) from None
    return np.array(values, dtype=v2codec.RAW_DTYPES[tensor.datatype])


def _to_contents(contents: Any, datatype: str, arr: np.ndarray) -> None:
    field = _CONTENTS.get(datatype)
    if field is None:  # FP16: widened, as the typed contents have no 16-bit field
        contents.fp32_contents.extend(arr.astype(np.float32).ravel().tolist())
        return
    values = arr.ravel().tolist()
    if datatype == "BYTES":
        values = [v if isinstance(v, bytes) else v2codec.text(v).encode() for v in values]
    getattr(contents, field).extend(values)


def calls(service: InferenceService) -> dict[bytes, tuple[Callable[[Any, Reply], None], Any]]:
    """Each call's handler and request message, by the call's path. A handler answers by
    calling `reply` once, with the response message or a CallError (perhaps before it
    returns)."""
    return {
        f"/{SERVICE}/{name}".encode(): (fn, message)
        for name, fn, message in (
            ("ServerLive", service.server_live, pb.ServerLiveRequest),
            ("ServerReady", service.server_ready, pb.ServerReadyRequest),
            ("ModelReady", service.model_ready, pb.ModelReadyRequest),
            ("ServerMetadata", service.server_metadata, pb.ServerMetadataRequest),
            ("ModelMetadata", service.model_metadata, pb.ModelMetadataRequest),
            ("ModelInfer", service.model_infer, pb.ModelInferRequest),
        )
    }
