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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from serving import grpc_predict_v2_pb2 as pb
from serving import v2codec
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


class CallError(Exception):
    """A call answered with a gRPC status other than OK (and `x-error-code` in its trailers)."""

    def __init__(self, status: int, message: str, error_code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


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
        app.grpc_expected = self.expected

    def expected(self) -> int:
        """How many ModelInfer calls are likely on their way (recent peak minus in progress)."""
        if time.perf_counter() - self._peak_at > _PEAK_WINDOW_S:
            self._peak = self.infer_in_flight  # the load went down: forget the old peak
            self._peak_at = time.perf_counter()
        return self._peak - self.infer_in_flight

    # --- plumbing -----------------------------------------------------------------------------

    async def _call(self, name: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run fn with the metrics of one request; a ServingError or a failure becomes a
        CallError (its gRPC status)."""
        metrics = self.app.metrics
        metrics.in_flight += 1
        started = time.perf_counter()
        endpoint = f"/{SERVICE}/{name}"
        status = 200
        try:
            return await fn()
        except ServingError as exc:
            status = exc.status
            raise CallError(_STATUS.get(exc.status, INTERNAL), exc.message, exc.code) from None
        except Exception:
            status = 500
            error_id = uuid.uuid4().hex[:16]
            logger.exception("error %s on gRPC %s", error_id, name)
            raise CallError(
                INTERNAL, f"the model failed on this request; error id {error_id}", "internal_error"
            ) from None
        finally:
            metrics.in_flight -= 1
            metrics.observe_request(endpoint, status, time.perf_counter() - started)

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

    async def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        async def run():
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", run)

    async def server_ready(self, request: pb.ServerReadyRequest):
        async def run():
            return pb.ServerReadyResponse(ready=self._ready())

        return await self._call("ServerReady", run)

    async def model_ready(self, request: pb.ModelReadyRequest):
        async def run():
            self._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=self._ready())

        return await self._call("ModelReady", run)

    async def server_metadata(self, request: pb.ServerMetadataRequest):
        from serving.app import EXTENSIONS, SERVER_VERSION

        async def run():
            return pb.ServerMetadataResponse(
                name="mlops-serving", version=SERVER_VERSION, extensions=EXTENSIONS
            )

        return await self._call("ServerMetadata", run)

    async def model_metadata(self, request: pb.ModelMetadataRequest):
        async def run():
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

        return await self._call("ModelMetadata", run)

    async def model_infer(self, request: pb.ModelInferRequest):
        started = time.perf_counter()
        self.infer_in_flight += 1
        if self.infer_in_flight >= self._peak:
            self._peak, self._peak_at = self.infer_in_flight, started
        try:
            return await self._model_infer(request, started)
        finally:
            self.infer_in_flight -= 1

    async def _model_infer(self, request: pb.ModelInferRequest, started: float):

        async def run():
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
            tensors = []
            for i, tensor in enumerate(request.inputs):
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
            rows = model.schema.from_v2(tensors)
            logged = rows if app.sample_inputs() else None
            future = app.loop.create_future()

            def done(outputs: Outputs | None, error: BaseException | None) -> None:
                if not future.done():
                    future.set_result((outputs, error))

            app._batcher(method).submit(Pending(rows, done))
            outputs, error = await future
            if error is not None:
                app.metrics.model_errors += 1
                raise error
            wanted = {o.name for o in request.outputs} or None
            response = pb.ModelInferResponse(
                model_name=app.settings.name,
                model_version=app.settings.version,
                id=request.id or uuid.uuid4().hex,
            )
            for name, datatype, shape, arr in v2codec.output_tensors(outputs, wanted):
                out = response.outputs.add(name=name, datatype=datatype, shape=shape)
                if raw:
                    response.raw_output_contents.append(v2codec.raw_from_array(datatype, arr))
                else:
                    _to_contents(out.contents, datatype, arr)
            endpoint = f"/{SERVICE}/ModelInfer"
            app.record(response.id, endpoint, started, outputs, logged)
            return response

        return await self._call("ModelInfer", run)


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


def calls(service: InferenceService) -> dict[bytes, tuple[Callable[[Any], Awaitable[Any]], Any]]:
    """Each call's handler and request message, by the call's path."""
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
