"""Routes and handlers of the model server: the protocols on top of `model`, `batching`,
`metrics` and `predlog`."""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from serving.batching import Batcher, Pending
from serving.config import Settings
from serving.errors import ServingError, bad_request
from serving.httpserver import HttpConnection, Request, query_params
from serving.inputs import COLUMN_DTYPES, Rows
from serving.metrics import Metrics
from serving.model import (
    LoadedModel,
    Outputs,
    dumps,
    not_ready,
    parse_scoring_json,
    v2_datatype,
)
from serving.predlog import PredictionLog

logger = logging.getLogger("serving")

JSON = b"application/json"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
SERVER_VERSION = "1.0"

V1_KEYS = ("instances", "inputs")
# A client's X-Request-Id is echoed back only if it is a short header-safe token.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,200}")


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request("invalid_json", f"the body is not valid JSON: {exc}") from None


def _error_body(code: str, message: str, **extra: Any) -> bytes:
    return dumps({"error": {"code": code, "message": message, **extra}})


class App:
    """One server process: its model, metrics, prediction log and open connections."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.max_body_bytes = settings.max_body_bytes
        self.connections: set[HttpConnection] = set()
        self.receiving = 0
        self.closing = False
        self.model: LoadedModel | None = None
        self.ready = False
        # one batcher per prediction method: a batch is predicted by one method
        self.batchers: dict[str | None, Batcher] = {}
        self.metrics = Metrics(settings.name, settings.version)
        self.log = PredictionLog(settings.log_buffer, settings.name, settings.version)
        self.metrics.log_dropped = lambda: self.log.dropped
        self.metrics.log_buffered = lambda: len(self.log)
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
        return uuid.uuid4().hex.encode()

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
            extra = (b"allow: %s\r\n" % method.encode(),) if exc.status == 405 else ()
            self.send(
                req,
                conn,
                rid,
                endpoint,
                exc.status,
                _error_body(exc.code, exc.message),
                extra=extra,
            )
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
        body = _error_body(
            "internal_error",
            f"the model failed on this request; error id {error_id}",
            error_id=error_id,
        )
        self.send(req, conn, rid, endpoint, 500, body)

    def reject_too_large(self, req: Request, conn: HttpConnection) -> None:
        self.metrics.in_flight += 1
        body = _error_body(
            "payload_too_large", f"the body is larger than {self.max_body_bytes} bytes"
        )
        self.send(req, conn, self.request_id(req), "unknown", 413, body)

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
                incoming=lambda: self.receiving,
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
        render: Callable[[Outputs], bytes],
        method: str | None = None,
    ) -> None:
        """Queue rows for the method's batcher; answer with render(outputs) when predicted.

        method: resolved by `LoadedModel.resolve_method` (None: the model's own predict)."""

        def done(outputs: Outputs | None, error: BaseException | None) -> None:
            try:
                if error is not None:
                    self.metrics.model_errors += 1
                    self.internal_error(req, conn, rid, endpoint, error)
                    return
                body = render(outputs)
            except Exception as exc:
                self.internal_error(req, conn, rid, endpoint, exc)
                return
            self.send(req, conn, rid, endpoint, 200, body)
            self._record(req, rid, endpoint, outputs, rows)

        self._batcher(method).submit(Pending(rows, done))

    def _record(
        self, req: Request, rid: bytes, endpoint: str, outputs: Outputs, inputs: Any
    ) -> None:
        self.metrics.predictions += outputs.n
        if self.sample < 1.0 and random.random() >= self.sample:
            inputs = None
        latency_ms = (time.perf_counter() - req.started) * 1000
        self.log.add(rid.decode("latin-1"), time.time(), endpoint, latency_ms, outputs, inputs)

    def _predict_generic(
        self,
        req: Request,
        conn: HttpConnection,
        rid: bytes,
        endpoint: str,
        payload: Any,
        mime: str,
        method: str | None = None,
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
        self.send(req, conn, rid, endpoint, 200, dumps({"predictions": outputs.predictions()}))
        inputs = None
        if hasattr(data, "to_dict"):
            try:
                inputs = json.loads(data.to_json(orient="columns"))
                inputs = {k: list(v.values()) for k, v in inputs.items()}
            except Exception:
                inputs = None
        self._record(req, rid, endpoint, outputs, inputs)

    def _content_type(self, req: Request) -> str:
        raw = req.header(b"content-type")
        if raw is None:
            raise ServingError(
                415, "unsupported_media_type", "set Content-Type: application/json or text/csv"
            )
        mime, *params = [p.strip() for p in raw.split(";")]
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
                "utf-8",
                "utf8",
            ):
                raise ServingError(415, "unsupported_media_type", "only UTF-8 bodies are supported")
        return mime.lower()

    def invocations(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        mime = self._content_type(req)
        if mime not in ("application/json", "text/csv"):
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
            payload = _parse_json(req.body)
            params = payload.get("params") if isinstance(payload, dict) else None
            method = model.resolve_method(_predict_method(params, "params"))
            if model.schema is None:
                if not isinstance(payload, dict):
                    raise bad_request("bad_payload", "the body must be a JSON object")
                return self._predict_generic(req, conn, rid, endpoint, payload, mime, method)
            rows = parse_scoring_json(model.schema, payload)
            return self.predict(req, conn, rid, endpoint, rows, _render_mlflow, method)
        self.predict(req, conn, rid, endpoint, rows, _render_mlflow, model.resolve_method(None))

    def v1_predict(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        mime = self._content_type(req)
        if mime != "application/json":
            raise ServingError(415, "unsupported_media_type", "use Content-Type: application/json")
        model = self._model()
        payload = _parse_json(req.body)
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
        if model.schema is None:
            return self._predict_generic(
                req, conn, rid, endpoint, {keys[0]: payload[keys[0]]}, mime
            )
        value = payload[keys[0]]
        rows = (
            model.schema.from_instances(value)
            if keys[0] == "instances"
            else model.schema.from_inputs(value)
        )
        self.predict(req, conn, rid, endpoint, rows, _render_mlflow, model.resolve_method(None))

    def v2_infer(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
        mime = self._content_type(req)
        if mime != "application/json":
            raise ServingError(415, "unsupported_media_type", "use Content-Type: application/json")
        model = self._model()
        payload = _parse_json(req.body)
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
        wanted = None
        if isinstance(payload.get("outputs"), list):
            wanted = {o.get("name") for o in payload["outputs"] if isinstance(o, dict)}
        name, version = self.settings.name, self.settings.version

        def render(outputs: Outputs) -> bytes:
            return dumps(
                {
                    "model_name": name,
                    "model_version": version,
                    "id": response_id,
                    "parameters": {},
                    "outputs": outputs.v2_outputs(wanted),
                }
            )

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
        body = dumps({"name": "mlops-serving", "version": SERVER_VERSION, "extensions": []})
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

    def v2_metadata(self, req: Request, conn: HttpConnection, rid: bytes, endpoint: str) -> None:
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
        body = dumps(
            {
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
