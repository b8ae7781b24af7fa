"""Routes and handlers of the model server: the protocols on top of `model`, `batching`,
`metrics` and `predlog`."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from serving import fastjson, ids, v2codec
from serving.batching import Batcher, Pending
from serving.config import Settings
from serving.errors import ServingError, bad_request
from serving.fastjson import dumps
from serving.httpserver import HttpConnection, Request, query_params
from serving.inputs import COLUMN_DTYPES, Rows
from serving.metrics import Metrics
from serving.model import LoadedModel, Outputs, not_ready, parse_scoring_json, v2_datatype
from serving.predlog import PredictionLog, default_max_bytes

logger = logging.getLogger("serving")

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
SERVER_VERSION = "1.0"
# OIP v2 extensions this server implements (Triton's name for the binary tensor data one)
EXTENSIONS = ["binary_tensor_data"]

V1_KEYS = ("instances", "inputs")
# A client's X-Request-Id is echoed back only if it is a short header-safe token.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")


# Bodies without a Content-Type, or with the one `curl -d` sends (as TF Serving's docs show),
# are read as JSON when they parse as JSON.
_MAYBE_JSON = (None, "application/x-www-form-urlencoded")


def _parse_json(body: bytes | memoryview) -> Any:
    try:
        return fastjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request("invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("invalid_json", "the body is nested too deeply") from None


def _error_body(code: str, message: str, **extra: Any) -> bytes:
    return dumps({"error": {"code": code, "message": message, **extra}})


def _is_v2(req: Request) -> bool:
    return req.path == "/v2" or req.path.startswith("/v2/")


def _error(req: Request, code: str, message: str, **extra: Any) -> tuple[bytes, tuple[bytes, ...]]:
    """(body, headers) of an error: OIP v2's `{"error": "<message>"}` on /v2 routes (the code
    in an X-Error-Code header), `{"error": {"code", "message"}}` everywhere else."""
    if _is_v2(req):
        return dumps({"error": message}), (b"x-error-code: %s\r\n" % code.encode(),)
    return _error_body(code, message, **extra), ()


class App:
    """One server process: its model, metrics, prediction log and open connections."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.max_body_bytes = settings.max_body_bytes
        self.connections: set[HttpConnection] = set()
        self.receiving = 0
        # gRPC requests expected soon (serving/grpc_server.py sets it): batches wait for them
        self.grpc_expected: Callable[[], int] = lambda: 0
        self.closing = False
        self.model: LoadedModel | None = None
        self.ready = False
        # one batcher per prediction method: a batch is predicted by one method
        self.batchers: dict[str | None, Batcher] = {}
        self.metrics = Metrics(settings.name, settings.version)
        self.log = PredictionLog(
            settings.log_buffer,
            settings.name,
            settings.version,
            max_bytes=settings.log_buffer_bytes or default_max_bytes(),
        )
        self.metrics.log_dropped = lambda: self.log.dropped
        self.metrics.log_buffered = lambda: len(self.log)
        self.metrics.log_bytes = lambda: self.log.bytes
        self.metrics.log_max_bytes = self.log.max_bytes
        self.sample = settings.log_input_sample
        self.model_headers = b"x-model-name: %s\r\nx-model-version: %s\r\n" % (
            settings.name.encode(),
            settings.version.encode(),
        )
        self.static_routes: dict[str, tuple[str, str, Callable]] = {
            "/invocations": ("POST", "/invocations", self.invocations),
            "/ping": ("GET", "/ping", self.ping),
            "/health": ("GET", "/health", self.ping),
            "/version": ("GET", "/version", self.version),
            "/metrics": ("GET", "/metrics", self.prometheus),
            "/predictions": ("GET", "/predictions", self.predictions),
            "/v2": ("GET", "/v2", self.v2_server),
            "/v2/health/live": ("GET", "/v2/health/live", self.v2_live),
            "/v2/health/ready": ("GET", "/v2/health/ready", self.v2_ready),
        }

    # --- lifecycle ---------------------------------------------------------------------------

    def set_model(self, model: LoadedModel, load_seconds: float) -> None:
        """Called on the loop once the model loaded and the warm-up succeeded."""
        self.model = model
        if model.schema is not None:
            self.log.input_names = model.schema.names
        # The libraries just imported leave ~10^5-10^6 long-lived objects; moving them out of the
        # collector's sight keeps full collections (and their pauses) short. No collection
        # first: it would delay readiness by ~0.1 s to free a few dozen objects.
        gc.freeze()
        self.metrics.model_load_seconds = load_seconds
        self.metrics.loader = model.loader
        self.metrics.ready = True
        self.ready = True

    def begin_shutdown(self) -> None:
        """Stop taking new requests on open connections; busy ones close after answering."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_if_idle()

    # --- dispatch ----------------------------------------------------------------------------

    def request_id(self, req: Request) -> bytes:
        rid = req.headers.get(b"x-request-id")
        if rid is not None and _REQUEST_ID.fullmatch(rid):
            return rid
        return ids.request_id().encode()

    def _route(self, req: Request) -> tuple[str, str, Callable, dict[str, str]]:
        path = req.path
        route = self.static_routes.get(path)
        if route is not None:
            return (*route, {})
        for prefix, version in (("/v1/models/", "v1"), ("/v2/models/", "v2")):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            action = ""
            if version == "v1" and ":" in rest:
                rest, _, action = rest.rpartition(":")
            elif version == "v1" and rest.endswith("/metadata"):
                rest, action = rest[: -len("/metadata")], "metadata"
            elif version == "v2":
                for suffix in ("/infer", "/ready"):
                    if rest.endswith(suffix):
                        rest, action = rest[: -len(suffix)], suffix[1:]
                        break
            name, _, model_version = rest.partition("/versions/")
            args = {"name": name, "version": model_version}
            if version == "v1":
                if action == "predict":
                    return "POST", "/v1/models/{name}:predict", self.v1_predict, args
                if action in ("classify", "regress"):
                    endpoint = f"/v1/models/{{name}}:{action}"
                    return "POST", endpoint, self.v1_classify_regress, args
                if action == "metadata":
                    return "GET", "/v1/models/{name}/metadata", self.v1_metadata, args
                if not action:
                    return "GET", "/v1/models/{name}", self.v1_status, args
            else:
                if action == "infer":
                    return "POST", "/v2/models/{name}/infer", self.v2_infer, args
                if action == "ready":
                    return "GET", "/v2/models/{name}/ready", self.v2_model_ready, args
                if not action:
                    return "GET", "/v2/models/{name}", self.v2_metadata, args
        raise ServingError(404, "not_found", f"no route for {req.path}")

    def handle(self, req: Request, conn: HttpConnection) -> None:
        rid = self.request_id(req)
        self.metrics.in_flight += 1
        endpoint = "unknown"
        try:
            method, endpoint, fn, args = self._route(req)
            if req.method != method:
                raise ServingError(405, "method_not_allowed", f"{req.path} only allows {method}")
            if args:
                self._check_model(args)
            fn(req, conn, rid, endpoint)
        except ServingError as exc:
            body, extra = _error(req, exc.code, exc.message)
            if exc.status == 405:
                extra = (*extra, b"allow: %s\r\n" % method.encode())
            self.send(req, conn, rid, endpoint, exc.status, body, extra=extra)
        except Exception as exc:
            self.internal_error(req, conn, rid, endpoint, exc)

    def _check_model(self, args: dict[str, str]) -> None:
        if args["name"] != self.settings.name:
            raise ServingError(404, "model_not_found", f"model {args['name']!r} is not served here")
        if args["version"] and args["version"] != self.settings.version:
            raise ServingError(
                404,
                "model_not_found",
                f"version {args['version']!r} of the model is not served here",
            )

    def send(
        self,
        req: Request,
        conn: HttpConnection,
        rid: bytes,
        endpoint: str,
        status: int,
        body: bytes,
        content_type: bytes = JSON,
        extra: tuple[bytes, ...] = (),
    ) -> None:
        self.metrics.in_flight -= 1
        self.metrics.observe_request(endpoint, status, time.perf_counter() - req.started)
        headers = [b"x-request-id: %s\r\n" % rid, self.model_headers, *extra]
        conn.respond(req, status, body, content_type, headers)

    def internal_error(
        self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str, exc: BaseException
    ) -> None:
        error_id = uuid.uuid4().hex[:16]
        logger.error(
            "error %s on %s %s (request id %s)",
            error_id,
            req.method,
            req.path,
            rid.decode("latin-1"),
            exc_info=exc,
        )
        body, extra = _error(
            req,
            "internal_error",
            f"the model failed on this request; error id {error_id}",
            error_id=error_id,
        )
        self.send(req, conn, rid, endpoint, 500, body, extra=extra)

    def reject_too_large(self, req: Request, conn: HttpConnection) -> None:
        self.metrics.in_flight += 1
        body, extra = _error(
            req, "payload_too_large", f"the body is larger than {self.max_body_bytes} bytes"
        )
        self.send(req, conn, self.request_id(req), "unknown", 413, body, extra=extra)

    # --- predicting --------------------------------------------------------------------------

    def _model(self) -> LoadedModel:
        if not self.ready:
            raise not_ready()
        return self.model

    def _batcher(self, method: str | None) -> Batcher:
        batcher = self.batchers.get(method)
        if batcher is None:
            model = self.model
            batcher = self.batchers[method] = Batcher(
                self.loop,
                lambda rows: model.predict(rows, method),
                max_rows=self.settings.max_batch_size,
                max_delay_s=self.settings.max_batch_delay_ms / 1000,
                incoming=lambda: self.receiving + self.grpc_expected(),
                on_batch=self.metrics.batch_size.observe,
            )
        return batcher

    def predict(
        self,
        req: Request,
        conn: HttpConnection,
        rid: bytes,
        endpoint: str,
        rows: Rows,
        render: Callable[[Outputs], bytes | tuple[bytes, bytes, tuple[bytes, ...]]],
        method: str | None = None,
    ) -> None:
        """Queue rows for the method's batcher; answer with render(outputs) when predicted.

        render returns the JSON body, or (body, content type, extra headers); method: resolved
        by `LoadedModel.resolve_method` (None: the model's own predict)."""
        logged = rows if self.sample_inputs() else None

        def done(outputs: Outputs | None, error: BaseException | None) -> None:
            try:
                if error is not None:
                    self.metrics.model_errors += 1
                    self.internal_error(req, conn, rid, endpoint, error)
                    return
                rendered = render(outputs)
            except ServingError as exc:  # outputs the route cannot answer (classify, regress)
                body, extra = _error(req, exc.code, exc.message)
                self.send(req, conn, rid, endpoint, exc.status, body, extra=extra)
                return
            except Exception as exc:
                self.internal_error(req, conn, rid, endpoint, exc)
                return
            if isinstance(rendered, tuple):
                body, content_type, extra = rendered
                self.send(req, conn, rid, endpoint, 200, body, content_type, extra)
            else:
                self.send(req, conn, rid, endpoint, 200, rendered)
            self.record(rid.decode("latin-1"), endpoint, req.started, outputs, logged)

        self._batcher(method).submit(Pending(rows, done))

    def sample_inputs(self) -> bool:
        """Whether this request's inputs go into the prediction log (decided before any copy)."""
        return self.sample >= 1.0 or random.random() < self.sample

    def record(
        self, request_id: str, endpoint: str, started: float, outputs: Outputs, inputs: Any
    ) -> None:
        """Count a served prediction and add it to the prediction log (inputs: sampled)."""
        self.metrics.predictions += outputs.n
        latency_ms = (time.perf_counter() - started) * 1000
        self.log.add(request_id, time.time(), endpoint, latency_ms, outputs, inputs)

    def _predict_generic(
        self,
        req: Request,
        conn: HttpConnection,
        rid: bytes,
        endpoint: str,
        payload: Any,
        mime: str,
        method: str | None = None,
        key: str = "predictions",
    ) -> None:
        model = self._model()
        if method is None:
            method = model.resolve_method(None)
        try:
            outputs, data = model.predict_generic(payload, mime, method)
        except ServingError:
            raise
        except Exception as exc:
            self.metrics.model_errors += 1
            self.internal_error(req, conn, rid, endpoint, exc)
            return
        self.metrics.batch_size.observe(outputs.n)
        value = _tf_outputs(outputs) if key == "outputs" else outputs.predictions()
        self.send(req, conn, rid, endpoint, 200, dumps({key: value}))
        inputs = None
        if hasattr(data, "to_dict") and self.sample_inputs():
            try:
                inputs = fastjson.loads(data.to_json(orient="columns").encode())
                inputs = {k: list(v.values()) for k, v in inputs.items()}
            except Exception:
                inputs = None
        self.record(rid.decode("latin-1"), endpoint, req.started, outputs, inputs)

    def _content_type(self, req: Request) -> str | None:
        """The body's media type, lower-cased (None when the request names none)."""
        raw = req.header(b"content-type")
        if raw is None:
            return None
        mime, *params = [p.strip() for p in raw.split(";")]
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
                "utf-8",
                "utf8",
            ):
                raise ServingError(415, "unsupported_media_type", "only UTF-8 bodies are supported")
        return mime.lower() or None

    def _json_payload(self, req: Request, mime: str | None, body: Any = None) -> Any:
        """The JSON body of a prediction request: application/json, or no (or curl's form)
        content type with a body that parses as JSON; else 415."""
        body = req.body if body is None else body
        if mime == "application/json":
            return _parse_json(body)
        if mime in _MAYBE_JSON:
            try:
                return _parse_json(body)
            except ServingError:
                named = "no Content-Type" if mime is None else f"Content-Type {mime}"
                raise ServingError(
                    415,
                    "unsupported_media_type",
                    f"the body has {named} and is not JSON; send Content-Type: application/json",
                ) from None
        raise ServingError(
            415,
            "unsupported_media_type",
            f"content type {mime!r} is not supported; use application/json",
        )

    def invocations(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        mime = self._content_type(req)
        if mime not in ("application/json", "text/csv", *_MAYBE_JSON):
            raise ServingError(
                415,
                "unsupported_media_type",
                f"content type {mime!r} is not supported; use application/json or text/csv",
            )
        model = self._model()
        if mime == "text/csv":
            try:
                text = req.body.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_request("invalid_csv", "the CSV body is not valid UTF-8") from None
            if model.schema is None:
                return self._predict_generic(req, conn, rid, endpoint, text, mime)
            rows = model.schema.from_csv(text)
        else:
            payload = self._json_payload(req, mime)
            params = payload.get("params") if isinstance(payload, dict) else None
            method = model.resolve_method(_predict_method(params, "params"))
            if model.schema is None:
                if not isinstance(payload, dict):
                    raise bad_request("bad_payload", "the body must be a JSON object")
                return self._predict_generic(
                    req, conn, rid, endpoint, payload, "application/json", method
                )
            rows = parse_scoring_json(model.schema, payload)
            return self.predict(req, conn, rid, endpoint, rows, _render_mlflow, method)
        self.predict(req, conn, rid, endpoint, rows, _render_mlflow, model.resolve_method(None))

    def v1_predict(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        payload = self._json_payload(req, self._content_type(req))
        model = self._model()
        if not isinstance(payload, dict):
            raise bad_request(
                "bad_payload", "the body must be a JSON object with 'instances' or 'inputs'"
            )
        unknown = [k for k in payload if k not in V1_KEYS and k != "signature_name"]
        if unknown:
            raise bad_request(
                "unknown_key",
                f"unknown key(s) {', '.join(map(repr, unknown))}; expected 'instances' or 'inputs'",
            )
        keys = [k for k in payload if k in V1_KEYS]
        if len(keys) != 1:
            raise bad_request(
                "bad_payload", "the body must have exactly one of 'instances' or 'inputs'"
            )
        # TF Serving answers the row format with `predictions`, the columnar one with `outputs`
        answer_key = "outputs" if keys[0] == "inputs" else "predictions"
        if model.schema is None:
            return self._predict_generic(
                req,
                conn,
                rid,
                endpoint,
                {keys[0]: payload[keys[0]]},
                "application/json",
                model.resolve_method(None),
                answer_key,
            )
        value = payload[keys[0]]
        if keys[0] == "instances":
            rows, render = model.schema.from_instances(value), _render_mlflow
        else:
            rows, render = model.schema.from_inputs(value), _render_tf_columnar
        self.predict(req, conn, rid, endpoint, rows, render, model.resolve_method(None))

    def v1_classify_regress(
        self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str
    ) -> None:
        """TF Serving's Classify and Regress: {"examples": [{feature: value}], "context": {}}."""
        payload = self._json_payload(req, self._content_type(req))
        model = self._model()
        if not isinstance(payload, dict) or not isinstance(payload.get("examples"), list):
            raise bad_request("bad_payload", "the body must be a JSON object with 'examples'")
        unknown = [k for k in payload if k not in ("examples", "context", "signature_name")]
        if unknown:
            raise bad_request(
                "unknown_key",
                f"unknown key(s) {', '.join(map(repr, unknown))}; expected 'examples', "
                "'context' and 'signature_name'",
            )
        context = payload.get("context") or {}
        if not isinstance(context, dict):
            raise bad_request("bad_payload", "'context' must be a JSON object of features")
        examples = payload["examples"]
        if not all(isinstance(e, dict) for e in examples):
            raise bad_request("bad_payload", "each example must be a JSON object of features")
        if model.schema is None:
            raise ServingError(
                400,
                "unsupported_signature",
                "this model has no tabular signature; use /invocations",
            )
        records = [{**context, **{k: _feature(v) for k, v in e.items()}} for e in examples]
        rows = model.schema.from_records(records)
        classify = endpoint.endswith(":classify")
        render = _render_classify if classify else _render_regress
        self.predict(req, conn, rid, endpoint, rows, render, model.resolve_method(None))

    def v2_infer(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        mime = self._content_type(req)
        header_length = req.header(b"inference-header-content-length")
        blob = None
        body: Any = req.body
        if header_length is not None:
            if mime not in ("application/octet-stream", "application/json", *_MAYBE_JSON):
                raise ServingError(
                    415,
                    "unsupported_media_type",
                    f"content type {mime!r} is not supported with binary tensor data",
                )
            body, blob = v2codec.split_binary_body(req.body, header_length)
            mime = "application/json"
        payload = self._json_payload(req, mime, body)
        model = self._model()
        if not isinstance(payload, dict):
            raise bad_request("bad_payload", "the body must be a JSON object with 'inputs'")
        unknown = [k for k in payload if k not in ("id", "parameters", "inputs", "outputs")]
        if unknown:
            raise bad_request(
                "unknown_key",
                f"unknown key(s) {', '.join(map(repr, unknown))} in the inference request",
            )
        if "inputs" not in payload:
            raise bad_request("bad_payload", "the inference request needs 'inputs'")
        if blob is not None:
            v2codec.attach_binary_inputs(payload["inputs"], blob)
        if model.schema is None:
            raise ServingError(
                400,
                "unsupported_signature",
                "this model has no tabular signature; use /invocations",
            )
        method = model.resolve_method(_predict_method(payload.get("parameters"), "parameters"))
        rows = model.schema.from_v2(payload["inputs"])
        request_id = payload.get("id")
        response_id = request_id if isinstance(request_id, str) else rid.decode("latin-1")
        params = payload.get("parameters")
        binary_default = isinstance(params, dict) and params.get("binary_data_output") is True
        wanted: dict[str, bool] | None = None
        if isinstance(payload.get("outputs"), list):
            wanted = {}
            for out in payload["outputs"]:
                if isinstance(out, dict) and isinstance(out.get("name"), str):
                    out_params = out.get("parameters")
                    binary = binary_default
                    if isinstance(out_params, dict) and "binary_data" in out_params:
                        binary = out_params["binary_data"] is True
                    wanted[out["name"]] = binary
        name, version = self.settings.name, self.settings.version

        def render(outputs: Outputs) -> bytes | tuple[bytes, bytes, tuple[bytes, ...]]:
            tensors, blobs = [], []
            for out_name, datatype, shape, arr in v2codec.output_tensors(
                outputs, set(wanted) if wanted is not None else None
            ):
                binary = wanted[out_name] if wanted is not None else binary_default
                tensor: dict[str, Any] = {"name": out_name, "datatype": datatype, "shape": shape}
                if binary:
                    raw = v2codec.raw_from_array(datatype, arr)
                    tensor["parameters"] = {"binary_data_size": len(raw)}
                    blobs.append(raw)
                else:
                    tensor["data"] = _v2_data(datatype, arr)
                tensors.append(tensor)
            header = dumps(
                {
                    "model_name": name,
                    "model_version": version,
                    "id": response_id,
                    "parameters": {},
                    "outputs": tensors,
                }
            )
            if not blobs:
                return header
            length = b"inference-header-content-length: %d\r\n" % len(header)
            return b"".join([header, *blobs]), OCTET_STREAM, (length,)

        self.predict(req, conn, rid, endpoint, rows, render, method)

    # --- status endpoints --------------------------------------------------------------------

    def ping(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        if self.ready and not self.closing:
            self.send(req, conn, rid, endpoint, 200, b"\n")
        else:
            self.send(
                req, conn, rid, endpoint, 503, _error_body("not_ready", "the model is not ready")
            )

    def version(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        import importlib.metadata

        try:
            mlflow_version = importlib.metadata.version("mlflow-skinny")
        except importlib.metadata.PackageNotFoundError:
            mlflow_version = None
        body = dumps(
            {
                "server": SERVER_VERSION,
                "mlflow": mlflow_version,
                "model": self.settings.name,
                "model_version": self.settings.version,
                "loader": self.model.loader if self.model is not None else None,
            }
        )
        self.send(req, conn, rid, endpoint, 200, body)

    def prometheus(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        self.send(req, conn, rid, endpoint, 200, self.metrics.render(), PROMETHEUS)

    def predictions(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        token = self.settings.admin_token
        if token is not None:
            given = req.header(b"authorization") or ""
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise ServingError(401, "unauthorized", "send Authorization: Bearer <admin token>")
        params = query_params(req.query)
        try:
            after = int(params.get("after", "0"))
            limit = int(params.get("limit", "1000"))
        except ValueError:
            raise bad_request("bad_query", "after and limit must be integers") from None
        if after < 0 or not 1 <= limit <= 10000:
            raise bad_request("bad_query", "after must be >= 0 and limit between 1 and 10000")
        records = self.log.read(after, limit)
        body = dumps(
            {
                "boot_id": self.log.boot_id,
                "next": records[-1]["seq"] if records else after,
                "dropped": self.log.dropped,
                "records": records,
            }
        )
        self.send(req, conn, rid, endpoint, 200, body)

    def v2_server(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        body = dumps({"name": "mlops-serving", "version": SERVER_VERSION, "extensions": EXTENSIONS})
        self.send(req, conn, rid, endpoint, 200, body)

    def v2_live(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        self.send(req, conn, rid, endpoint, 200, dumps({"live": True}))

    def v2_ready(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        ready = self.ready and not self.closing
        self.send(req, conn, rid, endpoint, 200 if ready else 503, dumps({"ready": ready}))

    def v2_model_ready(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        ready = self.ready and not self.closing
        body = dumps({"name": self.settings.name, "ready": ready})
        self.send(req, conn, rid, endpoint, 200 if ready else 503, body)

    def v2_metadata_dict(self) -> dict[str, Any]:
        """OIP v2 model metadata (HTTP and gRPC)."""
        model = self._model()
        inputs = []
        if model.schema is not None:
            for column in model.schema.columns:
                inputs.append(
                    {"name": column.name, "datatype": _v2_type(column.type), "shape": [-1]}
                )
        outputs = []
        for name, kind in model.output_specs:
            datatype = v2_datatype(kind) if isinstance(kind, np.dtype) else _v2_type(kind)
            outputs.append({"name": name, "datatype": datatype, "shape": [-1]})
        return {
            "name": self.settings.name,
            "versions": [self.settings.version],
            "platform": f"mlflow_{model.flavor}",
            "inputs": inputs,
            "outputs": outputs,
            "parameters": {
                "predict_methods": model.supported_methods(),
                "default_predict_method": model.default_method,
            },
        }

    def v2_metadata(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        self.send(req, conn, rid, endpoint, 200, dumps(self.v2_metadata_dict()))

    def v1_metadata(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        """TF Serving's GetModelMetadata answer: the model's one signature, `serving_default`."""
        model = self._model()
        inputs = {}
        if model.schema is not None:
            for column in model.schema.columns:
                inputs[column.name] = _tf_tensor_info(column.name, _tf_dtype(column.type))
        outputs = {
            name: _tf_tensor_info(name, _tf_dtype(kind)) for name, kind in model.output_specs
        }
        signature = {
            "inputs": inputs,
            "outputs": outputs,
            "method_name": "tensorflow/serving/predict",
        }
        body = dumps(
            {
                "model_spec": {
                    "name": self.settings.name,
                    "signature_name": "",
                    "version": self.settings.version,
                },
                "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
            }
        )
        self.send(req, conn, rid, endpoint, 200, body)

    def v1_status(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        state = "AVAILABLE" if self.ready else "LOADING"
        body = dumps(
            {
                "model_version_status": [
                    {
                        "version": self.settings.version,
                        "state": state,
                        "status": {"error_code": "OK", "error_message": ""},
                    }
                ]
            }
        )
        self.send(req, conn, rid, endpoint, 200, body)


def _v2_type(mlflow_type: str) -> str:
    dtype = COLUMN_DTYPES.get(mlflow_type)
    if dtype is None or dtype is object:
        return "BYTES"
    return v2_datatype(np.dtype(dtype))


def _predict_method(params: Any, field: str) -> Any:
    """The `predict_method` of a request's params (MLflow) or parameters (OIP v2), or None."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise bad_request("bad_payload", f"{field!r} must be a JSON object")
    return params.get("predict_method")


def _render_mlflow(outputs: Outputs) -> bytes:
    return dumps({"predictions": outputs.predictions()})


def _tf_outputs(outputs: Outputs) -> Any:
    """TF Serving's columnar `outputs`: the one output's values, or {name: values}."""
    if outputs.kind in ("frame", "dict"):
        return {k: v.tolist() for k, v in outputs.value.items()}
    return outputs.predictions()


def _render_tf_columnar(outputs: Outputs) -> bytes:
    return dumps({"outputs": _tf_outputs(outputs)})


def _single_output(outputs: Outputs, what: str) -> np.ndarray:
    arrays = v2codec.named_arrays(outputs)
    if len(arrays) != 1:
        raise ServingError(
            400, "unsupported_signature", f"{what} needs a model with one output, not {len(arrays)}"
        )
    (arr,) = arrays.values()
    return arr


def _render_regress(outputs: Outputs) -> bytes:
    arr = _single_output(outputs, "regress")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.dtype.kind not in "fiu":
        raise ServingError(
            400, "unsupported_signature", "regress needs a model that answers one number per row"
        )
    return dumps({"result": arr.astype(np.float64).tolist()})


def _render_classify(outputs: Outputs) -> bytes:
    """Per example, [label, score] pairs: a [n, k] float output is the score of each class
    (labelled by its index); a [n] output is the predicted label, with score 1.0 (the model
    gives no scores)."""
    arr = _single_output(outputs, "classify")
    if arr.ndim == 2 and arr.dtype.kind == "f":
        labels = [str(j) for j in range(arr.shape[1])]
        result = [
            [[label, score] for label, score in zip(labels, row, strict=True)]
            for row in arr.tolist()
        ]
    elif arr.ndim == 1:
        result = [[[v if isinstance(v, str) else dumps(v).decode(), 1.0]] for v in arr.tolist()]
    else:
        raise ServingError(
            400, "unsupported_signature", "classify needs a model that answers labels or scores"
        )
    return dumps({"result": result})


def _feature(value: Any) -> Any:
    """A TF Example feature as JSON gives it: a scalar, or a list of one value."""
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _v2_data(datatype: str, arr: np.ndarray) -> list:
    data = arr.ravel().tolist()
    if datatype == "BYTES":
        data = [v if isinstance(v, str) else dumps(v).decode() for v in data]
    return data


_TF_DTYPES = {
    "double": "DT_DOUBLE",
    "float": "DT_FLOAT",
    "long": "DT_INT64",
    "integer": "DT_INT32",
    "boolean": "DT_BOOL",
    "string": "DT_STRING",
}


def _tf_dtype(kind: Any) -> str:
    if isinstance(kind, np.dtype):
        if kind.kind == "b":
            return "DT_BOOL"
        return {
            "f4": "DT_FLOAT", "f8": "DT_DOUBLE", "i4": "DT_INT32", "i8": "DT_INT64",
        }.get(f"{kind.kind}{kind.itemsize}", "DT_STRING")  # fmt: skip
    return _TF_DTYPES.get(kind, "DT_STRING")


def _tf_tensor_info(name: str, dtype: str) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False},
        "name": name,
    }
